"""The ``every_seconds`` policy: a snapshot at the first step boundary once the interval has passed.

The checkpointer reads its clock only at step boundaries, so a scripted clock (the save and
restore paths' ``time`` replaced by one whose ``monotonic`` returns the next scripted instant)
makes these tests exact: no sleeping, no timing in the assertions.
"""

from __future__ import annotations

import time
import types
from pathlib import Path

import pytest
import torch
from workload import make, params, seed_all, train_step

import ckptd
import ckptd.engine.restore_path as restore_path_module
import ckptd.engine.save_path as save_path_module
from ckptd.engine.config import TierConfig
from ckptd.engine.policy import SavePolicy
from ckptd.format.errors import CheckpointError


class ScriptedClock:
    """``monotonic()`` returns ``now``; the test moves ``now``."""

    def __init__(self, start: float) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> ScriptedClock:
    c = ScriptedClock(1000.0)
    fake = types.SimpleNamespace(monotonic=c.monotonic, perf_counter=time.perf_counter)
    monkeypatch.setattr(save_path_module, "time", fake)  # the save path reads the clock
    monkeypatch.setattr(restore_path_module, "time", fake)  # a restore restarts the intervals
    return c


def test_policy_is_due_once_the_interval_has_passed_since_the_last_save() -> None:
    p = SavePolicy(TierConfig.durable("/x", every_seconds=60.0), now=0.0)
    assert not p.due_by_time(59.999)
    assert p.due_by_time(60.0)
    p.saved(7, 60.0)
    assert not p.due_by_time(119.0)  # the clock restarted at the save
    assert p.due_by_time(120.0)
    assert not p.due_by_step(8)  # no step policy configured: only time decides


def test_a_save_for_another_reason_restarts_the_interval() -> None:
    p = SavePolicy(TierConfig.durable("/x", every=10, every_seconds=60.0), now=0.0)
    assert p.due_by_step(10) and not p.due_by_time(30.0)
    p.saved(10, 30.0)  # the step policy fired at t=30
    assert not p.due_by_time(60.0)
    assert p.due_by_time(90.0)
    assert not p.due_by_step(10)  # the same step is never saved twice
    assert p.due_by_step(20)


def test_policy_without_an_interval_is_never_due_by_time() -> None:
    p = SavePolicy(TierConfig.durable("/x", every=5), now=0.0)
    assert not p.due_by_time(1e12)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_non_positive_interval_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(CheckpointError, match="every_seconds"):
        ckptd.Checkpointer(str(tmp_path / "run"), state=make(), every_seconds=bad)


def test_checkpointer_saves_at_the_first_boundary_after_each_interval(
    tmp_path: Path, clock: ScriptedClock
) -> None:
    state = make()
    seed_all(1)
    # (seconds since start at the boundary of step n): saves at 3 (t=61) and 5 (t=125, 64 s later)
    instants = {1: 10.0, 2: 59.0, 3: 61.0, 4: 100.0, 5: 125.0, 6: 130.0}
    saved_params: dict[int, dict[str, torch.Tensor]] = {}
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every_seconds=60.0, memory_keep=0) as ck:
        for step, t in instants.items():
            train_step(state)
            clock.now = 1000.0 + t
            if ck.step(step):
                saved_params[step] = params(state)
            ck.wait()
    assert sorted(saved_params) == [3, 5]
    assert ckptd.open_run(str(tmp_path / "run")).steps() == [3, 5]
    fresh = make(seed=9)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=fresh, every_seconds=60.0) as ck:
        assert ck.restore() == 5
    for k, v in saved_params[5].items():
        assert torch.equal(params(fresh)[k], v), k
