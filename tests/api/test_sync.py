"""Reconciling the catalog from storage: JSON manifest fixtures, real checkpoints, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckptd.api.db import Database
from ckptd.api.services.sync import ManifestRecord, reconcile
from ckptd.cli.main import main
from tests.api.conftest import FreshDatabases, add_checkpoint, make_run, unique

V1 = "/api/v1"


def manifest(step: int, **metadata: Any) -> dict[str, Any]:
    return {
        "format": "ckptd",
        "step": step,
        "created_at": "2026-01-01T00:00:00Z",
        "mesh": {"tp": 2},
        "nbytes": 64,
        "arrays": {
            "model/w": {
                "dtype": "float32",
                "shape": [4, 4],
                "layout": {"partition": [["tp"], []]},
                "nbytes": 64,
            }
        },
        "metadata": metadata,
    }


def test_reconcile_from_json_fixtures(databases: FreshDatabases, tmp_path: Path) -> None:
    db = Database(databases.new())
    db.upgrade()
    root = str(tmp_path / "runA")
    records = [
        ManifestRecord(s, f"{root}/step_{s:010d}", manifest(s, metrics={"loss": 1.0 / (s + 1)}, tags=["t"]))
        for s in (10, 20, 30)
    ]
    hostile = ManifestRecord(40, "/etc/passwd-dir", manifest(40))
    nonfinite = ManifestRecord(50, f"{root}/step_0000000050", manifest(50, metrics={"loss": float("inf")}))
    with db.session() as s:
        report = reconcile(
            s, run_name="runA", tier="local", root=root, records=[*records, hostile, nonfinite]
        )
    assert report.added == [10, 20, 30, 50] and list(report.rejected) == ["40"]
    with db.session() as s:
        again = reconcile(s, run_name="runA", tier="local", root=root, records=records[:2])
    assert again.unchanged == [10, 20] and again.missing == [30, 50]
    db.dispose()


def _write_real_checkpoint(root: Path, step: int, loss: float) -> None:
    import torch

    from ckptd.format.run import Run
    from ckptd.format.writer import CheckpointWriter
    from ckptd.storage import open_store

    run = Run(open_store(str(root), fsync=False))
    writer = CheckpointWriter(run.prepare(step), rank=0, threads=1)
    writer.add("model/w", torch.arange(16, dtype=torch.float32).reshape(4, 4))
    run.commit(step, [writer.finish()], state={}, metadata={"metrics": {"loss": loss}, "tags": ["real"]})


def test_catalog_down_then_sync_recovers_every_committed_checkpoint(
    api: httpx.Client, tmp_path: Path
) -> None:
    """The engine could register step 1 but the catalog was down for steps 2 and 3: sync fills the gap."""
    pytest.importorskip("torch")
    run = make_run(api, tmp_path)
    root = tmp_path / run
    pending = add_checkpoint(
        api, run, 1, commit=False, locations=[{"tier": "local", "uri": str(root / "step_0000000001")}]
    )
    for step, loss in [(1, 3.0), (2, 2.0), (3, 1.0)]:
        _write_real_checkpoint(root, step, loss)
    (root / "step_0000000004").mkdir()  # a crashed attempt: no manifest, not a checkpoint
    r = api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"})
    assert r.status_code == 200, r.text
    assert (r.json()["added"], r.json()["committed"]) == ([2, 3], [1])
    assert api.get(f"{V1}/checkpoints/{pending['id']}").json()["state"] == "committed"
    best = api.get(f"{V1}/runs/{run}/resolve", params={"select": "best:loss"}).json()["checkpoint"]
    assert best["step"] == 3 and best["tags"] == ["real"] and best["layout_summary"]["arrays"] == 1
    plan = api.get(f"{V1}/checkpoints/{best['id']}/restore-plan").json()
    assert plan["ranks"][0]["reads"][0]["uri"] == f"{root}/step_0000000003/model/w"


def test_cli_db_upgrade_and_catalog_sync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "upgrade", "--db", url]) == 0
    assert "revision 0003" in capsys.readouterr().out
    name = unique()
    _write_real_checkpoint(tmp_path / name, 7, 0.25)
    assert main(["catalog", "sync", str(tmp_path / name), "--db", url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"] == name and report["tier"] == "local" and report["added"] == [7]
    assert main(["catalog", "sync", "/no/../escape", "--db", url]) == 2  # refused before touching storage


def test_default_converter_reshards_a_real_checkpoint(databases: FreshDatabases, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tests.api.conftest import AUTH, start_server

    live, stop = start_server(databases.new())  # the default converter: ckptd.converters.reshard
    try:
        with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as api:
            run = make_run(api, tmp_path)
            _write_real_checkpoint(tmp_path / run, 5, 1.0)
            assert api.post(f"{V1}/runs/{run}/sync", json={"tier": "local"}).json()["added"] == [5]
            ckpt = api.get(f"{V1}/runs/{run}/resolve", params={"select": "latest"}).json()["checkpoint"]
            job = api.post(f"{V1}/checkpoints/{ckpt['id']}/convert", json={"tp": 2}).json()
            for _ in range(400):
                job = api.get(f"{V1}/jobs/{job['id']}").json()
                if job["status"] in ("succeeded", "failed"):
                    break
                time.sleep(0.05)
            assert job["status"] == "succeeded", job
            out = Path(job["result"]["uri"])
            assert job["result"]["arrays"] == 1
            # the converted checkpoint holds the source's bits in the requested layout
            import torch

            from ckptd.format.run import Run
            from ckptd.storage import open_store

            converted = Run(open_store(str(out.parent)))
            assert converted.steps() == [5] and converted.manifest(5).mesh["tp"] == 2
            assert converted.verify(5) == []
            want = torch.arange(16, dtype=torch.float32).reshape(4, 4)
            assert torch.equal(converted.reader(5).read("model/w"), want)
    finally:
        stop()
