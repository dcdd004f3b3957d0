"""The catalog follows storage: checkpoints gone from storage are marked deleted by sync, and the
engine's rollback marks the steps it discarded deleted (``POST /runs/{run}/discard``), so that
``latest_step`` and ``latest`` name what can still be restored."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import add_checkpoint, make_run
from tests.api.test_sync import _write_real_checkpoint

V1 = "/api/v1"


def states(api: httpx.Client, run: str) -> dict[int, str]:
    items = api.get(f"{V1}/checkpoints", params={"run": run, "limit": 500}).json()["items"]
    return {c["step"]: c["state"] for c in items}


def test_sync_marks_checkpoints_gone_from_storage_deleted(api: httpx.Client, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    run = make_run(api, tmp_path)
    root = tmp_path / run
    for step in (1, 2, 3):
        _write_real_checkpoint(root, step, 1.0 / step)
    assert api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"}).json()["added"] == [1, 2, 3]
    assert api.get(f"{V1}/runs/{run}").json()["latest_step"] == 3
    shutil.rmtree(root / "step_0000000003")  # what a rollback or an operator's rm does
    report = api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"}).json()
    assert report["missing"] == [3] and report["deleted"] == [3]
    assert states(api, run) == {1: "committed", 2: "committed", 3: "deleted"}
    assert api.get(f"{V1}/runs/{run}").json()["latest_step"] == 2
    latest = api.get(f"{V1}/runs/{run}/resolve", params={"select": "latest"}).json()
    assert latest["checkpoint"]["step"] == 2
    # written again later: sync brings it back
    _write_real_checkpoint(root, 3, 0.1)
    assert api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"}).json()["added"] == [3]
    assert api.get(f"{V1}/runs/{run}").json()["latest_step"] == 3


def test_sync_keeps_a_checkpoint_another_tier_still_holds(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    assert (
        api.patch(
            f"{V1}/runs/{run}", json={"roots": {"local": str(tmp_path / run), "remote": f"s3://bucket/{run}"}}
        ).status_code
        == 200
    )
    (tmp_path / run).mkdir()
    locs = [
        {"tier": "local", "uri": str(tmp_path / run / "step_0000000005")},
        {"tier": "remote", "uri": f"s3://bucket/{run}/step_0000000005"},
    ]
    ckpt = add_checkpoint(api, run, 5, locations=locs)
    report = api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"}).json()
    assert report["missing"] == [5] and report["deleted"] == []
    after = api.get(f"{V1}/checkpoints/{ckpt['id']}").json()
    assert after["state"] == "committed" and [loc["tier"] for loc in after["locations"]] == ["remote"]


def test_sync_of_a_vanished_root_reports_but_marks_nothing(api: httpx.Client, tmp_path: Path) -> None:
    """An unmounted volume looks like an empty one: nothing is marked deleted on that evidence."""
    run = make_run(api, tmp_path)
    add_checkpoint(api, run, 1, root=tmp_path)
    shutil.rmtree(tmp_path / run)
    report = api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"}).json()
    assert report["missing"] == [1] and report["deleted"] == []
    assert states(api, run) == {1: "committed"}


def test_discard_marks_the_abandoned_steps_deleted(
    api: httpx.Client, anon: httpx.Client, tmp_path: Path
) -> None:
    run = make_run(api, tmp_path)
    for step in (2, 4, 6, 8):
        add_checkpoint(api, run, step, root=tmp_path)
    add_checkpoint(api, run, 10, root=tmp_path, commit=False)
    assert anon.post(f"{V1}/runs/{run}/discard", json={"after_step": 4}).status_code == 401
    r = api.post(f"{V1}/runs/{run}/discard", json={"after_step": 4})
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == [6, 8, 10]
    assert states(api, run) == {2: "committed", 4: "committed", 6: "deleted", 8: "deleted", 10: "deleted"}
    assert api.get(f"{V1}/runs/{run}").json()["latest_step"] == 4
    assert api.post(f"{V1}/runs/{run}/discard", json={"after_step": 4}).json()["deleted"] == []  # a retry
    # the new trajectory registers step 6 afresh
    again = api.post(f"{V1}/runs/{run}/checkpoints", json={"step": 6})
    assert again.status_code == 200 and again.json()["state"] == "pending"
