"""Whole processes: SIGKILL during saves, SIGTERM/SIGUSR1 preemption, resident memory over 50 saves."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest
import torch

import ckptd
from tests import zygote

WORKER = Path(__file__).parent / "workers" / "save_loop.py"


def start(run: Path, max_steps: int, every: int, mib: float = 4.0,
          *extra: str) -> subprocess.Popen[str]:
    args = [str(run), str(max_steps), str(every), str(mib), *extra]
    proc: subprocess.Popen[str] = zygote.spawn(["-P", str(WORKER), *args], cwd="/", stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True,
                                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc  # a fork of the warm test zygote (tests/zygote.py), Popen's interface


def read_until(out: IO[str], prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            raise AssertionError(f"worker ended before printing {prefix!r}")
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} within {timeout}s")


def check_consistent(run: Path, step: int) -> None:
    """Every tensor of checkpoint ``step`` holds exactly ``step``: no mix of two saves."""
    state: dict = {}
    assert ckptd.load(state, str(run), step=step) == step
    assert state["meta"]["step"] == step
    for p in state["params"].values():
        assert torch.equal(p, torch.full_like(p, float(step)))
    assert torch.equal(state["counter"], torch.full((1000,), float(step)))
    assert ckptd.open_run(str(run)).verify(step) == []


def _kill_campaign(tmp_path: Path, trials: int) -> None:
    rnd = random.Random(1234)
    run = tmp_path / "run"
    reached = 0
    for _ in range(trials):
        proc = start(run, max_steps=10_000, every=1, mib=8)
        assert proc.stdout is not None
        first = read_until(proc.stdout, "start")
        assert int(first.split()[1]) == (ckptd.open_run(str(run)).latest() or 0)
        read_until(proc.stdout, "step")
        time.sleep(rnd.uniform(0.0, 0.8))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        steps = ckptd.open_run(str(run)).steps()
        assert steps, "a checkpoint must survive"
        assert steps[-1] >= reached
        reached = steps[-1]
        for s in steps[-2:]:
            check_consistent(run, s)


def test_sigkill_during_saves_leaves_the_previous_or_the_new_checkpoint(tmp_path: Path) -> None:
    _kill_campaign(tmp_path, trials=4)


@pytest.mark.slow
def test_sigkill_campaign(tmp_path: Path) -> None:
    _kill_campaign(tmp_path, trials=25)


def test_sigterm_leaves_a_durable_checkpoint_of_the_step_reached(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, max_steps=1_000_000, every=10**6)
    assert proc.stdout is not None
    read_until(proc.stdout, "step 5 ")
    proc.send_signal(signal.SIGTERM)
    tail = proc.stdout.read()
    assert proc.wait(timeout=60) == 143, tail
    printed = [int(line.split()[1]) for line in tail.splitlines() if line.startswith("step ")]
    last = printed[-1] if printed else 5
    steps = ckptd.open_run(str(run)).steps()
    # the signal lands after "step N" is printed and is acted on at the boundary of step N or N + 1
    assert len(steps) == 1 and steps[0] in (last, last + 1)
    check_consistent(run, steps[0])


def test_sigusr1_checkpoints_and_training_goes_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, max_steps=400, every=10**6, mib=1)
    assert proc.stdout is not None
    read_until(proc.stdout, "step 3 ")
    proc.send_signal(signal.SIGUSR1)
    tail = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, tail
    steps = ckptd.open_run(str(run)).steps()
    assert len(steps) == 1 and 3 <= steps[0] < 400
    check_consistent(run, steps[0])


@pytest.mark.slow  # 60 saves; test_pool_is_allocated_once_and_reused stays fast
def test_resident_memory_is_flat_over_50_saves(tmp_path: Path) -> None:
    proc = start(tmp_path / "run", 60, 1, 16, "wait")
    assert proc.stdout is not None
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    rss = {int(ln.split()[1]): int(ln.split()[3]) for ln in out.splitlines() if ln.startswith("step ")}
    # after warm-up (pool slots allocated, allocator caches filled) 50 more saves must not grow memory
    assert "persisted 60" in out
    growth = (rss[60] - rss[10]) / rss[10]
    assert growth < 0.05, f"RSS grew {growth:.1%}: {rss[10]} -> {rss[60]}"
