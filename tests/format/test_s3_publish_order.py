"""The S3 save path from its request log: every object of the step is stored before the commit
record is sent, the commit record (``step_<n>/manifest.json``) is the last write, nothing outside
the step is written, and every prefix of the completed writes reads as the old or the new checkpoint.

A recording proxy sits between s3fs and moto's server and numbers the start and the end of every
request, so "stored before sent" is checked on the wire, not inferred from the client's code.
"""

from __future__ import annotations

import http.client
import itertools
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from fmt_helpers import assert_tree_equal
from traced_save_proc import make_state

import ckptd
from ckptd.format import Run
from ckptd.storage import open_store

OLD, NEW = 7, 8
COMMIT_RECORD = re.compile(r"^step_\d{10}/manifest\.json$")
pytestmark = pytest.mark.s3


@dataclass(frozen=True)
class Request:
    start: int
    end: int
    method: str
    key: str  # the object key, without bucket and query
    query: str
    status: int


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.log: list[Request] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                start = proxy._tick()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{up.hostname}:{up.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                parts = urlsplit(self.path)
                key = unquote(parts.path).lstrip("/").partition("/")[2]  # drop the bucket
                with proxy._lock:  # the request counts as done before the client can see the answer
                    proxy.log.append(
                        Request(start, next(proxy._seq), self.command, key, parts.query, resp.status)
                    )
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _tick(self) -> int:
        with self._lock:
            return next(self._seq)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxied(s3_server: str, s3_url: str) -> Iterator[tuple[RecordingProxy, str, dict[str, Any]]]:
    proxy = RecordingProxy(s3_server)
    opts = {
        "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"},
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
    }
    try:
        yield proxy, s3_url, opts
    finally:
        proxy.close()


def _writes(log: list[Request]) -> list[Request]:
    """Requests that change the bucket and succeeded, in the order they completed."""
    return sorted(
        (r for r in log if r.method in ("PUT", "POST", "DELETE") and r.status < 300), key=lambda r: r.end
    )


def test_the_manifest_is_sent_after_every_object_is_stored(
    proxied: tuple[RecordingProxy, str, dict[str, Any]], tmp_path: Path
) -> None:
    proxy, url, opts = proxied
    ckptd.save(make_state(OLD), url, step=OLD, chunk_bytes=64 * 1024, storage_options=opts)
    proxy.log.clear()
    ckptd.save(make_state(NEW), url, step=NEW, chunk_bytes=64 * 1024, storage_options=opts)

    writes = _writes(proxy.log)
    prefix = url.split("/", 3)[3] + "/"  # the run root inside the bucket
    keys = [w.key.removeprefix(prefix) for w in writes]
    assert len(writes) >= 10, keys  # a multi-array save: many objects
    record = writes[-1]
    assert COMMIT_RECORD.match(keys[-1]) and keys[-1].startswith(f"step_{NEW:010d}/"), keys[-5:]
    step_dir = keys[-1].split("/")[0] + "/"
    outside = [k for k in keys if not k.startswith(step_dir)]
    assert outside == [], f"writes outside {step_dir}: {outside}"
    early = [w.key for w in writes[:-1] if w.end > record.start]
    assert early == [], f"the commit record was sent before these were stored: {early}"
    assert sum(1 for k in keys if COMMIT_RECORD.match(k)) == 1  # published once, never rewritten

    # Crash states: every prefix of the completed writes (an object store has no torn objects).
    fs = open_store(url, opts)
    contents = {k: fs.read(k) for k in dict.fromkeys(keys)}
    old_keys = [k for k in _list(url, opts) if not k.startswith(step_dir)]
    old = {k: fs.read(k) for k in old_keys}
    expected = {OLD: make_state(OLD), NEW: make_state(NEW)}
    seen = set()
    for n in range(len(keys) + 1):
        root = tmp_path / f"prefix-{n}"
        for k, data in [*old.items(), *((k, contents[k]) for k in keys[:n])]:
            (root / k).parent.mkdir(parents=True, exist_ok=True)
            (root / k).write_bytes(data)
        loaded: dict[str, Any] = {}
        step = ckptd.load(loaded, str(root), threads=1)
        assert_tree_equal(loaded, expected[step], f"prefix {n}: step {step}")
        assert Run(open_store(str(root))).verify(step, threads=1) == [], f"prefix {n}"
        seen.add(step)
    assert seen == {OLD, NEW}


def _list(url: str, opts: dict[str, Any]) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    root = url.removeprefix("s3://")
    return [p.removeprefix(root + "/") for p in fs.find(root)]
