"""The catalog fails closed without a token, and concurrent registrations of one run or checkpoint
(threads against a real uvicorn server and a real database) give exactly one row and never a 500."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckptd.api.app import create_app
from ckptd.api.settings import CatalogSettings
from tests.api.conftest import FreshDatabases, LiveServer, make_run, unique
from tests.uvicorn_thread import serve_in_thread

V1 = "/api/v1"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
THREADS = 8


@pytest.fixture(scope="module")
def tokenless(databases: FreshDatabases) -> Any:
    """A catalog started without ``CKPTD_API_TOKEN`` (and without ``allow_anonymous_writes``)."""
    app = create_app(CatalogSettings(database_url=databases.new(), api_token=None))
    url, stop = serve_in_thread(app)
    yield app, url
    stop()


def _mutating_routes(app: Any) -> list[tuple[str, str]]:
    """Every mutating operation the app publishes in its OpenAPI document."""
    out = []
    for template, operations in app.openapi()["paths"].items():
        for method in sorted(m.upper() for m in operations if m.upper() in MUTATING):
            # path parameters get plausible values: ids are numbers, names are names
            path = re.sub(r"\{(\w+_id)\}", "1", template)
            out.append((method, re.sub(r"\{\w+\}", "run-x", path)))
    return out


def test_every_mutating_route_refuses_without_a_configured_token(tokenless: Any) -> None:
    app, url = tokenless
    routes = _mutating_routes(app)
    assert len(routes) >= 10, routes  # runs, checkpoints, aliases, rollback, gc, sync, convert, ...
    with (
        httpx.Client(base_url=url, timeout=30) as anon,
        httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer " + "y" * 32}) as guessing,
    ):
        for method, path in routes:
            for client in (anon, guessing):  # no token, or any token: there is none to match
                r = client.request(method, path, json={})
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                assert "read-only" in r.json()["detail"], (method, path, r.text)


def test_a_tokenless_catalog_stays_readable_and_unchanged(tokenless: Any) -> None:
    _, url = tokenless
    name = unique()
    with httpx.Client(base_url=url, timeout=30) as anon:
        assert anon.post(f"{V1}/runs", json={"name": name}).status_code == 403
        assert anon.get(f"{V1}/runs/{name}").status_code == 404  # nothing was written
        listed = anon.get(f"{V1}/runs")
        assert listed.status_code == 200 and all(r["name"] != name for r in listed.json()["items"])


def _race(
    n: int, request: Callable[[httpx.Client], httpx.Response], live: LiveServer
) -> list[httpx.Response]:
    """``n`` threads, each with its own connection, released together by a barrier."""
    barrier = threading.Barrier(n)
    results: list[httpx.Response | BaseException] = [RuntimeError("not run")] * n

    def worker(i: int) -> None:
        with live.client() as c:
            barrier.wait()
            try:
                results[i] = request(c)
            except BaseException as e:  # reported below, with the others
                results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return [r for r in results if isinstance(r, httpx.Response)]


def test_concurrent_registration_of_one_run_creates_it_once(live: LiveServer, tmp_path: Path) -> None:
    name = unique()
    body = {"name": name, "roots": {"local": str(tmp_path / name)}}
    responses = _race(THREADS, lambda c: c.post(f"{V1}/runs", json=body), live)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * (THREADS - 1) + [201], [(r.status_code, r.text[:200]) for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1  # every caller got the same row
    with live.client() as c:
        page = c.get(f"{V1}/runs", params={"name_prefix": name}).json()["items"]
    assert [r["name"] for r in page] == [name]


def test_concurrent_registration_of_one_checkpoint_creates_it_once(live: LiveServer, tmp_path: Path) -> None:
    with live.client() as c:
        run = make_run(c, tmp_path)
    uri = str(tmp_path / run / "step_0000000042")
    body = {"step": 42, "locations": [{"tier": "local", "uri": uri}], "metrics": {"loss": 1.5}}
    responses = _race(THREADS, lambda c: c.post(f"{V1}/runs/{run}/checkpoints", json=body), live)
    seen = [(r.status_code, r.text[:200]) for r in responses]
    # one creates it; the others get the row (200) or lose the insert race and are told to retry (409)
    assert sorted(r.status_code for r in responses if r.status_code not in (200, 409)) == [201], seen
    assert all("retry" in r.json()["detail"] for r in responses if r.status_code == 409), seen
    ids = {r.json()["id"] for r in responses if r.status_code in (200, 201)}
    assert len(ids) == 1, seen
    with live.client() as c:
        retried = c.post(f"{V1}/runs/{run}/checkpoints", json=body)  # what a 409 asks the client to do
    assert retried.status_code == 200 and retried.json()["id"] in ids
    with live.client() as c:
        listed = c.get(f"{V1}/checkpoints", params={"run": run}).json()["items"]
    assert [(x["step"], x["state"], len(x["locations"])) for x in listed] == [(42, "pending", 1)]
