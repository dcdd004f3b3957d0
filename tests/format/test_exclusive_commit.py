"""Exactly one commit per step: concurrent saves of one step (a restarted job overlapping a
zombie of the old one), gc racing a save, and symlinks that must never lead out of a run root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.format.errors import CheckpointError, CheckpointExistsError, StorageError
from ckptd.format.run import Run, step_dir
from ckptd.format.writer import CheckpointWriter
from ckptd.storage import open_store
from tests import zygote

PROC = Path(__file__).parent / "race_save_proc.py"


def race(uri: str, trials: int, sync: Path, opts: dict[str, Any] | None) -> list[dict[str, Any]]:
    env = {**os.environ, "CKPTD_TEST_STORAGE_OPTIONS": json.dumps(opts)}
    procs = [
        zygote.spawn(
            ["-P", str(PROC), uri, str(me), str(trials), str(sync)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in (0, 1)
    ]
    lines = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return lines


@pytest.mark.parametrize("trials", [6, pytest.param(50, marks=pytest.mark.slow)])
# the S3 race in `make test-slow`; a second commit of a step on S3 is refused in the fast tier
# (tests/storage/test_store_conformance.py's round trip)
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.slow])])
def test_concurrent_saves_of_one_step_commit_exactly_once_and_never_mix(
    backend: str, trials: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        uri, opts = str(tmp_path / "run"), None
    else:
        uri, opts = request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")
    sync = tmp_path / "sync"
    sync.mkdir()
    results = race(uri, trials, sync, opts)
    run = Run(open_store(uri, opts))
    assert run.steps() == list(range(1, trials + 1))
    for step in range(1, trials + 1):
        outcome = sorted(r["result"] for r in results if r["step"] == step)
        assert outcome == ["committed", "exists"], (step, outcome)
        winner = next(r["me"] for r in results if r["step"] == step and r["result"] == "committed")
        state: dict[str, Any] = {"a": torch.empty(64, 32), "b": torch.empty(3000)}
        ckptd.load(state, uri, step=step, storage_options=opts)
        # all of the winner's data, none of the loser's
        assert torch.equal(state["a"], torch.full((64, 32), float(winner))), step
        assert torch.equal(state["b"], torch.full((3000,), float(winner))), step
        assert state["who"] == winner
        assert run.verify(step) == []


def test_a_second_commit_of_a_step_raises_exists_and_keeps_the_first(tmp_path: Path) -> None:
    leases = {t for t in threading.enumerate() if t.name == "ckptd-lease"}
    run = Run(open_store(str(tmp_path)))
    first = run.prepare(1)
    second = Run(open_store(str(tmp_path)))
    other = second.prepare(1)  # opened before the first commits: both attempts write
    for store, value, r in ((first, 1.0, run), (other, 2.0, second)):
        w = CheckpointWriter(store)
        w.add("x", torch.full((10,), value))
        if r is run:
            run.commit(1, [w.finish()], state={"x": {"$ckptd": "tensor", "path": "x"}})
        else:
            with pytest.raises(CheckpointExistsError):
                second.commit(1, [w.finish()], state={"x": {"$ckptd": "tensor", "path": "x"}})
            # the loser stops refreshing its lease (else gc could never collect it)
            assert not [t for t in threading.enumerate() if t.name == "ckptd-lease" and t not in leases]
    state: dict[str, Any] = {"x": torch.empty(10)}
    ckptd.load(state, str(tmp_path), step=1)
    assert torch.equal(state["x"], torch.full((10,), 1.0))


def _age_everything(root: Path, seconds: float) -> None:
    past = time.time() - seconds
    for p in [root, *root.rglob("*")]:
        os.utime(p, (past, past), follow_symlinks=False)


def test_gc_spares_an_attempt_whose_writer_holds_its_lease(tmp_path: Path) -> None:
    run = Run(open_store(str(tmp_path)))
    store = run.prepare(7)  # a live writer: its lease is refreshed while it works
    w = CheckpointWriter(store)
    w.add("x", torch.ones(100))
    report = w.finish()
    attempt = run.open_attempt(7)
    assert attempt is not None
    _age_everything(tmp_path / step_dir(7), 7200)  # the data is old ...
    lease = tmp_path / step_dir(7) / f"{attempt}.meta" / "lease"
    os.utime(lease)  # ... but the writer refreshed its lease just now
    assert run.gc_uncommitted(min_age_s=3600) == []
    assert (tmp_path / step_dir(7) / attempt / "x").exists()
    # the writer pauses for longer than --min-age: gc collects the attempt, lease first ...
    _age_everything(tmp_path / step_dir(7), 7200)
    assert run.gc_uncommitted(min_age_s=3600) == [7]
    assert not (tmp_path / step_dir(7)).exists()
    # ... and the writer, resuming, fails to commit instead of publishing deleted files
    with pytest.raises(CheckpointError, match="lease"):
        run.commit(7, [report], state={"x": {"$ckptd": "tensor", "path": "x"}})
    assert run.steps() == []


def test_gc_collects_losing_attempts_of_a_committed_step_but_never_the_winner(tmp_path: Path) -> None:
    ckptd.save({"x": torch.arange(5.0)}, str(tmp_path), step=3)
    loser = Run(open_store(str(tmp_path)))
    w = CheckpointWriter(loser.attempt_store(3, "a-00000000000000ff"))  # a zombie's late attempt
    w.add("x", torch.zeros(5))
    w.finish()
    _age_everything(tmp_path, 7200)
    assert Run(open_store(str(tmp_path))).gc_uncommitted(min_age_s=3600) == [3]
    assert not (tmp_path / step_dir(3) / "a-00000000000000ff").exists()
    state: dict[str, Any] = {"x": torch.empty(5)}
    ckptd.load(state, str(tmp_path), step=3)
    assert torch.equal(state["x"], torch.arange(5.0))


def test_no_operation_follows_a_symlinked_step_directory_out_of_the_run_root(tmp_path: Path) -> None:
    victim, attacker = tmp_path / "victim", tmp_path / "attacker"
    ckptd.save({"x": torch.ones(3)}, str(victim), step=5)
    attacker.mkdir()
    (attacker / step_dir(5)).symlink_to(victim / step_dir(5))
    run = Run(open_store(str(attacker)))
    with pytest.raises(StorageError, match="symbolic link"):
        run.delete(5)
    with pytest.raises(StorageError, match="symbolic link"):
        run.gc_uncommitted(min_age_s=0)
    out = subprocess.run(
        [sys.executable, "-m", "ckptd", "rm", str(attacker), "--step", "5"], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    # the other run root is untouched and still loads
    assert (victim / step_dir(5) / "manifest.json").exists()
    assert ckptd.open_run(str(victim)).verify(5) == []
