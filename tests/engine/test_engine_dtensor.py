"""DTensor states (FSDP2 x tensor parallel) under real gloo jobs: save at dp=2 x tp=2, restore anywhere.

The source job trains an FSDP2 x TP model (placements ``(_StridedShard(0, sf=2), Shard(0))``,
``(Shard(0), Shard(1))``, ``(Shard(0), Replicate())`` and a dp sub-mesh) with AdamW under
``ckptd.Checkpointer``; restores at dp=2 x tp=2, FSDP 4, FSDP 2 and in one process must be
bit-exact against ``full_tensor()`` and train on exactly like the layout's uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckptd
from tests.launch import launch as launch_job

WORKER = Path(__file__).parent / "workers" / "fsdp2_tp.py"
K, M = 3, 3


def launch(world: int, *args: str, timeout: float = 240) -> None:
    launch_job(["-P", str(WORKER), *args], world, timeout=timeout)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A checkpoint at step K of the dp=2 x tp=2 job, its full tensors and its losses."""
    base = tmp_path_factory.mktemp("fsdp2_tp")
    run, out = base / "run", base / "out"
    out.mkdir()
    launch(4, "source", str(run), str(out))
    return run, out


def _check_restore(out: Path, tag: str) -> dict[str, object]:
    full = torch.load(out / f"full-{K}.pt", weights_only=True)
    restored = torch.load(out / f"restored-{tag}.pt", weights_only=True)
    assert restored.keys() == full.keys()
    for key, want in full.items():
        assert torch.equal(restored[key], want), f"{tag}: {key} differs from full_tensor() at step {K}"
    report = json.loads((out / f"{tag}.json").read_text())
    assert report["start"] == K
    return dict(report)


@pytest.mark.distributed
@pytest.mark.slow  # the 4-rank dp x tp source job; test_lazy_snapshot_on_fsdp2 stays fast
def test_checkpoint_of_fsdp2_tp_records_global_arrays_and_layouts(source: tuple[Path, Path]) -> None:
    run, out = source
    placements = json.loads((out / "source.json").read_text())["placements"]
    assert placements["up.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["down.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["down.bias"] == "(Shard(dim=0), Replicate())"
    manifest = ckptd.open_run(str(run)).manifest(K)
    assert manifest.world_size == 4 and manifest.mesh == {"dp": 2, "tp": 2}
    up = manifest.arrays["train/model/up.weight"]
    assert up.shape == (22, 6)
    assert up.layout == ckptd.TensorLayout(partition=(("tp", "dp"), ()))  # TP first, then FSDP
    bias = manifest.arrays["train/model/down.bias"].layout
    assert bias == ckptd.TensorLayout(partition=(("dp",),), replicated=("tp",))
    # FSDP-only parameters live on the dp sub-mesh: copied over tp, written once
    norm = manifest.arrays["train/model/norm.weight"].layout
    assert norm == ckptd.TensorLayout(partition=(("dp",),), replicated=("tp",))
    full = torch.load(out / f"full-{K}.pt", weights_only=True)
    reader = ckptd.open_run(str(run)).reader(K)
    assert torch.equal(reader.read("train/model/up.weight"), full["model/up.weight"])
    assert torch.equal(reader.read("train/optim/state/down.weight/exp_avg_sq"),
                       full["optim/down.weight/exp_avg_sq"])


@pytest.mark.distributed
@pytest.mark.slow  # the 4-rank dp x tp source job; test_lazy_snapshot_on_fsdp2 stays fast
def test_restore_at_the_same_mesh_and_at_fsdp4(source: tuple[Path, Path]) -> None:
    run, out = source
    launch(4, "resume4", str(run), str(out))
    losses = json.loads((out / "source.json").read_text())["losses"]
    same = _check_restore(out, "dp2tp2")
    assert same["losses"] == losses[K:K + M]  # the uninterrupted dp=2 x tp=2 run, bit for bit
    fsdp4 = _check_restore(out, "fsdp4")
    assert fsdp4["losses"] == fsdp4["reference"]
    assert fsdp4["losses"] == pytest.approx(losses[K:K + M], rel=1e-5)  # another reduction order


@pytest.mark.distributed
@pytest.mark.slow  # the 4-rank dp x tp source job; test_lazy_snapshot_on_fsdp2 stays fast
def test_restore_at_fsdp2_and_sharded_save_load(source: tuple[Path, Path]) -> None:
    run, out = source
    launch(2, "resume2", str(run), str(out))
    fsdp2 = _check_restore(out, "fsdp2")
    assert fsdp2["losses"] == fsdp2["reference"]
    # ckptd.save / ckptd.load of DTensor states on 2 ranks, without a Checkpointer
    report = json.loads((out / "save_load.json").read_text())
    assert report == {"step": K, "note": "plain", "same": True}
    whole: dict[str, object] = {}
    ckptd.load(whole, str(out / "saved"))
    full = torch.load(out / f"full-{K}.pt", weights_only=True)
    train = whole["train"]
    assert isinstance(train, dict)
    assert torch.equal(train["model"]["up.weight"], full["model/up.weight"])
    assert torch.equal(train["optim"]["state"]["norm.bias"]["exp_avg"], full["optim/norm.bias/exp_avg"])


@pytest.mark.distributed
@pytest.mark.slow  # the 4-rank dp x tp source job; test_lazy_snapshot_on_fsdp2 stays fast
def test_restore_in_one_process_with_plain_tensors(source: tuple[Path, Path]) -> None:
    run, out = source
    launch(1, "resume1", str(run), str(out))
    one = _check_restore(out, "fsdp1")
    assert one["losses"] == one["reference"]


@pytest.mark.distributed
def test_lazy_snapshot_on_fsdp2_holds_pre_step_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch(2, "lazy", str(run), str(tmp_path))
    values = torch.load(tmp_path / "lazy.pt", weights_only=True)
    report = json.loads((tmp_path / "lazy.json").read_text())
    reader = ckptd.open_run(str(run)).reader(1)
    for key, before in values["before"].items():
        section, rest = key.split("/", 1)
        path = f"train/model/{rest}" if section == "model" else f"train/optim/state/{rest}"
        saved = reader.read(path)
        assert torch.equal(saved, before), key
        if not rest.endswith("/step"):
            assert not torch.equal(saved, values["after"][key]), f"{key}: the optimizer step changed nothing"
    # the copies were still in flight when the optimizer stepped: its pre-step hook waited for them
    assert report["hook_wait_s"] > 0
    assert "Partial" in report["partial"] and "reduce it first" in report["partial"]
