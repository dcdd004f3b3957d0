"""The Checkpointer with a real REST catalog: registration, restore(select=...), in-place rollback,
and a catalog SIGKILLed during training that a sync reconciles afterwards."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from catalog_server import AUTH, TOKEN, ServeProcess, checkpoints, dead_url, thread_server, wait_for
from workload import assert_same, make, params, seed_all, train_step

import ckptd
from ckptd.engine import CatalogConfig

pytest.importorskip("fastapi")
V1 = "/api/v1"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("catalog") / "catalog.db"
    with thread_server(f"sqlite:///{db}") as url:
        yield url


@pytest.fixture
def api(catalog: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=catalog, headers=AUTH, timeout=10) as c:
        yield c


def new_root(tmp_path: Path) -> Path:
    return tmp_path / f"run-{uuid.uuid4().hex[:8]}"


def committed_steps(url: str, run: str) -> list[int]:
    return [c["step"] for c in checkpoints(url, run) if c["state"] == "committed"]


def test_checkpoints_are_registered_pending_then_committed(catalog: str, api: httpx.Client,
                                                            tmp_path: Path) -> None:
    root = new_root(tmp_path)
    state = make()
    seed_all(1)
    losses: dict[int, float] = {}
    link = CatalogConfig(url=catalog, token=TOKEN, poll_s=None)
    with ckptd.Checkpointer(str(root), state=state, every=2, catalog=link) as ck:
        for step in range(1, 7):
            losses[step] = train_step(state)
            ck.step(step, metrics={"loss": losses[step], "nan_metric": float("nan")})
            ck.wait()
    # close() drained the queue: everything is visible over REST now
    run = api.get(f"{V1}/runs/{root.name}").json()
    assert run["roots"] == {"local": str(root)}
    rows = checkpoints(catalog, root.name)
    assert [r["step"] for r in rows] == [2, 4, 6] == ckptd.open_run(str(root)).steps()
    by_id = {r["id"]: r["step"] for r in rows}
    for r in rows:
        manifest = ckptd.open_run(str(root)).manifest(r["step"])
        assert r["state"] == "committed"
        assert r["metrics"] == {"loss": pytest.approx(losses[r["step"]])}  # the NaN was left out
        assert r["locations"][0]["tier"] == "local"
        assert r["locations"][0]["uri"] == str(root / f"step_{r['step']:010d}")
        assert r["nbytes"] == manifest.nbytes
        assert r["layout_summary"]["arrays"] == len(manifest.arrays)
        assert r["created_at"] < r["committed_at"]  # registered pending before the manifest existed
        assert (by_id.get(r["parent_id"]) if r["parent_id"] else None) == (r["step"] - 2 or None)


def test_failed_checkpoint_is_registered_as_failed(catalog: str, tmp_path: Path) -> None:
    root = new_root(tmp_path)
    root.mkdir()
    (root / "step_0000000004").write_text("not a directory")  # the save of step 4 cannot prepare
    state = make()
    link = CatalogConfig(url=catalog, token=TOKEN, poll_s=None)
    ck = ckptd.Checkpointer(str(root), state=state, every=2, catalog=link)
    try:
        for step in range(1, 5):
            train_step(state)
            ck.step(step)
        with pytest.raises(ckptd.CheckpointError):
            ck.wait()
    finally:
        ck.close()
    rows = {r["step"]: r for r in checkpoints(catalog, root.name)}
    assert rows[2]["state"] == "committed"
    assert rows[4]["state"] == "failed" and "Not a directory" in rows[4]["error"]


def _train_with_metrics(root: Path, catalog: str, values: dict[int, float]) -> dict[int, dict[str, Any]]:
    state = make()
    seed_all(1)
    saved: dict[int, dict[str, Any]] = {}
    with ckptd.Checkpointer(str(root), state=state, every=2,
                            catalog=CatalogConfig(url=catalog, token=TOKEN, poll_s=None)) as ck:
        for step in range(1, max(values) + 1):
            train_step(state)
            ck.step(step, metrics={"loss": values[step]} if step in values else None)
            if step in values:
                saved[step] = params(state)
            ck.wait()
    return saved


def test_restore_select_best_alias_and_step(catalog: str, api: httpx.Client, tmp_path: Path) -> None:
    root = new_root(tmp_path)
    saved = _train_with_metrics(root, catalog, {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0})
    six = next(c for c in checkpoints(catalog, root.name) if c["step"] == 6)
    r = api.put(f"{V1}/runs/{root.name}/aliases/golden", json={"checkpoint_id": six["id"]})
    assert r.status_code == 200, r.text

    state = make(seed=5)
    with ckptd.Checkpointer(str(root), state=state, every=2,
                            catalog=CatalogConfig(url=catalog, token=TOKEN, poll_s=None)) as ck:
        assert ck.restore(select="best:loss") == 4
        assert_same(params(state), saved[4])
        assert ck.restore(select="best:loss:max") == 2
        assert ck.restore(select="golden") == 6
        assert_same(params(state), saved[6])
        assert ck.restore(select=8) == 8
        assert_same(params(state), saved[8])
        with pytest.raises(ckptd.CheckpointError, match="no committed checkpoint named 'nope'"):
            ck.restore(select="nope")

    # the catalog unreachable: best:<metric> and latest fall back to storage, an alias cannot
    state = make(seed=5)
    t0 = time.monotonic()
    with ckptd.Checkpointer(str(root), state=state, every=2, catalog=CatalogConfig(url=dead_url())) as ck:
        assert ck.restore(select="best:loss") == 4
        assert_same(params(state), saved[4])
        assert ck.restore() == 8
        with pytest.raises(ckptd.CheckpointError, match="unreachable"):
            ck.restore(select="golden")
    assert time.monotonic() - t0 < 15


def test_rollback_pointer_restores_in_place_and_training_continues(catalog: str, api: httpx.Client,
                                                                    tmp_path: Path) -> None:
    root = new_root(tmp_path)
    state = make()
    seed_all(1)
    losses: dict[int, float] = {}
    link = CatalogConfig(url=catalog, token=TOKEN, poll_s=0.1)
    with ckptd.Checkpointer(str(root), state=state, every=2, catalog=link) as ck:
        step = ck.restore()
        while step < 8:
            losses[step + 1] = train_step(state)
            step += 1
            ck.step(step, metrics={"loss": losses[step]})
            ck.wait()  # every due checkpoint reaches disk (a busy tier would skip to the newest)
            if step == 4:
                at_4 = params(state)
        wait_for(lambda: 4 in committed_steps(catalog, root.name), what="step 4 in the catalog")
        first_8 = ckptd.open_run(str(root)).manifest(8).checkpoint_id
        r = api.post(f"{V1}/runs/{root.name}/rollback", json={"select": "step:4", "reason": "loss spike"})
        assert r.status_code == 200, r.text

        # keep training: within a few polls a step boundary restores step 4 in place
        deadline = time.monotonic() + 20
        while ck.rolled_back is None:
            assert time.monotonic() < deadline, "the rollback was never applied"
            train_step(state)
            step += 1
            ck.step(step)
            time.sleep(0.02)
        assert ck.rolled_back == 4
        step = ck.rolled_back
        assert_same(params(state), at_4)
        assert state["data"]["position"] == 4 * 16
        while step < 8:  # continues from step 4 exactly as the first time (RNG states came back too)
            loss = train_step(state)
            step += 1
            assert loss == losses[step]
            ck.step(step, metrics={"loss": loss})
            assert ck.rolled_back is None
            ck.wait()
    run = ckptd.open_run(str(root))
    assert run.steps() == [2, 4, 6, 8]  # the abandoned steps after 8 are gone, 6 and 8 were saved again
    assert run.manifest(8).checkpoint_id != first_8
    assert api.get(f"{V1}/runs/{root.name}/rollback").json() is None  # acknowledged


def test_catalog_killed_during_training_then_sync_recovers_every_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ckptd.cli.main import main

    db_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    root = tmp_path / "killed-run"
    server = ServeProcess(db_url)
    try:
        state = make()
        seed_all(1)
        link = CatalogConfig(url=server.url, token=TOKEN, poll_s=0.2)
        caplog.set_level(logging.WARNING)
        t_close = 0.0
        with ckptd.Checkpointer(str(root), state=state, every=2, catalog=link) as ck:
            for step in range(1, 25):
                ck.step(step, metrics={"loss": train_step(state)})
                ck.wait()
                if step == 4:
                    wait_for(lambda: committed_steps(server.url, root.name) == [2, 4], what="steps 2 and 4")
                    server.kill()  # the catalog dies mid-run; training must not notice
            t_close = time.monotonic()
        assert time.monotonic() - t_close < 5  # close() does not wait for a dead catalog
    finally:
        server.kill()
    storage_steps = ckptd.open_run(str(root)).steps()
    assert storage_steps == list(range(2, 25, 2))
    outage = [r for r in caplog.records if r.name == "ckptd.engine.catalog" and "unreachable" in r.message]
    assert len(outage) == 1, [r.message for r in caplog.records]  # one warning for the whole outage
    assert not [r for r in caplog.records if r.name == "ckptd.wire.client" and r.levelno >= logging.WARNING]

    server = ServeProcess(db_url)  # restarted on the same database
    try:
        assert committed_steps(server.url, root.name) == [2, 4]
        assert main(["catalog", "sync", str(root), "--db", db_url]) == 0
        rows = checkpoints(server.url, root.name)
        assert [r["step"] for r in rows if r["state"] == "committed"] == storage_steps
        assert all(r["locations"][0]["uri"] == str(root / f"step_{r['step']:010d}") for r in rows)
    finally:
        server.kill()


def test_catalog_config_is_validated() -> None:
    with pytest.raises(ckptd.CheckpointError):
        CatalogConfig(url="localhost:8471")
    with pytest.raises(ckptd.CheckpointError):
        CatalogConfig(url="http://x", poll_s=0)
    assert ckptd.CheckpointerConfig(uri="/tmp/r", catalog="http://h:1").catalog == CatalogConfig(
        url="http://h:1")
