"""Storage the catalog cannot reach: a backend that is not installed on the server (``gs://``,
``az://``) or a root that is not a directory. GC and sync answer 4xx/502, never 500, and a
checkpoint whose data could not be deleted is left ``failed`` (retryable), never stuck in ``deleting``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import AUTH, FreshDatabases, start_server, unique

V1 = "/api/v1"
BACKENDS = {"gs": "gs://bucket/team", "az": "az://container/team"}


@pytest.fixture(scope="module")
def api(databases: FreshDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    local = tmp_path_factory.mktemp("storage-errors")
    live, stop = start_server(databases.new(), settings={"allow_roots": (str(local), *BACKENDS.values())})
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        client.local = local  # type: ignore[attr-defined]
        yield client
    stop()


@pytest.mark.parametrize("scheme", sorted(BACKENDS))
def test_gc_on_a_missing_backend_leaves_checkpoints_retryable(api: httpx.Client, scheme: str) -> None:
    name = unique()
    root = f"{BACKENDS[scheme]}/{name}"
    body = {"name": name, "roots": {"remote": root}, "retention": {"keep_last": 1}}
    assert api.post(f"{V1}/runs", json=body).status_code == 201
    ids = {}
    for step in (1, 2, 3):
        loc = {"tier": "remote", "uri": f"{root}/step_{step:010d}"}
        r = api.post(f"{V1}/runs/{name}/checkpoints", json={"step": step, "locations": [loc]})
        assert r.status_code == 201, r.text
        ids[step] = r.json()["id"]
        state = "failed" if step == 1 else "committed"
        assert api.patch(f"{V1}/checkpoints/{ids[step]}", json={"state": state}).status_code == 200
    for _ in range(2):  # and again: a retry meets the same missing backend
        r = api.post(f"{V1}/runs/{name}/gc")
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["deleted"] == [] and sorted(e["step"] for e in result["failed"]) == [1, 2]
        assert all("not installed" in e["reason"] for e in result["failed"])
    for step in (1, 2):
        ckpt = api.get(f"{V1}/checkpoints/{ids[step]}").json()
        assert ckpt["state"] == "failed" and "not installed" in ckpt["error"]
    assert api.get(f"{V1}/checkpoints/{ids[3]}").json()["state"] == "committed"
    # the step can be written again (a deleting one would be refused with 409)
    again = {"step": 2, "locations": [{"tier": "remote", "uri": f"{root}/step_0000000002"}]}
    assert api.post(f"{V1}/runs/{name}/checkpoints", json=again).status_code == 200
    assert api.get(f"{V1}/checkpoints/{ids[2]}").json()["state"] == "pending"


@pytest.mark.parametrize("scheme", sorted(BACKENDS))
def test_sync_of_a_missing_backend_is_a_422(api: httpx.Client, scheme: str) -> None:
    name = unique()
    body = {"name": name, "roots": {"remote": f"{BACKENDS[scheme]}/{name}"}}
    assert api.post(f"{V1}/runs", json=body).status_code == 201
    r = api.post(f"{V1}/runs/{name}/sync", json={"tier": "remote"})
    assert r.status_code == 422, r.text
    assert "not installed" in r.json()["detail"]


def test_sync_of_a_root_that_is_a_file_is_not_a_server_error(api: httpx.Client) -> None:
    name = unique()
    root: Path = api.local / name  # type: ignore[attr-defined]
    root.write_text("not a directory")
    assert api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(root)}}).status_code == 201
    r = api.post(f"{V1}/runs/{name}/sync", json={"tier": "local"})
    assert r.status_code in (422, 502), r.text
