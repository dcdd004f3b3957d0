"""Runs and checkpoints over HTTP: registration, the state machine, validation, lists."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.conftest import add_checkpoint, layout, make_run, unique

V1 = "/api/v1"


def test_run_registration_is_idempotent_and_roots_cannot_be_redirected(
    api: httpx.Client, tmp_path: Path
) -> None:
    name = unique()
    first = api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(tmp_path / name)}})
    assert first.status_code == 201
    again = api.post(f"{V1}/runs", json={"name": name})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    moved = api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(tmp_path / "other")}})
    assert moved.status_code == 409
    outside = api.post(f"{V1}/runs", json={"name": name, "roots": {"local": "/etc"}})
    assert outside.status_code == 422  # not under an allowed prefix of the server
    added = api.post(f"{V1}/runs", json={"name": name, "roots": {"remote": f"s3://bucket/{name}"}})
    assert added.status_code == 200
    assert added.json()["roots"] == {"local": str(tmp_path / name), "remote": f"s3://bucket/{name}"}


@pytest.mark.parametrize("bad", ["", "..", "a/b", ".hidden", "x" * 201, "name with space", "manifest.json"])
def test_unsafe_run_names_are_refused(api: httpx.Client, bad: str) -> None:
    assert api.post(f"{V1}/runs", json={"name": bad}).status_code == 422


@pytest.mark.parametrize(
    "root",
    ["relative/path", "/data/../etc", "http://evil/x", "s3://user:pw@bucket/x", "s3://b/x?y=1", "/a//b"],
)
def test_unsafe_roots_are_refused(api: httpx.Client, root: str) -> None:
    assert api.post(f"{V1}/runs", json={"name": unique(), "roots": {"local": root}}).status_code == 422


def test_checkpoint_lifecycle(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    uri = str(tmp_path / run / "step_0000000100")
    body = {
        "step": 100,
        "locations": [{"tier": "local", "uri": uri}, {"tier": "memory", "uri": "memory://host-1/pid-7"}],
        "layout": layout(),
        "metrics": {"loss": 2.5},
        "tags": ["warmup"],
    }
    created = api.post(f"{V1}/runs/{run}/checkpoints", json=body)
    assert created.status_code == 201, created.text
    ckpt = created.json()
    assert ckpt["state"] == "pending"
    assert ckpt["layout_summary"] == {
        "mesh": {"dp": 2, "tp": 2},
        "arrays": 3,
        "dtypes": {"bfloat16": 2, "float32": 1},
    }
    assert api.post(f"{V1}/runs/{run}/checkpoints", json=body).status_code == 200  # an engine retry
    committed = api.patch(
        f"{V1}/checkpoints/{ckpt['id']}",
        json={"state": "committed", "nbytes": 144, "metrics": {"val_loss": 3.0}},
    )
    assert committed.status_code == 200
    doc = committed.json()
    assert doc["state"] == "committed" and doc["committed_at"] and doc["nbytes"] == 144
    assert doc["metrics"] == {"loss": 2.5, "val_loss": 3.0}
    assert {loc["tier"] for loc in doc["locations"]} == {"local", "memory"}
    assert (
        api.patch(f"{V1}/checkpoints/{ckpt['id']}", json={"state": "committed"}).status_code == 200
    )  # retry
    assert api.patch(f"{V1}/checkpoints/{ckpt['id']}", json={"state": "failed"}).status_code == 409
    child = add_checkpoint(api, run, 200, root=tmp_path, parent_step=100)
    lineage = api.get(f"{V1}/checkpoints/{child['id']}/lineage").json()
    assert [c["step"] for c in lineage] == [200, 100]
    run_doc = api.get(f"{V1}/runs/{run}").json()
    assert (run_doc["checkpoints"], run_doc["committed"], run_doc["latest_step"]) == (2, 2, 200)


def test_failed_attempt_can_be_registered_again(api: httpx.Client) -> None:
    run = make_run(api)
    ckpt = add_checkpoint(api, run, 5, commit=False)
    failed = api.patch(f"{V1}/checkpoints/{ckpt['id']}", json={"state": "failed", "error": "rank 3 died"})
    assert failed.json()["error"] == "rank 3 died"
    again = api.post(f"{V1}/runs/{run}/checkpoints", json={"step": 5})
    assert again.status_code == 200 and again.json()["state"] == "pending" and again.json()["error"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"step": -1},
        '{"step": 1, "metrics": {"loss": 1e999}}',
        '{"step": 1, "metrics": {"loss": NaN}}',
        {"step": 1, "metrics": {"bad name!": 1.0}},
        {"step": 1, "tags": ["has space"]},
        {"step": 1, "tags": ["t"] * 51},
        {"step": 1, "locations": [{"tier": "local", "uri": "/somewhere/else"}]},
        {"step": 1, "locations": [{"tier": "disk", "uri": "/x"}]},
        {"step": 1, "layout": {"arrays": {"../escape": {"dtype": "float32", "shape": [1]}}}},
        {
            "step": 1,
            "layout": {"arrays": {"w": {"dtype": "float32", "shape": [4], "layout": {"partition": "tp"}}}},
        },
        {"step": 1, "unknown": True},
    ],
)
def test_invalid_checkpoint_fields_are_refused(api: httpx.Client, tmp_path: Path, body: object) -> None:
    run = make_run(api, tmp_path)
    url = f"{V1}/runs/{run}/checkpoints"
    if isinstance(body, str):  # non-finite numbers: no JSON encoder writes them, a hostile client can
        r = api.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        r = api.post(url, json=body)
    assert r.status_code == 422, r.text


def test_list_filters_sorts_and_pages_without_gaps(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    for step in range(0, 23):
        add_checkpoint(
            api,
            run,
            step,
            root=tmp_path if step % 2 == 0 else None,
            commit=step % 5 != 0,
            metrics={"loss": 10.0 - step * 0.1 if step != 7 else 0.5},
            tags=["even"] if step % 2 == 0 else [],
        )
    seen: list[int] = []
    cursor = None
    while True:
        params = {"run": run, "sort": "step", "limit": 4, **({"cursor": cursor} if cursor else {})}
        page = api.get(f"{V1}/checkpoints", params=params).json()
        seen += [c["step"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(23))
    pending = api.get(f"{V1}/checkpoints", params={"run": run, "state": "pending", "sort": "-step"}).json()
    assert [c["step"] for c in pending["items"]] == [20, 15, 10, 5, 0]
    even = api.get(
        f"{V1}/checkpoints",
        params={"run": run, "tag": "even", "tier": "local", "min_step": 10, "max_step": 14, "sort": "step"},
    ).json()
    assert [c["step"] for c in even["items"]] == [10, 12, 14]
    best_first = api.get(f"{V1}/checkpoints", params={"run": run, "sort": "metric:loss", "limit": 2}).json()
    assert [c["step"] for c in best_first["items"]] == [7, 22]
    nxt = api.get(
        f"{V1}/checkpoints",
        params={"run": run, "sort": "metric:loss", "limit": 2, "cursor": best_first["next_cursor"]},
    ).json()
    assert [c["step"] for c in nxt["items"]] == [21, 20]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"cursor": "not-a-cursor"},
        {"sort": "password"},
        {"cursor": "WyJ4IiwxXQ"},
    ],
)
def test_bad_list_parameters_are_422(api: httpx.Client, params: dict[str, object]) -> None:
    assert api.get(f"{V1}/checkpoints", params=params).status_code == 422


def test_runs_list_pages_by_name(api: httpx.Client) -> None:
    prefix = unique("page")
    names = sorted(f"{prefix}-{i}" for i in range(5))
    for n in names:
        api.post(f"{V1}/runs", json={"name": n})
    got: list[str] = []
    cursor = None
    while True:
        params = {"name_prefix": prefix, "sort": "name", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get(f"{V1}/runs", params=params).json()
        got += [r["name"] for r in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert got == names


def test_mutations_need_the_token(anon: httpx.Client, api: httpx.Client) -> None:
    run = make_run(api)
    wrong = {"Authorization": "Bearer wrong-token-wrong-token"}
    assert anon.post(f"{V1}/runs", json={"name": unique()}).status_code == 401
    assert anon.post(f"{V1}/runs", json={"name": unique()}, headers=wrong).status_code == 401
    assert anon.post(f"{V1}/runs/{run}/checkpoints", json={"step": 1}).status_code == 401
    assert anon.post(f"{V1}/runs/{run}/gc").status_code == 401
    assert anon.get(f"{V1}/runs/{run}").status_code == 200  # reads are open


def test_health_metrics_and_schema(api: httpx.Client) -> None:
    health = api.get("/healthz").json()
    assert health["status"] == "ok" and health["schema_revision"] == "0003"
    api.get(f"{V1}/runs")
    text = api.get("/metrics").text
    assert 'ckptd_http_requests_total{method="GET",route="/api/v1/runs",status="200"}' in text
    assert 'ckptd_catalog_checkpoints{state="committed"}' in text
    paths = api.get("/openapi.json").json()["paths"]
    assert all(p.startswith("/api/v1/") or p in ("/healthz", "/metrics") for p in paths)
    assert "/api/v1/checkpoints/{checkpoint_id}/restore-plan" in paths
