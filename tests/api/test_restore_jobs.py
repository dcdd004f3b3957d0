"""Restore plans (boxes from ckptd.format.layout) and conversion jobs (a real converter callable)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckptd.format.layout import TensorLayout, mesh_coords
from tests.api.conftest import add_checkpoint, layout, make_run

V1 = "/api/v1"


def test_restore_plan_matches_the_format_layout_for_every_rank(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    ckpt = add_checkpoint(api, run, 100, root=tmp_path, layout=layout({"dp": 2, "tp": 2}))
    plan = api.get(f"{V1}/checkpoints/{ckpt['id']}/restore-plan", params={"tp": 4, "dp": 2}).json()
    assert plan["target_mesh"] == {"pp": 1, "dp": 2, "tp": 4} and len(plan["ranks"]) == 8
    base = ckpt["locations"][0]["uri"]
    weight = TensorLayout.from_json({"partition": [["tp"], []]})
    for rank in plan["ranks"]:
        coords = mesh_coords({"pp": 1, "dp": 2, "tp": 4}, rank["rank"], ["pp", "dp", "tp"])
        assert rank["coords"] == coords
        reads = {r["array"]: r for r in rank["reads"]}
        assert set(reads) == {"model/emb.weight", "model/ln.bias", "model/head.weight"}
        box = weight.box_for([8, 4], {"pp": 1, "dp": 2, "tp": 4}, coords)
        assert reads["model/emb.weight"]["box"] == {"offset": list(box.offset), "shape": list(box.shape)}
        assert reads["model/emb.weight"]["nbytes"] == 16  # 2 rows x 4 bf16
        assert reads["model/ln.bias"]["box"] == {"offset": [0], "shape": [4]}
        assert reads["model/head.weight"]["uri"] == f"{base}/model/emb.weight"  # tied: stored once
    one = api.get(f"{V1}/checkpoints/{ckpt['id']}/restore-plan", params={"tp": 4, "dp": 2, "rank": 5}).json()
    assert [r["rank"] for r in one["ranks"]] == [5]
    assert (
        api.get(f"{V1}/checkpoints/{ckpt['id']}/restore-plan", params={"tp": 2, "rank": 2}).status_code == 422
    )
    assert api.get(f"{V1}/checkpoints/{ckpt['id']}/restore-plan", params={"tp": 0}).status_code == 422


def test_restore_plan_needs_a_committed_persistent_checkpoint(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    pending = add_checkpoint(api, run, 1, root=tmp_path, commit=False, layout=layout())
    assert api.get(f"{V1}/checkpoints/{pending['id']}/restore-plan").status_code == 409
    memory_only = add_checkpoint(
        api, run, 2, layout=layout(), locations=[{"tier": "memory", "uri": "memory://host/pid"}]
    )
    assert api.get(f"{V1}/checkpoints/{memory_only['id']}/restore-plan").status_code == 409
    assert api.get(f"{V1}/checkpoints/2147483647/restore-plan").status_code == 404


def _wait(api: httpx.Client, job_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"{V1}/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_conversion_job_runs_the_converter_in_the_background(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    ckpt = add_checkpoint(api, run, 100, root=tmp_path, layout=layout())
    r = api.post(f"{V1}/checkpoints/{ckpt['id']}/convert", json={"tp": 4, "pp": 1, "dp": 1})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    assert r.json()["output_uri"] == str(tmp_path / run / "converted" / "step100-tp4-pp1-dp1")
    job = _wait(api, r.json()["id"])
    assert job["status"] == "succeeded" and job["started_at"] and job["finished_at"]
    report = json.loads(Path(job["result"]["written"]).read_text())
    assert report["mesh"] == {"tp": 4, "pp": 1, "dp": 1} and len(report["arrays"]) == 3

    bad = api.post(f"{V1}/checkpoints/{ckpt['id']}/convert", json={"tp": 3}).json()
    failed = _wait(api, bad["id"])
    assert failed["status"] == "failed" and "tp=3" in failed["error"]


@pytest.mark.parametrize("body", [{"tp": 0}, {"tp": 2000}, {"tier": "memory"}, {"output": "/etc"}])
def test_conversion_request_is_validated(api: httpx.Client, tmp_path: Path, body: dict[str, Any]) -> None:
    run = make_run(api, tmp_path)
    ckpt = add_checkpoint(api, run, 1, root=tmp_path, layout=layout())
    assert api.post(f"{V1}/checkpoints/{ckpt['id']}/convert", json=body).status_code == 422


def test_conversion_of_uncommitted_checkpoint_is_refused(api: httpx.Client, tmp_path: Path) -> None:
    run = make_run(api, tmp_path)
    ckpt = add_checkpoint(api, run, 1, root=tmp_path, commit=False, layout=layout())
    assert api.post(f"{V1}/checkpoints/{ckpt['id']}/convert", json={"tp": 2}).status_code == 409
