"""Aliases and selectors, rollback pointers, and retention GC against real directories."""

from __future__ import annotations

from pathlib import Path

import httpx

from ckptd.api.db import Database
from ckptd.api.models import Run
from tests.api.conftest import LiveServer, add_checkpoint, make_run

V1 = "/api/v1"


def test_selectors_and_aliases(api: httpx.Client) -> None:
    run = make_run(api)
    for step, loss, acc in [(10, 3.0, 0.1), (20, 1.0, 0.5), (30, 2.0, 0.9), (40, 1.0, 0.2)]:
        add_checkpoint(api, run, step, metrics={"val/loss": loss, "acc": acc})
    add_checkpoint(api, run, 50, commit=False, metrics={"val/loss": 0.1})  # pending: never selected

    def step_of(select: str) -> int:
        r = api.get(f"{V1}/runs/{run}/resolve", params={"select": select})
        assert r.status_code == 200, r.text
        return int(r.json()["checkpoint"]["step"])

    assert step_of("latest") == 40
    assert step_of("best:val/loss") == 40  # ties: the newest
    assert step_of("best:acc:max") == 30
    assert step_of("step:20") == 20
    assert api.get(f"{V1}/runs/{run}/aliases/best:acc").json()["checkpoint"]["step"] == 10
    assert api.get(f"{V1}/runs/{run}/resolve", params={"select": "step:50"}).status_code == 404
    assert api.get(f"{V1}/runs/{run}/resolve", params={"select": "best:nope"}).status_code == 404

    ckpt20 = api.get(f"{V1}/runs/{run}/resolve", params={"select": "step:20"}).json()["checkpoint"]
    assert api.put(f"{V1}/runs/{run}/aliases/golden", json={"checkpoint_id": ckpt20["id"]}).status_code == 200
    assert step_of("golden") == 20
    assert api.put(f"{V1}/runs/{run}/aliases/latest", json={"checkpoint_id": ckpt20["id"]}).status_code == 422
    names = [(a["name"], a["computed"]) for a in api.get(f"{V1}/runs/{run}/aliases").json()]
    assert names == [("latest", True), ("golden", False)]
    other = make_run(api)
    assert api.put(f"{V1}/runs/{other}/aliases/x", json={"checkpoint_id": ckpt20["id"]}).status_code == 422
    assert api.delete(f"{V1}/runs/{run}/aliases/golden").status_code == 204
    assert api.get(f"{V1}/runs/{run}/aliases/golden").status_code == 404


def test_rollback_pointer(api: httpx.Client) -> None:
    run = make_run(api)
    a = add_checkpoint(api, run, 100, metrics={"loss": 1.0})
    add_checkpoint(api, run, 200, metrics={"loss": 9.0})  # the loss spiked
    pending = add_checkpoint(api, run, 300, commit=False)
    assert api.get(f"{V1}/runs/{run}/rollback").json() is None
    r = api.post(f"{V1}/runs/{run}/rollback", json={"select": "best:loss", "reason": "loss spike"})
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"]["id"] == a["id"] and r.json()["reason"] == "loss spike"
    assert api.get(f"{V1}/runs/{run}/rollback").json()["checkpoint"]["step"] == 100
    assert api.post(f"{V1}/runs/{run}/rollback", json={"checkpoint_id": pending["id"]}).status_code == 409
    assert api.post(f"{V1}/runs/{run}/rollback", json={}).status_code == 422
    # acknowledging another checkpoint's rollback (an older request) leaves the current one alone
    assert api.delete(f"{V1}/runs/{run}/rollback", params={"checkpoint_id": a["id"] + 1}).status_code == 204
    assert api.get(f"{V1}/runs/{run}/rollback").json()["checkpoint"]["id"] == a["id"]
    assert api.delete(f"{V1}/runs/{run}/rollback", params={"checkpoint_id": a["id"]}).status_code == 204
    assert api.get(f"{V1}/runs/{run}/rollback").json() is None
    api.post(f"{V1}/runs/{run}/rollback", json={"checkpoint_id": a["id"]})
    assert api.delete(f"{V1}/runs/{run}/rollback").status_code == 204
    assert api.get(f"{V1}/runs/{run}/rollback").json() is None


def test_gc_preview_and_execution_delete_from_storage_then_mark(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path, retention={"keep_last": 2, "keep_best": {"metric": "loss", "n": 1}})
    ids = {}
    for step, loss in [(1, 5.0), (2, 0.5), (3, 4.0), (4, 3.0), (5, 2.0), (6, 1.5)]:
        ids[step] = add_checkpoint(api, run, step, root=tmp_path, metrics={"loss": loss})["id"]
    failed = add_checkpoint(api, run, 7, root=tmp_path, commit=False)
    api.patch(f"{V1}/checkpoints/{failed['id']}", json={"state": "failed"})
    api.put(f"{V1}/runs/{run}/aliases/keep-me", json={"checkpoint_id": ids[1]})
    plan = api.get(f"{V1}/runs/{run}/gc").json()
    assert sorted(e["step"] for e in plan["delete"]) == [3, 4, 7]
    assert {e["step"]: e["reason"] for e in plan["keep"]}[1] == "alias keep-me"
    assert (tmp_path / run / "step_0000000003").is_dir()  # a preview deletes nothing

    result = api.post(f"{V1}/runs/{run}/gc").json()
    assert sorted(e["step"] for e in result["deleted"]) == [3, 4, 7] and result["failed"] == []
    for step in (3, 4, 7):
        assert not (tmp_path / run / f"step_{step:010d}").exists()
    for step in (1, 2, 5, 6):
        assert (tmp_path / run / f"step_{step:010d}" / "manifest.json").is_file()
    gone = api.get(f"{V1}/checkpoints/{ids[3]}").json()
    assert gone["state"] == "deleted" and gone["locations"] == []
    assert api.get(f"{V1}/runs/{run}/gc").json()["delete"] == []


def test_gc_never_deletes_outside_the_run_root(api: httpx.Client, live: LiveServer, tmp_path: Path) -> None:
    run = make_run(api, tmp_path, retention={"keep_last": 1})
    old = add_checkpoint(api, run, 1, root=tmp_path)
    add_checkpoint(api, run, 2, root=tmp_path)
    other = tmp_path / "elsewhere"
    # the run has checkpoints: its root cannot be re-pointed through the API any more ...
    assert api.patch(f"{V1}/runs/{run}", json={"roots": {"local": str(other)}}).status_code == 409
    # ... but a catalog written before that rule may hold such a run: GC still refuses
    db = Database(live.database_url)
    with db.session() as s:
        s.get(Run, api.get(f"{V1}/runs/{run}").json()["id"]).roots = {"local": str(other)}  # type: ignore[union-attr]
    db.dispose()
    result = api.post(f"{V1}/runs/{run}/gc").json()
    assert [e["step"] for e in result["failed"]] == [1] and result["deleted"] == []
    assert (tmp_path / run / "step_0000000001" / "manifest.json").is_file()
    failed = api.get(f"{V1}/checkpoints/{old['id']}").json()
    assert failed["state"] == "failed" and "GC could not delete" in failed["error"]  # retried by the next GC
