"""Rank state of a real 2-rank gloo save: one Zarr v3 array that zarr-python opens, and an older v2
checkpoint (per-rank JSON objects) that a job of the same world size still resumes from bit-exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ckptd.format.commit_record import encode_rank_state, rank_key
from ckptd.format.rank_array import ROW_BYTES, rank_chunk_key
from ckptd.format.run import Run, step_dir
from ckptd.format.strict_json import dumps_sealed
from ckptd.storage import LocalStore
from tests.launch import launch as launch_job

WORKER = Path(__file__).parent / "workers" / "dist_train.py"
STEPS, CRASH_AT, EVERY = 9, 7, 3
WORLD = 2
START = CRASH_AT // EVERY * EVERY  # the newest committed step when the job crashes


def launch(mode: str, run: Path, out: Path) -> None:
    launch_job(["-P", str(WORKER), mode, str(run), str(out), str(STEPS), str(CRASH_AT), str(EVERY)], WORLD,
               timeout=180)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gloo job's run (checkpoints at steps 3 and 6, then a crash) and its reference outputs."""
    base = tmp_path_factory.mktemp("rankarray")
    run, out = base / "run", base / "out"
    out.mkdir()
    launch("reference_then_crash", run, out)
    return run, out


@pytest.mark.distributed
def test_zarr_python_reads_each_ranks_row_of_a_gloo_save(saved: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(saved[0], run_dir)  # this test deletes a chunk: not in the shared run
    run = Run(LocalStore(run_dir))
    m = run.manifest(START)
    assert (m.rank_state, m.world_size) == ("array", WORLD)
    arr = zarr.open_array(str(run_dir / step_dir(START) / f"{m.attempt}.meta" / "ranks"), mode="r")
    assert arr.shape == (WORLD, ROW_BYTES)
    for rank in range(WORLD):
        doc = json.loads(np.asarray(arr[rank]).tobytes().rstrip(b"\0"))
        assert (doc["format"], doc["attempt"], doc["rank"]) == ("ckptd-rank", m.attempt, rank)
        assert doc["state"] == run.rank_state(START, rank, m)
        assert set(doc["state"]["rng"]) >= {"torch"}  # the RNG states the resume relies on
    rows = [np.asarray(arr[r]).tobytes() for r in range(WORLD)]
    assert rows[0] != rows[1]  # each rank's own generator state (seeded by rank)
    # a rank whose chunk is absent saved nothing: zarr reads the fill value, ckptd reads None
    (run_dir / step_dir(START) / rank_chunk_key(m.attempt, 1)).unlink()
    assert not np.any(zarr.open_array(str(run_dir / step_dir(START) / f"{m.attempt}.meta" / "ranks"),
                                      mode="r")[1])
    assert run.rank_state(START, 1, m) is None


def to_older_v2(step_path: Path) -> None:
    """Rewrite a committed checkpoint the way format v2.0 kept rank state: one JSON object per rank
    (``encode_rank_state``) and ``"rank_state": true`` in the re-sealed commit record."""
    record_path = step_path / "manifest.json"
    record = json.loads(record_path.read_bytes())
    run = Run(LocalStore(step_path.parent))
    step = int(step_path.name.removeprefix("step_"))
    m = run.manifest(step)
    states = [run.rank_state(step, r, m) for r in range(WORLD)]
    shutil.rmtree(step_path / f"{m.attempt}.meta" / "ranks")
    for rank, state in enumerate(states):
        assert state is not None
        obj = step_path / rank_key(m.attempt, rank)
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(encode_rank_state(m.attempt, rank, state))
    del record["crc32c"]
    record["rank_state"] = True
    record_path.write_bytes(dumps_sealed(record))


@pytest.mark.distributed
def test_an_older_v2_checkpoint_with_json_rank_objects_still_resumes_bit_exactly(
        saved: tuple[Path, Path], tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(saved[0], run)
    shutil.copytree(saved[1], out)
    for step_path in run.glob("step_*"):
        to_older_v2(step_path)
    assert Run(LocalStore(run)).manifest(START).rank_state is True
    launch("resume", run, out)
    for rank in range(WORLD):
        ref = json.loads((out / f"ref-{rank}.json").read_text())
        res = json.loads((out / f"resume-{rank}.json").read_text())
        assert res["start"] == START
        # the losses depend on each rank's RNG (dropout, sampling): equal only if it was restored
        assert res["losses"] == ref["losses"][START:], f"rank {rank}"
        a = torch.load(out / f"ref-{rank}.pt", weights_only=True)
        b = torch.load(out / f"resume-{rank}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), f"rank {rank}"
