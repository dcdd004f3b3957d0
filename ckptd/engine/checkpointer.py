"""``ckptd.Checkpointer``: lazy, asynchronous, multi-level checkpoints around a training loop.

::

    with ckptd.Checkpointer("s3://bucket/runs/gpt", state={"model": model, "optim": opt},
                            every=100, keep_last=3) as ckpt:
        start = ckpt.restore()
        for step in range(start, total):
            ...
            ckpt.step(step + 1, metrics={"loss": loss})

At a step boundary where some tier's policy fires, ``step()`` stages a snapshot into the
reused host pool (optimizer-owned tensors lazily, see ``snapshot.py``) and returns; the
flush threads persist it. Everything the ranks must do together (which step to save, when
a busy tier takes the newest snapshot, what to restore) is decided at step boundaries on
the main thread, identically on every rank, so the collective commits always match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch

from ckptd.engine import rng
from ckptd.engine.catalog import CatalogNotifier
from ckptd.engine.config import CheckpointerConfig, Retention, ShardSpec, TierConfig
from ckptd.engine.coordination import Coordinator, DistributedCoordinator, LocalCoordinator
from ckptd.engine.flusher import Flusher
from ckptd.engine.policy import SavePolicy
from ckptd.engine.pool import HostPool
from ckptd.engine.signals import PreemptionHandler
from ckptd.engine.snapshot import Snapshot, Stager
from ckptd.engine.tiers import ENGINE_KEY, MemoryTier, StoreTier
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import CheckpointError, LayoutError
from ckptd.format.manifest import Manifest
from ckptd.format.tree import flatten

log = logging.getLogger(__name__)
SIGTERM_EXIT_CODE = 143


def find_optimizers(state: Any, depth: int = 0) -> list[torch.optim.Optimizer]:
    if isinstance(state, torch.optim.Optimizer):
        return [state]
    if depth > 8:
        return []
    values: Any = state.values() if isinstance(state, Mapping) else (
        state if isinstance(state, list | tuple) else ())
    return [o for v in values for o in find_optimizers(v, depth + 1)]


class Checkpointer:
    """See the module docstring; every keyword maps to a ``CheckpointerConfig`` field."""

    def __init__(
        self,
        uri: str,
        *,
        state: Mapping[str, Any],
        every: int | None = None,
        every_seconds: float | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        metric_mode: str = "min",
        memory_keep: int = 1,
        tiers: Sequence[TierConfig] = (),
        codec: CodecSpec | str | None = None,
        host_budget_bytes: int | None = None,
        layouts: Mapping[str, ShardSpec | Sequence[Any]] | None = None,
        catalog: str | None = None,
        run_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
        lazy: bool = True,
        handle_signals: bool = True,
        exit_on_preempt: bool = True,
        coordinator: Coordinator | None = None,
        config: CheckpointerConfig | None = None,
    ) -> None:
        self.config = config or CheckpointerConfig(
            uri=uri, every=every, every_seconds=every_seconds, memory_keep=memory_keep, tiers=tiers,
            retention=Retention(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
                                metric=metric, mode="max" if metric_mode == "max" else "min"),
            codec=codec, host_budget_bytes=host_budget_bytes, catalog=catalog, run_name=run_name,
            storage_options=storage_options, lazy=lazy, handle_signals=handle_signals,
            exit_on_preempt=exit_on_preempt)
        cfg = self.config
        self.state = state
        self.specs = {path: ShardSpec.of(v) for path, v in (layouts or {}).items()}
        self.coordinator = coordinator or self._default_coordinator(cfg.commit_timeout_s)
        self.rank = self.coordinator.rank
        now = time.monotonic()
        self._tier_configs = cfg.all_tiers()
        self.memory: MemoryTier | None = None
        self.stores: list[StoreTier] = []
        self.policies: dict[str, SavePolicy] = {}
        for t in self._tier_configs:
            self.policies[t.name] = SavePolicy(t, now=now)
            if t.kind == "memory":
                self.memory = MemoryTier(t)
            else:
                self.stores.append(StoreTier(t, self.coordinator, on_commit=self._on_commit))
        self.flushers = [Flusher(tier, i) for i, tier in enumerate(self.stores)]
        # held + flushing per durable tier, the memory tier's snapshots, and one being staged
        slots = 2 * len(self.stores) + (self.memory.keep if self.memory else 0) + 1
        self.pool = HostPool(max_slots=slots, budget_bytes=cfg.host_budget_bytes)
        self.stager = Stager(self.pool, lazy=cfg.lazy, chunk_bytes=cfg.copy_chunk_bytes)
        self.optimizers = find_optimizers(state)
        self.stager.guard(self.optimizers)
        self._held: dict[int, Snapshot] = {}
        self._seq = 0
        self.signals = PreemptionHandler()
        self._signals_installed = cfg.handle_signals and self.signals.install()
        self.catalog: CatalogNotifier | None = None
        if cfg.catalog and self.rank == 0:
            name = cfg.run_name or cfg.uri.rstrip("/").rsplit("/", 1)[-1]
            roots: dict[str, str] = {s.config.kind: s.run.url for s in self.stores}
            self.catalog = CatalogNotifier(cfg.catalog, run=name, roots=roots)
        self.last_saved: int | None = None
        self.blocked_s = 0.0
        """Total time ``step()``/``save()`` spent staging (the training-visible cost)."""
        self.restore_problems: list[str] = []
        self._closed = False

    @staticmethod
    def _default_coordinator(timeout_s: float) -> Coordinator:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return DistributedCoordinator(timeout_s=timeout_s)
        return LocalCoordinator()

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        clean = exc is None or (isinstance(exc, SystemExit) and self.signals.terminate)
        try:
            if clean:
                self.wait()  # raises background errors: the user must learn of a failed final save
            elif self.coordinator.world_size == 1:
                try:  # snapshots already staged are consistent: finish them, but never mask `exc`
                    self.wait()
                except CheckpointError as e:
                    log.error("checkpoint failed while handling another exception: %s", e)
        finally:
            self.close()

    # ---------------------------------------------------------------- save path
    def step(self, step: int, *, metrics: Mapping[str, float] | None = None) -> bool:
        """Step boundary: snapshot when a tier's policy fires. Returns whether a snapshot was taken."""
        self._check_open()
        self._raise_errors()
        now = time.monotonic()
        due = {t.name for t in self._tier_configs if self.policies[t.name].due_by_step(step)}
        timed = [int(self.policies[t.name].due_by_time(now)) for t in self._tier_configs]
        busy = [int(not f.idle) for f in self.flushers]
        preempt, terminate = int(self.signals.requested is not None), int(self.signals.terminate)
        agreed = self._agree([preempt, terminate, *timed, *busy])
        preempt, terminate = agreed[0], agreed[1]
        due.update(t.name for t, flag in zip(self._tier_configs, agreed[2:], strict=False) if flag)
        idle = [not b for b in agreed[2 + len(self._tier_configs):]]
        if preempt:
            self._snapshot(step, metrics, {t.name for t in self._tier_configs}, idle)
            self.wait()
            self.signals.clear()
            if terminate and self.config.exit_on_preempt:
                raise SystemExit(SIGTERM_EXIT_CODE)
            return True
        if due:
            self._snapshot(step, metrics, due, idle)
            return True
        self._pump(idle)
        return False

    def save(self, step: int, *, metrics: Mapping[str, float] | None = None) -> None:
        """Forced snapshot to every tier (on every rank at the same step); returns once staged."""
        self._check_open()
        self._raise_errors()
        idle = [not b for b in self._agree([int(not f.idle) for f in self.flushers])]
        self._snapshot(step, metrics, {t.name for t in self._tier_configs}, idle)

    def wait(self) -> None:
        """Return when every tier holds the newest snapshot durably; raise background errors."""
        self._check_open()
        while True:
            for f in self.flushers:
                f.wait_idle()
            if not self._held:
                break
            self._pump([not b for b in self._agree([int(not f.idle) for f in self.flushers])])
        self.stager.wait_all()
        self._raise_errors()

    def _agree(self, flags: list[int]) -> list[int]:
        """Element-wise maximum over the ranks (one small gloo all-reduce; free at world size 1)."""
        if self.coordinator.world_size == 1 or not flags:
            return flags
        return self.coordinator.agree_max_all(flags)

    def _snapshot(self, step: int, metrics: Mapping[str, float] | None, tiers: set[str],
                  idle: list[bool]) -> None:
        t0 = time.perf_counter()
        skeleton, tensors = flatten(self.state)
        for path, spec in self.specs.items():
            t = tensors.get(path)
            if t is not None and tuple(t.shape) != spec.box.shape:
                raise LayoutError(f"{path}: the local tensor has shape {tuple(t.shape)} but its box is "
                                  f"{list(spec.box.shape)}")
        rank_state = {"rng": rng.capture()} if self.config.save_rng else {}
        clean_metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        snap = self.stager.stage(step=step, skeleton=skeleton, tensors=tensors, specs=self.specs,
                                 rank_state=rank_state, metrics=clean_metrics, optimizers=self.optimizers,
                                 evict=self._evict)
        try:
            now = time.monotonic()
            if self.memory is not None and self.memory.name in tiers:
                self.memory.add(snap)
                self.policies[self.memory.name].saved(step, now)
            for i, tier in enumerate(self.stores):
                if tier.name in tiers:
                    old = self._held.pop(i, None)
                    if old is not None:
                        old.release()  # superseded before the tier was free: the newest wins
                    self._held[i] = snap.retain()
                    self.policies[tier.name].saved(step, now)
        finally:
            snap.release()
        self.last_saved = step
        self._pump(idle)
        self.blocked_s += time.perf_counter() - t0

    def _pump(self, idle: list[bool]) -> None:
        """Hand each free tier its newest held snapshot (``idle`` is agreed by every rank)."""
        for i in sorted(self._held):
            if i < len(idle) and idle[i]:
                snap = self._held.pop(i)
                self.flushers[i].submit(snap, self._seq)
                self._seq += 1
                snap.release()

    def _evict(self) -> bool:
        if self.memory is not None and self.memory.evict_oldest():
            return True
        if self.coordinator.world_size == 1 and self._held:  # multi-rank: held snapshots are agreed state
            self._held.pop(min(self._held)).release()
            return True
        return False

    def _raise_errors(self) -> None:
        errors = [e for f in self.flushers for e in f.take_errors()]
        if not errors:
            return
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also: {other}")
        raise first

    def _on_commit(self, tier: str, manifest: Manifest) -> None:
        if self.catalog is not None:
            store = next(s for s in self.stores if s.name == tier)
            self.catalog.committed(store.config.kind, f"{store.run.url}/step_{manifest.step:010d}", manifest)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")

    # ---------------------------------------------------------------- restore path
    def restore(self, step: int | None = None) -> int:
        """Load the newest committed, verified checkpoint (or ``step``) into the state; 0 when none.

        The fastest tier holding it is used. A checkpoint that fails to load (corrupt chunk,
        missing shard) is reported in ``restore_problems`` and the previous one is tried.
        """
        self._check_open()
        self.stager.wait_all()
        wanted = step
        if wanted is None and self.catalog is not None:
            wanted = self.catalog.rollback_step()
        if self.coordinator.world_size > 1:
            wanted = self.coordinator.agree_max(-1 if wanted is None else wanted)
            wanted = None if wanted < 0 else wanted
        below: int | None = None
        while True:
            candidates = self._candidates()
            if wanted is not None:
                candidates = [s for s in candidates if s == wanted]
            if below is not None:
                candidates = [s for s in candidates if s < below]
            choice = self.coordinator.agree_min(max(candidates, default=-1))
            if choice < 0:
                if wanted is not None:
                    raise CheckpointError(f"step {wanted} is not committed in any tier")
                if self.restore_problems:
                    raise CheckpointError("no committed checkpoint could be loaded: "
                                          + "; ".join(self.restore_problems))
                return 0
            ok = self._load(choice)
            if self.coordinator.agree_min(int(ok)):
                for p in self.policies.values():
                    p.saved(choice, time.monotonic())
                if wanted is not None and self.catalog is not None and step is None:
                    self.catalog.acknowledge_rollback()
                return choice
            below = choice

    def rollback(self) -> int:
        """Instant in-process rollback to the newest snapshot held in host memory."""
        if self.memory is None or not self.memory.steps():
            raise CheckpointError("no snapshot is held in host memory")
        step = self.memory.steps()[-1]
        self.stager.wait_all()
        snap = self.memory.load(step, self.state)
        if "rng" in snap.rank_state:
            rng.restore(snap.rank_state["rng"])
        return step

    def _candidates(self) -> list[int]:
        steps: set[int] = set(self.memory.steps()) if self.memory else set()
        for s in self.stores:
            try:
                steps.update(s.steps())
            except CheckpointError as e:
                self.restore_problems.append(f"{s.name}: {e}")
        return sorted(steps)

    def _load(self, step: int) -> bool:
        if self.memory is not None and self.memory.get(step) is not None:
            snap = self.memory.load(step, self.state)
            if "rng" in snap.rank_state:
                rng.restore(snap.rank_state["rng"])
            return True
        for s in self.stores:
            try:
                if not s.run.is_committed(step):
                    continue
                manifest = s.load(step, self.state, self.specs)
            except (CheckpointError, OSError) as e:
                self.restore_problems.append(f"{s.name} step {step}: {e}")
                log.warning("checkpoint step %d in %s cannot be restored: %s", step, s.name, e)
                continue
            meta = manifest.metadata.get(ENGINE_KEY, {})
            ranks = meta.get("rank_state", {}) if isinstance(meta, dict) else {}
            mine = ranks.get(str(self.rank)) if manifest.world_size == self.coordinator.world_size else None
            if isinstance(mine, dict) and "rng" in mine:
                rng.restore(mine["rng"])
            return True
        return False

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._signals_installed:
            self.signals.uninstall()
        self.stager.close()
        for f in self.flushers:
            f.close()
        for snap in self._held.values():
            snap.release()
        self._held.clear()
        if self.memory is not None:
            self.memory.close()
        self.pool.close()
        if self.catalog is not None:
            self.catalog.close()
        if not isinstance(self.coordinator, LocalCoordinator):
            self.coordinator.close()
