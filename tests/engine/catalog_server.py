"""Real catalog servers for the engine tests: uvicorn in a thread (port 0, as tests/api/conftest.py
does), or ``ckptd serve`` in a subprocess that a test can SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tests.api.server_process import ServerProcess

TOKEN = "engine-test-token-" + "y" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def thread_server(database_url: str) -> Iterator[str]:
    """The catalog app under uvicorn on 127.0.0.1, port 0, in this process; yields its URL."""
    from ckptd.api.app import create_app
    from ckptd.api.settings import CatalogSettings
    from tests.uvicorn_thread import serve_in_thread

    allow = (tempfile.gettempdir(),)  # where the tests' run roots live
    settings = CatalogSettings(database_url=database_url, api_token=TOKEN, allow_roots=allow)
    url, stop = serve_in_thread(create_app(settings))
    try:
        yield url
    finally:
        stop()


class ServeProcess(ServerProcess):
    """``python -m ckptd serve --db URL --port 0`` (the real command) with this module's token; the
    port is read from its log."""

    def __init__(self, database_url: str, timeout: float = 60.0) -> None:
        super().__init__(
            ["-m", "ckptd", "serve", "--db", database_url, "--port", "0", "--log-level", "info"],
            env={"CKPTD_API_TOKEN": TOKEN, "CKPTD_ALLOW_ROOTS": tempfile.gettempdir()},  # the run roots
            timeout=timeout,
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, connections just break."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def dead_url() -> str:
    """A URL on which nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def checkpoints(url: str, run: str) -> list[dict[str, Any]]:
    """Every checkpoint of ``run`` in the catalog, ascending by step (follows the cursor)."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    with httpx.Client(base_url=url, timeout=10) as c:
        while True:
            params: dict[str, Any] = {"run": run, "sort": "step", "limit": 200}
            if cursor:
                params["cursor"] = cursor
            r = c.get("/api/v1/checkpoints", params=params)
            r.raise_for_status()
            doc = r.json()
            out.extend(doc["items"])
            cursor = doc["next_cursor"]
            if not cursor:
                return out


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
