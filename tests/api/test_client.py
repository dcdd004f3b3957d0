"""CatalogClient, the engine's HTTP client: the happy path against a live server, retries,
and never raising into training when the catalog is down or answers nonsense."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from ckptd.wire.client import CatalogClient, ClientConfig
from tests.api.conftest import TOKEN, LiveServer, layout, unique


def test_engine_flow_against_a_live_catalog(live: LiveServer, tmp_path: Path) -> None:
    run = unique()
    root = str(tmp_path / run)
    with CatalogClient(ClientConfig(base_url=live.url, token=TOKEN)) as client:
        assert client.reachable()
        assert client.register_run(run, roots={"local": root})
        ref = client.register_checkpoint(
            run, 100, locations={"local": f"{root}/step_0000000100"}, layout=layout(), metrics={"loss": 1.5}
        )
        assert ref is not None and ref.state == "pending"
        assert client.mark_committed(ref.id, nbytes=144)
        failed = client.register_checkpoint(run, 200)
        assert failed is not None and client.mark_failed(failed.id, "rank 2 lost its GPU")
        latest = client.resolve(run, "latest")
        assert (
            latest is not None
            and latest.step == 100
            and latest.locations["local"].endswith("step_0000000100")
        )
        assert client.resolve(run, "best:loss") == latest
        assert client.rollback_pointer(run) is None
        httpx.post(
            f"{live.url}/api/v1/runs/{run}/rollback",
            json={"select": "step:100"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ).raise_for_status()
        pointer = client.rollback_pointer(run)
        assert pointer is not None and pointer.checkpoint.id == ref.id
        assert client.acknowledge_rollback(run) and client.rollback_pointer(run) is None
        assert client.resolve(run, "no-such-alias") is None  # 404: None, not an exception
        assert client.failures == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_catalog_down_never_raises_and_gives_up_within_the_deadline() -> None:
    config = ClientConfig(
        base_url=f"http://127.0.0.1:{_free_port()}",
        token=TOKEN,
        retries=3,
        backoff_s=0.01,
        timeout_s=0.5,
        deadline_s=2.0,
    )
    with CatalogClient(config) as client:
        start = time.monotonic()
        assert client.register_run("r") is False
        assert client.register_checkpoint("r", 1) is None
        assert client.mark_committed(1) is False
        assert client.rollback_pointer("r") is None
        assert client.resolve("r", "latest") is None
        assert time.monotonic() - start < 10
        assert client.failures == 5
        assert client.reachable() is False  # the engine's outage probe: an answer, not an exception
        assert client.failures == 5  # a probe is not a failed call


def test_retries_transient_errors_but_not_client_errors() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/runs") and len(calls) < 3:
            return httpx.Response(503, json={"detail": "database restarting"})
        if request.url.path.endswith("/checkpoints"):
            return httpx.Response(422, json={"detail": "bad"})
        if request.url.path.endswith("/rollback"):
            return httpx.Response(200, content=b"not json")
        return httpx.Response(201, json={"id": 1})

    config = ClientConfig(base_url="http://catalog.invalid", retries=4, backoff_s=0.001)
    with CatalogClient(config, transport=httpx.MockTransport(handler)) as client:
        assert client.register_run("r") is True
        assert len(calls) == 3  # two 503s, then success
        assert client.register_checkpoint("r", 1) is None
        assert len(calls) == 4  # a 422 is not retried
        assert client.rollback_pointer("r") is None  # garbage in, None out
