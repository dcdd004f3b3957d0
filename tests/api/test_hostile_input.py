"""Hostile strings, cursors and selectors are 422s that store nothing, and an optional Host allow-list
stops DNS rebinding."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import AUTH, FreshDatabases, add_checkpoint, make_run, start_server, unique

V1 = "/api/v1"


def cursor(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def raw_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "config",
    ['{"\\ud800": 1}', '{"k": "\\udfff"}', '{"k": ["ok", {"deep": "a\\ud83d"}]}'],
    ids=["key", "value", "nested"],
)
def test_lone_surrogates_are_refused_and_nothing_is_stored(api: httpx.Client, config: str) -> None:
    name = unique()
    body = f'{{"name": "{name}", "config": {config}}}'
    r = api.post(f"{V1}/runs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert api.get(f"{V1}/runs/{name}").status_code == 404
    listing = api.get(f"{V1}/runs", params={"limit": 500})
    assert listing.status_code == 200
    assert api.get("/").status_code == 200


def test_surrogates_in_other_strings_are_refused(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    ckpt = add_checkpoint(api, run, 1, root=tmp_path, commit=False)
    bodies = [
        (f"{V1}/checkpoints/{ckpt['id']}", "PATCH", '{"state": "failed", "error": "bad \\udc80 bytes"}'),
        (f"{V1}/runs/{run}/rollback", "POST", '{"select": "latest", "reason": "\\ud800"}'),
        (f"{V1}/runs/{run}", "PATCH", '{"config": {"a": "\\ud800"}}'),
    ]
    for url, method, body in bodies:
        r = api.request(method, url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (url, r.status_code, r.text)
    assert api.get(f"{V1}/checkpoints/{ckpt['id']}").json()["state"] == "pending"


@pytest.mark.parametrize(
    ("sort", "bad"),
    [
        ("step", cursor([2**70, 1])),
        ("step", cursor([1, 2**70])),
        ("step", cursor([1, -(2**70)])),
        ("nbytes", cursor([-(2**64), 1])),
        ("created_at", cursor(["2026-01-01T00:00:00", 1])),  # naive: which time zone?
        ("created_at", cursor(["9999-12-31T23:59:59-23:59", 1])),  # past year 9999 in UTC
        ("created_at", cursor(["0001-01-01T00:00:00+23:59", 1])),
        ("metric:loss", raw_cursor("[NaN, 1]")),
        ("metric:loss", raw_cursor("[1e999, 1]")),
        ("id", raw_cursor("[" * 57 + "1" + "]" * 57 + ", 1]")),
        ("step", "!!not base64!!"),
        ("step", cursor({"a": 1})),
        ("step", raw_cursor('["\\ud800", 1]')),
    ],
)
def test_every_bad_checkpoint_cursor_is_a_422(api: httpx.Client, tmp_path: Path, sort: str, bad: str) -> None:
    run = make_run(api, tmp_path)
    add_checkpoint(api, run, 1, root=tmp_path, metrics={"loss": 1.0})
    for params in ({"run": run, "sort": sort, "cursor": bad}, {"sort": sort, "cursor": bad}):
        r = api.get(f"{V1}/checkpoints", params=params)
        assert r.status_code == 422, (params, r.status_code, r.text)


@pytest.mark.parametrize(
    ("sort", "bad"),
    [
        ("created_at", cursor(["2026-01-01T00:00:00", 1])),
        ("-created_at", cursor(["2026-01-01T00:00:00+00:00", 2**64])),
        ("name", cursor(["\ud800", 1])),
        ("name", raw_cursor('["\\udfff", 1]')),
        ("name", cursor(["a", 2**40])),
    ],
)
def test_every_bad_run_cursor_is_a_422(api: httpx.Client, sort: str, bad: str) -> None:
    r = api.get(f"{V1}/runs", params={"sort": sort, "cursor": bad})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("digits", ["9" * 19, "9" * 20, "1" + "0" * 40, "9223372036854775808"])
def test_huge_step_selectors_are_a_422(api: httpx.Client, tmp_path: Path, digits: str) -> None:
    run = make_run(api, tmp_path)
    add_checkpoint(api, run, 1, root=tmp_path)
    select = f"step:{digits}"
    assert api.get(f"{V1}/runs/{run}/resolve", params={"select": select}).status_code == 422
    assert api.get(f"{V1}/runs/{run}/aliases/{select}").status_code == 422
    assert api.post(f"{V1}/runs/{run}/rollback", json={"select": select}).status_code == 422
    assert api.get(f"{V1}/runs/{run}/resolve", params={"select": "step:1"}).status_code == 200


def test_allowed_hosts_stop_dns_rebinding(databases: FreshDatabases) -> None:
    live, stop = start_server(databases.new(), settings={"allowed_hosts": ("catalog.internal", "127.0.0.1")})
    try:
        with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as api:
            assert api.get("/healthz").status_code == 200  # Host: 127.0.0.1:<port>
            rebound = api.get("/api/v1/runs", headers={"Host": "attacker.example"})
            assert rebound.status_code == 400
            named = api.get("/healthz", headers={"Host": "catalog.internal:8471"})
            assert named.status_code == 200
    finally:
        stop()


def test_without_allowed_hosts_any_host_is_served(anon: httpx.Client) -> None:
    assert anon.get("/healthz", headers={"Host": "whatever.example"}).status_code == 200
