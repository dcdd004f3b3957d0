"""The restore path of ``ckptd.Checkpointer``: choosing, agreeing on and loading a checkpoint.

``restore(select=...)`` parses the selector on every rank (``ckptd.wire.selector``); rank 0
resolves it (only rank 0 talks to the catalog) and shares the outcome as a ``RestoreVote``.
Rank 0 then lists the tiers once and proposes steps newest first; every rank loads the proposal
(its memory tier, else one manifest read per tier) and the job agrees on the outcome. Other ranks
never list storage: per-rank restore metadata stays independent of the world size.

A rollback requested through the catalog is applied in place at a step boundary
(``roll_back_in_place``); ``rollback()`` restores the newest host-memory snapshot.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ckptd.engine import rng
from ckptd.engine.catalog import CatalogLink
from ckptd.engine.coordination import Coordinator
from ckptd.engine.dtensor_state import LocalState
from ckptd.engine.save_path import SavePath
from ckptd.engine.tiers import StoreTier
from ckptd.engine.vote import RestoreVote
from ckptd.format.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    StorageError,
)
from ckptd.wire.selector import Alias, Best, Latest, Selector, SelectorError, Step, parse_selector

if TYPE_CHECKING:
    from ckptd.wire.client import RollbackPointer

log = logging.getLogger(__name__)


def parse_restore_selection(step: int | None, select: str | int | None) -> Selector:
    """``restore(step=..., select=...)`` as a parsed selector (``ConfigError`` when invalid)."""
    if step is not None and select is not None:
        raise ConfigError("give restore() a step or a select, not both")
    selection = step if select is None else select
    if selection is None:
        return Latest()
    try:
        return parse_selector(selection)
    except SelectorError as e:
        raise ConfigError(f"restore(select=...): {e}") from None


class RestorePath:
    """Loads checkpoints into the live state of the save path's ``state``, identically on every rank."""

    def __init__(self, save: SavePath, *, coordinator: Coordinator, catalog: CatalogLink | None) -> None:
        self.save = save
        self.coordinator = coordinator
        self.rank = coordinator.rank
        self.catalog = catalog
        self.problems: list[str] = []
        """Why checkpoints could not be listed or loaded (the newest loadable one is restored)."""

    # ---------------------------------------------------------------- restore()
    def restore(self, selector: Selector) -> int:
        """Load the selected checkpoint (see ``Checkpointer.restore``); its step, or 0 when none."""
        self.save.stager.wait_all()
        wanted, pointer, from_pointer = self._agree_on_selection(selector)
        candidates = self._candidates() if self.rank == 0 else []
        if wanted is not None:
            candidates = [s for s in candidates if s == wanted]
        while True:
            proposal = max(candidates, default=-1)
            if self.coordinator.world_size > 1:
                proposal = self.coordinator.agree_max_all([proposal if self.rank == 0 else -1])[0]
            if proposal < 0:
                self._nothing_loaded(wanted)
                return 0
            ok = self.load(proposal)
            if self._agree_min(int(ok)):
                self._resumed(proposal, pointer, discard_newer=from_pointer)
                return proposal
            candidates = [s for s in candidates if s < proposal]

    def _agree_on_selection(self, selector: Selector) -> tuple[int | None, RollbackPointer | None, bool]:
        """(step to restore or None for the newest, the rollback pointer, whether it came from one)."""
        wanted: int | None = None
        pointer: RollbackPointer | None = None
        problem: CheckpointError | None = None
        if self.rank == 0 or isinstance(selector, Step):
            try:
                wanted, pointer = self._resolve(selector)
            except CheckpointError as e:
                if self.coordinator.world_size == 1:
                    raise
                problem = e
        if self.coordinator.world_size == 1:
            return wanted, pointer, pointer is not None
        mine = RestoreVote(step=wanted, failed=problem is not None, from_pointer=pointer is not None)
        agreed = RestoreVote.decode(self.coordinator.agree_max_all(mine.encode()))
        if agreed.failed:
            if problem is not None:
                raise problem
            raise CheckpointNotFoundError(f"rank 0 could not resolve select={str(selector)!r}")
        return agreed.step, pointer, agreed.from_pointer

    def _nothing_loaded(self, wanted: int | None) -> None:
        """No proposal is left: raise why, unless there simply is no checkpoint yet."""
        if wanted is not None:
            raise CheckpointNotFoundError(f"step {wanted} is not committed in any tier"
                                          + (f" ({'; '.join(self.problems)})" if self.problems else ""))
        if self.problems:
            raise CheckpointNotFoundError("no committed checkpoint could be loaded: "
                                          + "; ".join(self.problems))

    def _agree_min(self, value: int) -> int:
        if self.coordinator.world_size == 1:
            return value
        return -self.coordinator.agree_max_all([-value])[0]

    def _resolve(self, selector: Selector) -> tuple[int | None, RollbackPointer | None]:
        """(step to restore or None for the newest, the rollback pointer it comes from)."""
        if isinstance(selector, Latest):
            pointer = self.catalog.rollback_pointer() if self.catalog is not None else None
            return (None, None) if pointer is None else (pointer.checkpoint.step, pointer)
        if isinstance(selector, Step):
            return selector.step, None
        ref = self.catalog.resolve(str(selector)) if self.catalog is not None else None
        if ref is not None:
            return ref.step, None
        if isinstance(selector, Best):
            best = self._best_in_storage(selector.metric, maximize=selector.maximize)
            if best is None:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint of this run records the metric {selector.metric!r}")
            return best, None
        return self._missing_alias(selector), None

    def _missing_alias(self, alias: Alias) -> int:
        """Raise why the catalog did not resolve ``alias``."""
        if self.catalog is None:
            raise ConfigError(f"select={alias.name!r} names an alias, and aliases live in the catalog: "
                              "pass Checkpointer(catalog=...)")
        url = self.catalog.config.url
        if not self.catalog.reachable():
            raise StorageError(f"cannot resolve alias {alias.name!r}: the catalog at {url} is unreachable",
                               url=url)
        raise CheckpointNotFoundError(f"the catalog at {url} has no committed checkpoint named "
                                      f"{alias.name!r} in run {self.catalog.run!r}")

    def _best_in_storage(self, metric: str, *, maximize: bool) -> int | None:
        """The committed step with the best ``metric`` in its manifest (newest on ties)."""
        scored: list[tuple[float, int]] = []
        for store in self.save.stores:
            try:
                steps = store.steps()
            except CheckpointError as e:
                self.problems.append(f"{store.name}: {e}")
                continue
            for s in steps:
                value = store.metrics_of(s).get(metric)
                if value is not None:
                    scored.append((-value if maximize else value, -s))
        return -min(scored)[1] if scored else None

    def _resumed(self, step: int, pointer: RollbackPointer | None, *, discard_newer: bool) -> None:
        """Bookkeeping after every rank loaded checkpoint ``step``."""
        now = time.monotonic()
        for p in self.save.policies.values():
            p.saved(step, now)
        for store in self.save.stores:
            store.committed.append(step)  # saving this step again (a forced save) is not a new commit
        self.save.parent = step
        if discard_newer:  # a rollback: what came after ``step`` is an abandoned trajectory
            self._discard_after(step)
        if self.catalog is not None and pointer is not None:
            self.catalog.forget_after(step)
            self.catalog.rollback_done(pointer)

    def _discard_after(self, step: int) -> None:
        if self.save.memory is not None:
            self.save.memory.discard_after(step)
        for store in self.save.stores:
            try:
                gone = store.discard_after(step)
            except (CheckpointError, OSError) as e:
                log.warning("%s: could not discard the checkpoints after step %d: %s", store.name, step, e)
                continue
            if gone:
                log.info("%s: rollback to step %d discarded steps %s", store.name, step, gone)

    # ---------------------------------------------------------------- rollbacks
    def _holds(self, step: int) -> bool:
        if self.save.memory is not None and self.save.memory.get(step) is not None:
            return True
        for s in self.save.stores:
            try:
                if s.run.is_committed(step):
                    return True
            except (CheckpointError, OSError):
                continue
        return False

    def roll_back_in_place(self, target: int, pointer: RollbackPointer | None) -> bool:
        """Every rank: restore checkpoint ``target`` into the live state at this step boundary.
        False when some rank holds no copy of it (training continues from the current state)."""
        t0 = time.perf_counter()
        self.save.stager.wait_all()  # lazy copies read the live tensors we are about to overwrite
        self.save.drop_after(target)
        for f in self.save.flushers:
            f.wait_idle()  # a persist in flight (collective) ends before its step may be discarded
        if not self._agree_min(int(self._holds(target))):
            log.error("rollback to step %d requested through the catalog: no tier holds it on every "
                      "rank; training continues from the current state", target)
            if self.catalog is not None and pointer is not None:
                self.catalog.rollback_skipped(pointer)
            return False
        ok = self.load(target)
        if not self._agree_min(int(ok)):
            why = "; ".join(self.problems[-3:])
            raise IntegrityError(f"rollback to step {target} failed ({why}); the live state may be partly "
                                 "restored")
        self._resumed(target, pointer, discard_newer=True)
        self.save.blocked_s += time.perf_counter() - t0
        log.warning("rolled back in place to step %d (requested through the catalog%s)", target,
                    f": {pointer.reason}" if pointer is not None and pointer.reason else "")
        return True

    def rollback(self) -> int:
        """Instant in-process rollback to the newest snapshot held in host memory."""
        memory = self.save.memory
        if memory is None or not memory.steps():
            raise CheckpointNotFoundError("no snapshot is held in host memory")
        step = memory.steps()[-1]
        self.save.stager.wait_all()
        self._load_from_memory(step)
        return step

    # ---------------------------------------------------------------- loading
    def _candidates(self) -> list[int]:
        memory = self.save.memory
        steps: set[int] = set(memory.steps()) if memory else set()
        for s in self.save.stores:
            try:
                steps.update(s.steps())
            except CheckpointError as e:
                self.problems.append(f"{s.name}: {e}")
        return sorted(steps)

    def _load_from_memory(self, step: int) -> None:
        assert self.save.memory is not None
        local = LocalState(self.save.state)  # DTensors are restored through their local shards
        snap = self.save.memory.load(step, local.view)
        local.write_back()
        if "rng" in snap.rank_state:
            rng.restore(snap.rank_state["rng"])

    def load(self, step: int) -> bool:
        """Load ``step`` from the fastest tier holding it; False (and a problem noted) when none can."""
        if self.save.memory is not None and self.save.memory.get(step) is not None:
            self._load_from_memory(step)
            return True
        local = LocalState(self.save.state)  # DTensors of any mesh: each rank fills its local shards' boxes
        return any(self._load_from_store(s, step, local) for s in self.save.stores)

    def _load_from_store(self, store: StoreTier, step: int, local: LocalState) -> bool:
        try:
            if not store.run.is_committed(step):
                return False
            manifest = store.load(step, local.view, {**local.specs(), **self.save.specs})
            # The rank's own row (its RNG) belongs to the checkpoint: a damaged one makes this copy
            # unusable like a damaged shard, and the caller moves on to another copy or step.
            same_world = manifest.world_size == self.coordinator.world_size
            mine = store.rank_state(manifest, self.rank) if same_world else None
            local.write_back()
        except (CheckpointError, OSError) as e:
            self.problems.append(f"{store.name} step {step}: {e}")
            log.warning("checkpoint step %d in %s cannot be restored: %s", step, store.name, e)
            return False
        if isinstance(mine, dict) and "rng" in mine:
            rng.restore(mine["rng"])
        return True
