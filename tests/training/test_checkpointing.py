"""``ckptd train`` checkpointed end to end: crash, preemption, resume, and resume in other layouts.

Every run is a real job: ``ckptd train`` (torch's launcher, gloo ranks) or, at world size 1,
``python -m ckptd.training.trainer``. Runs talk to the test only through what a user sees:
the ``--log-json`` lines, the exit status, and the committed checkpoints under ``--ckpt``.

* Same layout (dp2, ZeRO 2): a job killed with SIGKILL after its first committed checkpoint,
  resumed, must reproduce an uninterrupted job bit for bit — every loss, and every tensor of
  the final checkpoint (weights, both Adam moments, step). The uninterrupted job is stopped
  by SIGTERM, which must leave a durable checkpoint of exactly its last logged step.
* Other layouts: the dp2·tp2·pp2 checkpoint of step 3 continues at dp4·tp1·pp2 and on one
  process, and a ZeRO-1 checkpoint continues at ZeRO 3; next-step losses within 1e-5 of
  an uninterrupted single-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd

pytestmark = pytest.mark.distributed

MODEL = [
    "--layers", "2", "--width", "32", "--heads", "4", "--kv-heads", "2", "--vocab", "101",
    "--seq-len", "16", "--global-batch", "8", "--micro-batch", "2", "--lr", "1e-3", "--dtype", "fp32",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TIMEOUT = 300.0
FOREVER = "100000"


def command(nproc: int, *options: str, log: Path) -> list[str]:
    if nproc == 1:  # a single process needs no launcher
        head = [sys.executable, "-P", "-m", "ckptd.training.trainer", "--log-json", str(log), *options]
        return [*head, *MODEL]
    return [sys.executable, "-P", "-m", "ckptd", "train", "--nproc", str(nproc), "--log-json", str(log),
            *options, "--", *MODEL]  # fmt: skip


_started: list[subprocess.Popen[str]] = []


@pytest.fixture(scope="module", autouse=True)
def _no_orphans() -> Iterator[None]:
    """A failing test must not leave ranks behind (they live in sessions of their own)."""
    yield
    for proc in _started:
        if proc.poll() is None:
            crash(proc)


def start(nproc: int, *options: str, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(command(nproc, *options, log=log), cwd=log.parent, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], expect: int = 0) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        crash(proc)
        raise
    assert proc.returncode == expect, f"exit status {proc.returncode}, expected {expect}:\n{out[-4000:]}"
    return out


def train(nproc: int, *options: str, log: Path) -> str:
    return finish(start(nproc, *options, log=log))


def losses(log: Path) -> dict[int, float]:
    if not log.exists():
        return {}
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return {int(r["step"]): float(r["loss"]) for r in lines}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; the launcher starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def crash(proc: subprocess.Popen[str]) -> None:
    """SIGKILL every rank and the launcher at once, like a machine that loses power."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


def wait_until(what: str, proc: subprocess.Popen[str], cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{proc.communicate()[0][-4000:]}")
        if time.monotonic() > deadline:
            crash(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def checkpoint(uri: Path, step: int) -> dict[str, torch.Tensor]:
    reader = ckptd.open_run(str(uri)).reader(step)
    return {path: reader.read(path) for path in reader.manifest.arrays}


def committed(uri: Path) -> list[int]:
    return ckptd.open_run(str(uri)).steps()


# ---------------------------------------------------------------- same layout: kill, SIGTERM, resume
@pytest.fixture(scope="module")
def same_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("same")
    layout = ["--zero", "2"]
    # 1. Checkpoint every 2 steps; SIGKILL the whole job once a checkpoint is committed and
    #    training has gone past it (what follows the checkpoint is lost, maybe a partial one).
    crashed = start(2, *layout, "--steps", FOREVER, "--every", "2", "--ckpt", str(tmp / "run"),
                    log=tmp / "crashed.jsonl")  # fmt: skip
    wait_until("a committed checkpoint", crashed, lambda: bool(committed(tmp / "run")))
    first = committed(tmp / "run")[0]
    wait_until("a step past it", crashed, lambda: max(losses(tmp / "crashed.jsonl"), default=0) > first)
    crash(crashed)
    kept = committed(tmp / "run")[-1]
    # 2. The uninterrupted job, stopped by SIGTERM (sent to `ckptd train` only) a few steps later.
    straight = start(2, *layout, "--steps", FOREVER, "--ckpt", str(tmp / "straight"),
                     log=tmp / "straight.jsonl")  # fmt: skip
    wait_until("training past the crash", straight,
               lambda: max(losses(tmp / "straight.jsonl"), default=0) >= kept + 2)  # fmt: skip
    straight.send_signal(signal.SIGTERM)
    out = finish(straight, expect=143)
    stopped = max(losses(tmp / "straight.jsonl"))
    # 3. Resume the crashed job up to the step where the uninterrupted one stopped.
    train(2, *layout, "--steps", str(stopped), "--every", "2", "--ckpt", str(tmp / "run"),
          log=tmp / "resumed.jsonl")  # fmt: skip
    return {"tmp": tmp, "kept": kept, "stopped": stopped, "sigterm_output": out,
            "crashed": losses(tmp / "crashed.jsonl")}  # fmt: skip


# slow: three torchrun jobs; the engine's SIGKILL/SIGTERM tests (tests/engine/test_engine_process.py)
# and the trainer's bit-exact resume (test_reshard.py) are in the fast tier
@pytest.mark.slow
def test_sigterm_leaves_a_durable_checkpoint_of_the_last_step(same_layout: dict[str, Any]) -> None:
    tmp, stopped = same_layout["tmp"], same_layout["stopped"]
    assert committed(tmp / "straight") == [stopped]  # no --every: only the SIGTERM checkpoint
    assert ckptd.open_run(str(tmp / "straight")).verify(stopped) == []  # every chunk's crc32c holds
    assert int(checkpoint(tmp / "straight", stopped)["optim/step"]) == stopped
    assert "stopped by SIGTERM" in same_layout["sigterm_output"]


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(same_layout: dict[str, Any]) -> None:
    tmp, kept, stopped = same_layout["tmp"], same_layout["kept"], same_layout["stopped"]
    assert max(same_layout["crashed"]) > kept  # the kill lost trained steps
    resumed, straight = losses(tmp / "resumed.jsonl"), losses(tmp / "straight.jsonl")
    assert sorted(resumed) == list(range(kept + 1, stopped + 1))  # continued right after the checkpoint
    assert resumed == {s: straight[s] for s in resumed}  # bit-exact losses
    assert {s: straight[s] for s in same_layout["crashed"]} == same_layout["crashed"]
    a, b = checkpoint(tmp / "run", stopped), checkpoint(tmp / "straight", stopped)
    assert a.keys() == b.keys() and any(k.startswith("optim/exp_avg_sq/") for k in a)
    for path, t in b.items():
        assert torch.equal(a[path], t), path


# ---------------------------------------------------------------- other layouts
SAVED_AT, UNTIL = 3, 5


@pytest.fixture(scope="module")
def other_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    tmp = tmp_path_factory.mktemp("reshard")
    steps = ["--steps", str(UNTIL)]
    train(1, *steps, "--ckpt", str(tmp / "reference"), log=tmp / "reference.jsonl")
    # dp2·tp2·pp2 checkpoints step 3; copies of it continue in other layouts
    train(8, "--tp", "2", "--pp", "2", "--zero", "1", "--steps", str(SAVED_AT), "--ckpt", str(tmp / "src"),
          log=tmp / "src.jsonl")  # fmt: skip
    for name in ("dp4-tp1-pp2", "dp1"):
        shutil.copytree(tmp / "src", tmp / name)
    train(8, "--pp", "2", *steps, "--ckpt", str(tmp / "dp4-tp1-pp2"), log=tmp / "dp4-tp1-pp2.jsonl")
    train(1, *steps, "--ckpt", str(tmp / "dp1"), log=tmp / "dp1.jsonl")
    # ZeRO 1 -> 3 at dp2
    train(2, "--zero", "1", "--steps", str(SAVED_AT), "--ckpt", str(tmp / "zero"), log=tmp / "zero1.jsonl")
    train(2, "--zero", "3", *steps, "--ckpt", str(tmp / "zero"), log=tmp / "zero3.jsonl")
    names = ("reference", "src", "dp4-tp1-pp2", "dp1", "zero1", "zero3")
    out: dict[str, Any] = {name: losses(tmp / f"{name}.jsonl") for name in names}
    out["tmp"] = tmp
    return out


def close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(SAVED_AT + 1, UNTIL + 1)), "must continue right after step 3"
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-5 * abs(want[step]), (step, loss, want[step])


# slow: six trainer launches (two of 8 processes); the gloo reshard paths are in test_reshard.py
@pytest.mark.slow
@pytest.mark.parametrize("target", ["dp4-tp1-pp2", "dp1"])
def test_dp2_tp2_pp2_checkpoint_continues_in_another_layout(
    other_layouts: dict[str, Any], target: str
) -> None:
    ref = other_layouts["reference"]
    assert sorted(other_layouts["src"]) == [1, 2, 3]
    close(other_layouts[target], ref)
    # the state after the resumed steps matches too (weights and moments, every tensor)
    tmp = other_layouts["tmp"]
    got, want = checkpoint(tmp / target, UNTIL), checkpoint(tmp / "reference", UNTIL)
    assert got.keys() == want.keys()
    for path, t in want.items():
        diff = float((got[path].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30))
        assert diff <= 1e-5, (path, diff)


@pytest.mark.slow
def test_zero1_checkpoint_continues_at_zero3(other_layouts: dict[str, Any]) -> None:
    assert sorted(other_layouts["zero1"]) == [1, 2, 3]
    close(other_layouts["zero3"], other_layouts["reference"])
