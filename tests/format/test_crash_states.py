"""Crash-state testing of the local save path, as ALICE and CrashMonkey do for file systems.

A real multi-array ``ckptd.save`` of step 8 (over a committed step 7) runs under ``strace -f``.
Its file-system ops must follow the ordering rules (every object durable before the commit
record is published, the record's directory fsync'd after, nothing outside the step
touched), and every crash state of every prefix of the op log — unsynced writes kept,
dropped or torn, directory entries reordered — must read as exactly step 7 or exactly
step 8, bit for bit. A SIGKILL keeps the page cache and so cannot observe a missing fsync;
these states can. The save with fsync turned off is the control that shows they do.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from crash_views import (
    CrashState,
    commit_op,
    crash_states,
    durable_state,
    final_contents,
    materialise,
    ordering_violations,
)
from fmt_helpers import assert_tree_equal
from fs_trace import FsModel, Op, trace
from traced_save_proc import make_state

import ckptd
from ckptd.format import Run
from ckptd.storage import open_store

PROC = Path(__file__).with_name("traced_save_proc.py")
OLD, NEW = 7, 8
MIN_STATES = 100

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs strace (.ci/services/strace.sh)"
)


@dataclass
class TracedSave:
    ops: list[Op]
    before: FsModel
    contents: dict[int, bytes]
    scratch: Path


def _traced_save(tmp: Path, *extra: str) -> TracedSave:
    root = Path(os.path.realpath(tmp)) / "run"
    ckptd.save(make_state(OLD), str(root), step=OLD, chunk_bytes=64 * 1024)
    pre_copy = tmp / "pre"
    shutil.copytree(root, pre_copy)
    argv = [sys.executable, "-P", str(PROC), str(root), str(NEW), str(NEW), *extra]
    ops, before = trace(argv, root, cwd=tmp)
    return TracedSave(ops, before, final_contents(ops, before, pre_copy, root), tmp / "state")


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> TracedSave:
    return _traced_save(tmp_path_factory.mktemp("traced"))


class StateReader:
    """Materialises crash states one after another in one scratch directory and reads each back."""

    def __init__(self, t: TracedSave) -> None:
        self.t = t
        self.previous: CrashState | None = None
        self.expected = {OLD: make_state(OLD), NEW: make_state(NEW)}
        shutil.rmtree(t.scratch, ignore_errors=True)

    def reads_as(self, state: CrashState) -> int:
        """The step this state loads as (bit-exact and verified); raises when it is anything else."""
        materialise(state, self.t.scratch, self.t.contents, self.previous)
        self.previous = state
        uri = str(self.t.scratch)
        steps = Run(open_store(uri)).steps()
        assert OLD in steps and set(steps) <= {OLD, NEW}, f"committed steps {steps}"
        loaded: dict[str, object] = {}
        step = ckptd.load(loaded, uri, threads=1)
        assert_tree_equal(loaded, self.expected[step], f"step {step}")
        problems = Run(open_store(uri)).verify(step, threads=1)
        assert problems == [], problems
        return step


def test_a_multi_array_save_is_recorded_as_file_system_ops(traced: TracedSave) -> None:
    kinds = Counter(op.kind for op in traced.ops)
    # many objects in many directories, each written, synced, and one record published
    assert kinds["create"] >= 10 and kinds["mkdir"] >= 5 and kinds["write"] >= 10, kinds
    assert kinds["fsync"] >= kinds["create"], kinds
    assert kinds["rename"] + kinds["link"] >= 1, kinds


def test_the_save_follows_the_ordering_rules(traced: TracedSave) -> None:
    assert ordering_violations(traced.ops, traced.before) == []


def _check_states(traced: TracedSave, states: list[CrashState]) -> Counter[int]:
    outcomes: Counter[int] = Counter()
    bad: list[str] = []
    reader = StateReader(traced)
    for state in states:
        try:
            outcomes[reader.reads_as(state)] += 1
        except Exception as e:
            bad.append(f"after op {state.prefix} ({state.variant}): {type(e).__name__}: {str(e)[:200]}")
    n = len(states)
    assert bad == [], f"{len(bad)} of {n} crash states read as neither checkpoint:\n" + "\n".join(bad[:10])
    assert outcomes[OLD] and outcomes[NEW], outcomes  # both sides of the commit point were reached
    return outcomes


def test_crash_states_read_as_the_old_or_the_new_checkpoint(traced: TracedSave) -> None:
    """A sample of at least 100 states: every state of the ops around the commit, a stride of the rest."""
    states = list(crash_states(traced.ops, traced.before))
    assert len(states) >= MIN_STATES, f"only {len(states)} distinct crash states"
    around_commit = commit_op(traced.ops) - 12
    stride = max(1, len(states) // MIN_STATES)
    picked = [s for i, s in enumerate(states) if s.prefix >= around_commit or i % stride == 0]
    assert len(picked) >= MIN_STATES
    _check_states(traced, picked)


@pytest.mark.slow
def test_every_crash_state_reads_as_the_old_or_the_new_checkpoint(traced: TracedSave) -> None:
    states = list(crash_states(traced.ops, traced.before))
    assert len(states) >= MIN_STATES, f"only {len(states)} distinct crash states"
    _check_states(traced, states)


def test_once_save_returns_the_new_checkpoint_survives_a_power_cut(traced: TracedSave) -> None:
    assert StateReader(traced).reads_as(durable_state(traced.ops, traced.before)) == NEW


@pytest.mark.slow
def test_a_save_without_fsync_is_caught(tmp_path: Path) -> None:
    """The control: the same save with fsync and fdatasync turned into no-ops must fail the checks."""
    t = _traced_save(tmp_path, "--no-fsync")
    violations = ordering_violations(t.ops, t.before)
    assert any("not durable" in v for v in violations), violations
    assert any("never fsync'd" in v for v in violations), violations
    reader = StateReader(t)
    published = commit_op(t.ops)
    for state in [s for s in crash_states(t.ops, t.before) if s.prefix > published]:
        try:
            reader.reads_as(state)
        except Exception:
            return
    pytest.fail("every crash state of a save without fsync still read as a checkpoint")
