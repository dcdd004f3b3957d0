"""The save path of ``ckptd.Checkpointer``: tiers, host pool, staging and the flush threads.

At a step boundary where some tier's policy fires, ``snapshot`` stages a snapshot into the
reused host pool (optimizer-owned tensors lazily, see ``snapshot.py``) and returns; each durable
tier keeps only its newest staged snapshot (``held``) until its flusher is free on every rank,
then ``pump`` hands it over. Which tiers are due by time, which flushers are free and whether a
preemption signal arrived is agreed by every rank through a ``BoundaryVote`` (see ``vote.py``
and ``agreement.py``), so the collective commits always match.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.engine import rng
from ckptd.engine.agreement import Sample, StepAgreement
from ckptd.engine.config import CheckpointerConfig, ShardSpec, TierConfig
from ckptd.engine.coordination import Coordinator
from ckptd.engine.dtensor_state import LocalState
from ckptd.engine.flusher import Flusher
from ckptd.engine.policy import SavePolicy
from ckptd.engine.pool import HostPool
from ckptd.engine.signals import PreemptionHandler
from ckptd.engine.snapshot import Snapshot, Stager
from ckptd.engine.tiers import MemoryTier, StoreTier
from ckptd.engine.vote import BoundaryVote
from ckptd.format.errors import LayoutError
from ckptd.format.manifest import Manifest

log = logging.getLogger(__name__)
LINEAGE_KEPT = 64
"""Parent links remembered for checkpoints not yet reported to the catalog."""


@dataclass(frozen=True, slots=True)
class Notify:
    """Callbacks of the durable tiers (run on the flush threads; each must only queue work)."""

    pending: Callable[[str, Snapshot], None]
    committed: Callable[[str, Manifest], None]
    failed: Callable[[str, int, BaseException], None]


@dataclass(frozen=True, slots=True)
class BoundaryDecision:
    """What every rank does at this step boundary (identical on every rank)."""

    preempt: bool
    terminate: bool
    rollback_to: int | None
    due: frozenset[str]
    """Tiers to snapshot now (by step or by an agreed time-based policy)."""
    idle: tuple[bool, ...]
    """Per durable tier: its flusher is free on every rank and may take its held snapshot."""


def clean_metrics(step: int, metrics: Mapping[str, float] | None) -> dict[str, float]:
    """Finite metrics only: a manifest is strict JSON (no NaN), and a diverged loss must not cost
    the checkpoint itself."""
    clean = {str(k): float(v) for k, v in (metrics or {}).items()}
    for k in [k for k, v in clean.items() if not math.isfinite(v)]:
        del clean[k]
        log.warning("step %d: metric %r is not finite; it is left out of the checkpoint", step, k)
    return clean


class SavePath:
    """Tiers, policies, host pool, stager and flushers of one Checkpointer, and the step-boundary vote."""

    def __init__(self, config: CheckpointerConfig, *, state: Mapping[str, Any], specs: dict[str, ShardSpec],
                 coordinator: Coordinator, optimizers: Sequence[torch.optim.Optimizer],
                 notify: Notify) -> None:
        self.config = config
        self.state = state
        self.specs = specs
        self.coordinator = coordinator
        now = time.monotonic()
        self.tier_configs: list[TierConfig] = config.all_tiers()
        self.memory: MemoryTier | None = None
        self.stores: list[StoreTier] = []
        self.policies: dict[str, SavePolicy] = {}
        for t in self.tier_configs:
            self.policies[t.name] = SavePolicy(t, now=now)
            if t.kind == "memory":
                self.memory = MemoryTier(t)
            else:
                self.stores.append(StoreTier(t, coordinator, on_commit=notify.committed,
                                             on_pending=notify.pending, on_failed=notify.failed))
        self.flushers = [Flusher(tier, i) for i, tier in enumerate(self.stores)]
        # held + flushing per durable tier, the memory tier's snapshots, and one being staged
        slots = 2 * len(self.stores) + (self.memory.keep if self.memory else 0) + 1
        self.pool = HostPool(max_slots=slots, budget_bytes=config.host_budget_bytes)
        self.stager = Stager(self.pool, lazy=config.lazy, chunk_bytes=config.copy_chunk_bytes)
        self.optimizers = list(optimizers)
        self.stager.guard(self.optimizers)
        self.held: dict[int, Snapshot] = {}
        """Per durable tier (index into ``stores``): its newest snapshot not yet handed to its flusher."""
        self._seq = 0
        self.agreement = StepAgreement(coordinator, config.agree_every)
        # Boundaries (``agreement.boundary``) of the latest actions, so that a sample agreed before
        # an action never repeats it (see ``_decide``); identical on every rank.
        self._submitted_at = [0] * len(self.stores)
        self._snapshot_at = {t.name: 0 for t in self.tier_configs}
        self.preempted_at = 0
        self.parent: int | None = None
        """The step the next snapshot descends from (lineage reported to the catalog)."""
        self.parents: dict[int, int | None] = {}
        self.last_saved: int | None = None
        self.blocked_s = 0.0

    @property
    def tier_names(self) -> set[str]:
        return {t.name for t in self.tier_configs}

    # ---------------------------------------------------------------- the boundary vote
    def vote(self, step: int, signals: PreemptionHandler, rollback_to: int | None) -> BoundaryDecision:
        """Offer this rank's view of the boundary and decide from the agreed (earlier) sample."""
        now = time.monotonic()
        due = {t.name for t in self.tier_configs if self.policies[t.name].due_by_step(step)}
        mine = BoundaryVote(
            preempt=signals.requested is not None, terminate=signals.terminate, rollback_to=rollback_to,
            timed=tuple(self.policies[t.name].due_by_time(now) for t in self.tier_configs),
            busy=tuple(not f.idle for f in self.flushers))
        # Non-blocking: the vote agreed here comes from an earlier boundary (see agreement.py).
        sample = self.agreement.exchange(mine.encode())
        if sample is None:
            return BoundaryDecision(preempt=False, terminate=False, rollback_to=None, due=frozenset(due),
                                    idle=(False,) * len(self.flushers))
        return self._decide(sample, due)

    def _decide(self, sample: Sample, due: set[str]) -> BoundaryDecision:
        """Flags raised before an action the job already took since the sample was taken are
        spent: they must not trigger it twice."""
        agreed = BoundaryVote.decode(sample.flags, tiers=len(self.tier_configs), flushers=len(self.flushers))
        taken = sample.boundary
        preempt = agreed.preempt and self.preempted_at < taken
        timed = {t.name for t, due_now in zip(self.tier_configs, agreed.timed, strict=True)
                 if due_now and self._snapshot_at[t.name] < taken}
        idle = tuple(not busy and self._submitted_at[i] < taken for i, busy in enumerate(agreed.busy))
        return BoundaryDecision(preempt=preempt, terminate=preempt and agreed.terminate,
                                rollback_to=agreed.rollback_to, due=frozenset(due | timed), idle=idle)

    def idle_now(self) -> tuple[bool, ...]:
        """Which flushers are free on every rank, agreed synchronously (explicit calls only)."""
        if not self.flushers:
            return ()
        busy = self.agreement.now([int(not f.idle) for f in self.flushers]).flags
        return tuple(not b for b in busy)

    # ---------------------------------------------------------------- staging
    def snapshot(self, step: int, metrics: Mapping[str, float] | None, tiers: set[str] | frozenset[str],
                 idle: Sequence[bool]) -> None:
        t0 = time.perf_counter()
        # DTensors (FSDP2, tensor parallel) are snapshotted as their local shards, with derived specs
        skeleton, tensors, dtensor_specs = LocalState(self.state).flatten()
        specs = {**dtensor_specs, **self.specs}
        for path, spec in self.specs.items():
            t = tensors.get(path)
            if t is not None and tuple(t.shape) != spec.box.shape:
                raise LayoutError(f"{path}: the local tensor has shape {tuple(t.shape)} but its box is "
                                  f"{list(spec.box.shape)}")
        rank_state = {"rng": rng.capture()} if self.config.save_rng else {}
        snap = self.stager.stage(step=step, skeleton=skeleton, tensors=tensors, specs=specs,
                                 rank_state=rank_state, metrics=clean_metrics(step, metrics),
                                 optimizers=self.optimizers, evict=self._evict)
        try:
            self._hold(snap, tiers)
        finally:
            snap.release()
        self.last_saved = step
        self.parents[step] = self.parent
        self.parent = step
        for older in [k for k in self.parents if k < step][:-LINEAGE_KEPT]:
            del self.parents[older]
        self.pump(idle)
        self.blocked_s += time.perf_counter() - t0

    def _hold(self, snap: Snapshot, tiers: set[str] | frozenset[str]) -> None:
        """Give the staged snapshot to the memory tier and to each due durable tier's slot."""
        now = time.monotonic()
        for name in tiers:
            self._snapshot_at[name] = self.agreement.boundary
        if self.memory is not None and self.memory.name in tiers:
            self.memory.add(snap)
            self.policies[self.memory.name].saved(snap.step, now)
        for i, tier in enumerate(self.stores):
            if tier.name in tiers:
                old = self.held.pop(i, None)
                if old is not None:
                    old.release()  # superseded before the tier was free: the newest wins
                self.held[i] = snap.retain()
                self.policies[tier.name].saved(snap.step, now)

    def pump(self, idle: Sequence[bool]) -> None:
        """Hand each free tier its newest held snapshot (``idle`` is agreed by every rank)."""
        for i in sorted(self.held):
            if i < len(idle) and idle[i]:
                snap = self.held.pop(i)
                self._submitted_at[i] = self.agreement.boundary
                self.flushers[i].submit(snap, self._seq)
                self._seq += 1
                snap.release()

    def _evict(self) -> bool:
        if self.memory is not None and self.memory.evict_oldest():
            return True
        if self.coordinator.world_size == 1 and self.held:  # multi-rank: held snapshots are agreed state
            self.held.pop(min(self.held)).release()
            return True
        return False

    def drop_after(self, step: int) -> None:
        """Never persist a snapshot of an abandoned trajectory (a rollback to ``step``)."""
        for i in [i for i, snap in self.held.items() if snap.step > step]:
            self.held.pop(i).release()

    # ---------------------------------------------------------------- persistence
    def wait(self) -> None:
        """Return when every tier holds the newest snapshot durably; raise background errors."""
        while True:
            for f in self.flushers:
                f.wait_idle()
            if not self.held:
                break
            self.pump(self.idle_now())
        self.stager.wait_all()
        self.raise_errors()

    def raise_errors(self) -> None:
        errors = [e for f in self.flushers for e in f.take_errors()]
        if not errors:
            return
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also: {other}")
        raise first

    def close(self) -> None:
        self.stager.close()
        for f in self.flushers:
            f.close()
        try:
            self.agreement.drain()
        except Exception as e:  # a peer that died must not turn close() into a hang or a crash
            log.warning("step agreement could not be drained at close: %s", e)
        for snap in self.held.values():
            snap.release()
        self.held.clear()
        if self.memory is not None:
            self.memory.close()
        self.pool.close()
