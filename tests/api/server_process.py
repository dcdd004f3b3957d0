"""A catalog server in a process of its own (the real ``ckptd serve`` command, or a small script
that builds the app with a test converter), its URL read from uvicorn's log, its memory read from
``/proc``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.api.conftest import TOKEN

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 90.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "CKPTD_API_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.url = ""
        found = threading.Event()

        def read() -> None:  # keeps draining the pipe for the life of the process
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (the peak so far) of the server process, in KiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def ckptd_serve(database_url: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``python -m ckptd serve --db URL --port 0 ARGS...``."""
    return ServerProcess(
        ["-m", "ckptd", "serve", "--db", database_url, "--port", "0", "--log-level", "info", *args], env=env
    )
