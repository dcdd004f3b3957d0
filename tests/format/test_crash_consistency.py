"""A writer SIGKILLed at a random point while saving step N+1 (after committing step N) never leaves
a checkpoint that lists as committed but fails verification, and step N always verifies and loads
bit-exactly. Local disk and S3; a ~10-run version always runs, the 50+-run campaign is ``slow``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crash_save_proc import make_state
from fmt_helpers import assert_tree_equal

import ckptd
from ckptd.format import Run
from ckptd.format.run import step_dir
from ckptd.storage import open_store
from tests import zygote

PROC = Path(__file__).with_name("crash_save_proc.py")
STEP_N = 7
BATCH = 6  # victims start (import torch) in parallel, then are killed one by one


@dataclass
class Tally:
    runs: int = 0
    killed_mid_save: int = 0  # the victim was still running when the signal went out
    partial_left: int = 0  # N+1 left uncommitted with some of its objects written
    committed: int = 0  # the kill came after the commit
    delays: list[float] = field(default_factory=list)


def _spawn(uri: str, step: int, seed: int, opts: dict[str, Any] | None, cwd: Path) -> subprocess.Popen[str]:
    args = ["-P", str(PROC), uri, str(step), str(seed)]
    if opts is not None:
        args.append(json.dumps(opts))
    # a fork of the warm test zygote (tests/zygote.py): a real process, without torch's import each kill
    p: subprocess.Popen[str] = zygote.spawn(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, cwd=cwd)
    return p


def _await_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        err = p.stderr.read() if p.stderr else ""
        pytest.fail(f"victim did not start: {line!r}\n{err}")


def _go(p: subprocess.Popen[str]) -> float:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    return time.perf_counter()


def _check_run(uri: str, opts: dict[str, Any] | None, seeds: dict[int, int], tally: Tally) -> None:
    run = Run(open_store(uri, opts))
    steps = run.steps()
    assert STEP_N in steps, f"{uri}: the previously committed step vanished: {steps}"
    assert set(steps) <= {STEP_N, STEP_N + 1}
    for s in steps:
        problems = run.verify(s)
        assert problems == [], f"{uri}: step {s} is listed as committed but fails verification: {problems}"
        loaded: dict[str, Any] = {}
        assert ckptd.load(loaded, uri, step=s, storage_options=opts) == s
        assert_tree_equal(loaded, make_state(seeds[s]), f"step {s}")
    if STEP_N + 1 in steps:
        tally.committed += 1
    elif run.store.list_dir(step_dir(STEP_N + 1)):
        tally.partial_left += 1
        assert run.uncommitted() == [STEP_N + 1]


def _calibrate(p: subprocess.Popen[str], uri: str, opts: dict[str, Any] | None) -> float:
    """Let one victim save uninterrupted; returns how long its save took (from "go" to committed)."""
    _await_ready(p)
    _go(p)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "saved" in out, err
    run = Run(open_store(uri, opts))
    assert run.steps() == [STEP_N + 1] and run.verify(STEP_N + 1) == []
    return float(out.split("saved")[1])


def _campaign(base_uri: str, opts: dict[str, Any] | None, runs: int, cwd: Path, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    # Stratified random kill points: one uniformly random point in each of `runs` equal slices of
    # [0, 1.1] (in units of the save's duration), in random order, so that even a short campaign
    # covers the whole save, from before the first object to after the commit.
    fractions = [(i + rng.random()) / runs * 1.1 for i in range(runs)]
    rng.shuffle(fractions)
    done = 0
    while done < runs:
        # Each batch starts with an uninterrupted save that measures the save time under the
        # current machine load (other test processes share the cores), then kills the others.
        cal_uri = f"{base_uri}/cal{done:03d}"
        cal = _spawn(cal_uri, STEP_N + 1, 3000 + done, opts, cwd)
        batch = []
        for i in range(done, min(runs, done + BATCH)):
            uri = f"{base_uri}/r{i:03d}"
            seeds = {STEP_N: 1000 + i, STEP_N + 1: 2000 + i}
            ckptd.save(make_state(seeds[STEP_N]), uri, step=STEP_N, storage_options=opts)
            batch.append((uri, seeds, _spawn(uri, STEP_N + 1, seeds[STEP_N + 1], opts, cwd)))
        for _, _, p in batch:
            _await_ready(p)  # imports done: the calibration runs under the same load as the kills
        duration = _calibrate(cal, cal_uri, opts)
        for uri, seeds, p in batch:
            delay = fractions.pop() * duration
            t0 = _go(p)
            time.sleep(max(0.0, t0 + delay - time.perf_counter()))
            if p.poll() is None:  # still running (or exited but not yet reaped: kill is harmless then)
                tally.killed_mid_save += 1
                os.kill(p.pid, signal.SIGKILL)
            p.communicate(timeout=60)
            tally.delays.append(round(delay, 4))
            tally.runs += 1
            _check_run(uri, opts, seeds, tally)
            # recovery (every other run, to bound the time): collect the leftovers, or let prepare()
            # replace them, and save N+1 again
            run = Run(open_store(uri, opts))
            if tally.runs % 2 == 0:
                continue
            if tally.runs % 4 == 1:
                run.gc_uncommitted(min_age_s=0)
                assert run.uncommitted() == []
            ckptd.save(
                make_state(seeds[STEP_N + 1]), uri, step=STEP_N + 1, storage_options=opts, overwrite=True
            )
            assert run.steps() == [STEP_N, STEP_N + 1] and run.verify(STEP_N + 1) == []
        done += len(batch)
    print(f"{base_uri}: {tally}")
    # The campaign is not vacuous: most kills landed inside the save, and some left partial data.
    assert tally.killed_mid_save >= runs // 2, tally
    assert tally.partial_left >= max(1, runs // 5), tally
    return tally


def test_sigkill_during_save_local(tmp_path: Path) -> None:
    _campaign(str(tmp_path / "runs"), None, runs=5, cwd=tmp_path, seed=1)


@pytest.mark.slow  # the local variant stays fast
@pytest.mark.s3
def test_sigkill_during_save_s3(s3_url: str, s3_storage_options: dict[str, Any], tmp_path: Path) -> None:
    _campaign(s3_url, s3_storage_options, runs=5, cwd=tmp_path, seed=2)


@pytest.mark.slow
def test_sigkill_campaign_local(tmp_path: Path) -> None:
    _campaign(str(tmp_path / "runs"), None, runs=30, cwd=tmp_path, seed=int(time.time()))


@pytest.mark.slow
@pytest.mark.s3
def test_sigkill_campaign_s3(s3_url: str, s3_storage_options: dict[str, Any], tmp_path: Path) -> None:
    _campaign(s3_url, s3_storage_options, runs=24, cwd=tmp_path, seed=int(time.time()))
