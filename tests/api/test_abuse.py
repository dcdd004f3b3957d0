"""Unauthenticated abuse of a real ``ckptd serve`` process: oversized bodies, huge restore plans and
invented HTTP methods. No 5xx, ``/metrics`` stays bounded, and the server's memory does not grow
with the size of what an attacker asks for.

The idle server already holds ~300 MB (``import ckptd`` imports torch); the bound checked here is
the peak growth over that idle footprint while the attack runs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.conftest import AUTH, FreshDatabases, unique
from tests.api.server_process import ServerProcess, ckptd_serve

V1 = "/api/v1"
MAX_GROWTH_KIB = 100 * 1024
"""A 95 MB body parsed, or one restore plan of 1024^3 ranks, each costs far more than this."""


def raw_request(url: str, head: str, body: bytes = b"", *, chunks: int = 0) -> int:
    """Send a hand-written request (what no client library lets us get wrong on purpose) and return
    the status code of the answer; ``chunks`` MiB of chunked body follow the head when given."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + b"\r\n" + body)
        try:
            for _ in range(chunks):
                s.sendall(b"100000\r\n" + b"x" * 0x100000 + b"\r\n")
            if chunks:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending: what we want
        reply = b""
        while b"\r\n" not in reply:
            data = s.recv(65536)
            if not data:
                break
            reply += data
    return int(reply.split(b" ", 2)[1])


def big_layout(arrays: int) -> dict[str, Any]:
    spec = {"dtype": "float32", "shape": [64, 64], "layout": {"partition": [["tp"], []]}, "nbytes": 16384}
    return {"mesh": {"tp": 2}, "arrays": {f"model/layer{i}/w": spec for i in range(arrays)}}


@pytest.fixture(scope="module")
def server(databases: FreshDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("abuse")
    proc = ckptd_serve(databases.new(), "--allow-root", str(root))
    proc.root = root  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def test_unauthenticated_abuse_stays_bounded(server: ServerProcess) -> None:
    url = server.url
    host = f"Host: {urlsplit(url).netloc}\r\n"
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as api:
        run = unique()
        root = server.root / run  # type: ignore[attr-defined]
        assert api.post(f"{V1}/runs", json={"name": run, "roots": {"local": str(root)}}).status_code == 201
        body = {
            "step": 1,
            "locations": [{"tier": "local", "uri": str(root / "step_0000000001")}],
            "layout": big_layout(5000),
        }
        ckpt = api.post(f"{V1}/runs/{run}/checkpoints", json=body)
        assert ckpt.status_code == 201, ckpt.text
        cid = ckpt.json()["id"]
        assert api.patch(f"{V1}/checkpoints/{cid}", json={"state": "committed"}).status_code == 200
        api.get("/metrics")
        idle = server.memory_kib()["VmRSS"]
        metrics_before = len(api.get("/metrics").text.splitlines())

    with httpx.Client(base_url=url, timeout=60) as anon:
        # oversized bodies, announced and chunked: refused before they are read
        status = raw_request(
            url,
            f"POST {V1}/runs HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
            f"Content-Length: {95 * 2**20}\r\n",
            b'{"name": "' + b"a" * 60_000,
        )
        assert status == 413
        chunked = (
            f"POST {V1}/runs HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n"
        )
        assert raw_request(url, chunked, chunks=8) == 413
        assert raw_request(url, f"POST {V1}/runs HTTP/1.1\r\n{host}Content-Length: nonsense\r\n") == 400
        # restore plans: refused by their size before anything is built
        plan = f"{V1}/checkpoints/{cid}/restore-plan"
        r = anon.get(plan, params={"tp": 1024, "pp": 1024, "dp": 1024})
        assert r.status_code == 422 and "rank=" in r.json()["detail"]
        assert anon.get(plan, params={"dp": 8}).status_code == 422  # 8 ranks x 5000 arrays
        one = anon.get(plan, params={"dp": 8, "rank": 5})
        assert one.status_code == 200 and len(one.json()["ranks"][0]["reads"]) == 5000
        # invented methods: answered, and counted under one label
        for i in range(300):
            status = raw_request(url, f"X{i}METHOD {V1}/runs HTTP/1.1\r\n{host}Content-Length: 0\r\n")
            assert status in (400, 405), status
        text = anon.get("/metrics").text
        assert len(text.splitlines()) < metrics_before + 60
        assert 'method="OTHER"' in text and "X1METHOD" not in text

    memory = server.memory_kib()
    assert memory["VmHWM"] - idle < MAX_GROWTH_KIB, memory
    print(f"\nserver memory: idle {idle / 1024:.0f} MiB, peak {memory['VmHWM'] / 1024:.0f} MiB")
    assert server.proc.poll() is None


def test_the_body_limit_is_configurable_and_applies_to_token_holders_too(
    databases: FreshDatabases, tmp_path: Path
) -> None:
    proc = ckptd_serve(databases.new(), "--allow-root", str(tmp_path), "--max-body-bytes", "2048")
    try:
        with httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as api:
            small = {"name": unique(), "config": {"note": "x" * 1000}}
            assert api.post(f"{V1}/runs", json=small).status_code == 201
            big = {"name": unique(), "config": {"note": "x" * 3000}}
            r = api.post(f"{V1}/runs", json=big)
            assert r.status_code == 413 and "2048" in r.json()["detail"]
    finally:
        proc.stop()
