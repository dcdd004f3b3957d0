"""``ckptd.Checkpointer``: lazy, asynchronous, multi-level checkpoints around a training loop.

::

    with ckptd.Checkpointer("s3://bucket/runs/gpt", state={"model": model, "optim": opt},
                            every=100, keep_last=3) as ckpt:
        start = ckpt.restore()
        for step in range(start, total):
            ...
            ckpt.step(step + 1, metrics={"loss": loss})

With ``catalog=`` (rank 0 only) the run and every checkpoint (pending, then committed or
failed) are registered in the REST catalog from a background thread; ``restore(select=...)``
resolves ``best:<metric>`` and aliases through it, and an operator's rollback request
(``POST /api/v1/runs/{run}/rollback``) is applied in place at a step boundary, after which
``ckpt.rolled_back`` names the step the loop must continue from (see ``step()``).

At a step boundary where some tier's policy fires, ``step()`` stages a snapshot into the
reused host pool (optimizer-owned tensors lazily, see ``snapshot.py``) and returns; the
flush threads persist it. Everything the ranks must do together (which step to save, when
a busy tier takes the newest snapshot, what to restore) is decided at step boundaries on
the main thread, identically on every rank, so the collective commits always match.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ckptd.engine import rng
from ckptd.engine.agreement import Sample, StepAgreement
from ckptd.engine.catalog import CatalogLink
from ckptd.engine.config import CatalogConfig, CheckpointerConfig, Retention, ShardSpec, TierConfig
from ckptd.engine.coordination import Coordinator, DistributedCoordinator, LocalCoordinator
from ckptd.engine.dtensor_state import LocalState
from ckptd.engine.flusher import Flusher
from ckptd.engine.policy import SavePolicy
from ckptd.engine.pool import HostPool
from ckptd.engine.signals import PreemptionHandler
from ckptd.engine.snapshot import Snapshot, Stager
from ckptd.engine.tiers import MemoryTier, StoreTier
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import CheckpointError, LayoutError
from ckptd.format.manifest import Manifest
from ckptd.format.run import step_dir

if TYPE_CHECKING:
    from ckptd.wire.client import RollbackPointer

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
        catalog: str | CatalogConfig | None = None,
        run_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
        lazy: bool = True,
        handle_signals: bool = True,
        exit_on_preempt: bool = True,
        coordinator: Coordinator | None = None,
        config: CheckpointerConfig | None = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        agree_every: int = 1,
    ) -> None:
        self.config = config or CheckpointerConfig(
            uri=uri, every=every, every_seconds=every_seconds, memory_keep=memory_keep, tiers=tiers,
            retention=Retention(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
                                metric=metric, mode="max" if metric_mode == "max" else "min"),
            codec=codec, host_budget_bytes=host_budget_bytes, catalog=catalog, run_name=run_name,
            storage_options=storage_options, lazy=lazy, handle_signals=handle_signals,
            exit_on_preempt=exit_on_preempt, agree_every=agree_every)
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
                self.stores.append(StoreTier(t, self.coordinator, on_commit=self._on_commit,
                                             on_pending=self._on_pending, on_failed=self._on_failed))
        self.flushers = [Flusher(tier, i) for i, tier in enumerate(self.stores)]
        # held + flushing per durable tier, the memory tier's snapshots, and one being staged
        slots = 2 * len(self.stores) + (self.memory.keep if self.memory else 0) + 1
        self.pool = HostPool(max_slots=slots, budget_bytes=cfg.host_budget_bytes)
        self.stager = Stager(self.pool, lazy=cfg.lazy, chunk_bytes=cfg.copy_chunk_bytes)
        # Optimizers in the state tree are found; ones whose tensors the state holds only as
        # views (a trainer's canonical adapter) are passed explicitly. Both get the pre-step hook.
        found = find_optimizers(state)
        self.optimizers = found + [o for o in optimizers if all(o is not f for f in found)]
        self.stager.guard(self.optimizers)
        self._held: dict[int, Snapshot] = {}
        self._seq = 0
        self.agreement = StepAgreement(self.coordinator, cfg.agree_every)
        # Boundaries (``agreement.boundary``) of the latest actions, so that a sample agreed before
        # an action never repeats it (see ``_decide``); identical on every rank.
        self._submitted_at = [0] * len(self.stores)
        self._snapshot_at = {t.name: 0 for t in self._tier_configs}
        self._preempted_at = 0
        self._pointer: RollbackPointer | None = None
        self.signals = PreemptionHandler()
        self._signals_installed = cfg.handle_signals and self.signals.install()
        self.catalog: CatalogLink | None = None
        if isinstance(cfg.catalog, CatalogConfig) and self.rank == 0:
            name = cfg.run_name or cfg.uri.rstrip("/").rsplit("/", 1)[-1]
            roots: dict[str, str] = {s.config.kind: s.run.url for s in self.stores}
            self.catalog = CatalogLink(cfg.catalog, run=name, roots=roots)
        self.rolled_back: int | None = None
        """The step restored in place by the last ``step()`` call (an operator's rollback from the
        catalog), else None. When set, the live state is that checkpoint's: continue from it."""
        self._parent: int | None = None
        self._parents: dict[int, int | None] = {}
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
        """Step boundary (``step`` = optimizer steps done): snapshot when a tier's policy fires.

        Returns whether a snapshot was taken. When the catalog's rollback pointer names a
        checkpoint (polled in the background by rank 0), every rank restores it here instead,
        in place, from its fastest tier holding it, and ``self.rolled_back`` is that step
        (None after any other call): the loop must continue from it::

            step = ckpt.restore()
            while step < total:
                loss = train_step()
                step += 1
                ckpt.step(step, metrics={"loss": loss})
                if ckpt.rolled_back is not None:
                    step = ckpt.rolled_back
        """
        self._check_open()
        self.rolled_back = None
        self._raise_errors()
        now = time.monotonic()
        due = {t.name for t in self._tier_configs if self.policies[t.name].due_by_step(step)}
        timed = [int(self.policies[t.name].due_by_time(now)) for t in self._tier_configs]
        busy = [int(not f.idle) for f in self.flushers]
        preempt, terminate = int(self.signals.requested is not None), int(self.signals.terminate)
        pointer = self.catalog.take_rollback() if self.catalog is not None else None
        if pointer is not None:
            self._pointer = pointer  # rank 0 alone knows it; the target step travels in the flags
        target = self._pointer.checkpoint.step + 1 if self._pointer is not None else 0
        # Non-blocking: the flags agreed here come from an earlier boundary (see agreement.py).
        sample = self.agreement.exchange([preempt, terminate, target, *timed, *busy])
        idle = [False] * len(self.flushers)
        if sample is not None:
            preempt, terminate, target, timed_due, idle = self._decide(sample)
            due.update(timed_due)
        else:
            preempt = terminate = 0
            target = -1
        if preempt:
            self._preempted_at = self.agreement.boundary
            self._snapshot(step, metrics, {t.name for t in self._tier_configs}, idle)
            self.wait()
            self.signals.clear()
            if terminate and self.config.exit_on_preempt:
                raise SystemExit(SIGTERM_EXIT_CODE)
            return True
        if target >= 0:
            pointer, self._pointer = self._pointer, None
            self._roll_back_in_place(target, pointer)
            return False
        if due:
            self._snapshot(step, metrics, due, idle)
            return True
        self._pump(idle)
        return False

    def _decide(self, sample: Sample) -> tuple[int, int, int, set[str], list[bool]]:
        """(preempt, terminate, rollback target or -1, tiers due by time, free flushers) from an
        agreed sample. Flags raised before an action the job already took since the sample was
        taken are spent: they must not trigger it twice."""
        flags, taken = sample.flags, sample.boundary
        n = len(self._tier_configs)
        preempt = flags[0] if self._preempted_at < taken else 0
        timed = {t.name for t, f in zip(self._tier_configs, flags[3 : 3 + n], strict=True)
                 if f and self._snapshot_at[t.name] < taken}
        idle = [not b and self._submitted_at[i] < taken for i, b in enumerate(flags[3 + n :])]
        return preempt, flags[1] if preempt else 0, flags[2] - 1, timed, idle

    def save(self, step: int, *, metrics: Mapping[str, float] | None = None) -> None:
        """Forced snapshot to every tier (on every rank at the same step); returns once staged."""
        self._check_open()
        self._raise_errors()
        self._snapshot(step, metrics, {t.name for t in self._tier_configs}, self._idle_now())

    def wait(self) -> None:
        """Return when every tier holds the newest snapshot durably; raise background errors."""
        self._check_open()
        while True:
            for f in self.flushers:
                f.wait_idle()
            if not self._held:
                break
            self._pump(self._idle_now())
        self.stager.wait_all()
        self._raise_errors()

    def _idle_now(self) -> list[bool]:
        """Which flushers are free on every rank, agreed synchronously (explicit calls only)."""
        if not self.flushers:
            return []
        return [not b for b in self.agreement.now([int(not f.idle) for f in self.flushers]).flags]

    def _snapshot(self, step: int, metrics: Mapping[str, float] | None, tiers: set[str],
                  idle: list[bool]) -> None:
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
        clean_metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        for k in [k for k, v in clean_metrics.items() if not math.isfinite(v)]:
            # a manifest is strict JSON (no NaN): a diverged loss must not cost the checkpoint itself
            del clean_metrics[k]
            log.warning("step %d: metric %r is not finite; it is left out of the checkpoint", step, k)
        snap = self.stager.stage(step=step, skeleton=skeleton, tensors=tensors, specs=specs,
                                 rank_state=rank_state, metrics=clean_metrics, optimizers=self.optimizers,
                                 evict=self._evict)
        try:
            now = time.monotonic()
            for name in tiers:
                self._snapshot_at[name] = self.agreement.boundary
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
        self._parents[step] = self._parent
        self._parent = step
        for older in [k for k in self._parents if k < step][:-64]:
            del self._parents[older]
        self._pump(idle)
        self.blocked_s += time.perf_counter() - t0

    def _pump(self, idle: list[bool]) -> None:
        """Hand each free tier its newest held snapshot (``idle`` is agreed by every rank)."""
        for i in sorted(self._held):
            if i < len(idle) and idle[i]:
                snap = self._held.pop(i)
                self._submitted_at[i] = self.agreement.boundary
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

    # ---------------------------------------------------------------- catalog notifications
    # Called on the flush threads of rank 0; each only queues a notification (never blocks).
    def _where(self, tier: str, step: int) -> tuple[str, str]:
        store = next(s for s in self.stores if s.name == tier)
        return store.config.kind, f"{store.run.url}/{step_dir(step)}"

    def _on_pending(self, tier: str, snap: Snapshot) -> None:
        if self.catalog is not None:
            kind, uri = self._where(tier, snap.step)
            self.catalog.pending(kind, uri, snap.step, snap.metrics, self._parents.get(snap.step))

    def _on_commit(self, tier: str, manifest: Manifest) -> None:
        if self.catalog is not None:
            kind, uri = self._where(tier, manifest.step)
            self.catalog.committed(kind, uri, manifest, self._parents.get(manifest.step))

    def _on_failed(self, tier: str, step: int, error: BaseException) -> None:
        if self.catalog is not None:
            kind, uri = self._where(tier, step)
            self.catalog.failed(kind, uri, step, f"{type(error).__name__}: {error}")

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")

    # ---------------------------------------------------------------- restore path
    def restore(self, step: int | None = None, *, select: str | int | None = None) -> int:
        """Load a committed, verified checkpoint into the state and return its step (0: none).

        Which one (``step=n`` is the same as ``select=n``):

        * nothing, or ``select="latest"``: the catalog's rollback pointer when an operator set one
          (it is then acknowledged, and the checkpoints after it are discarded: that trajectory
          was abandoned), else the newest committed checkpoint in storage (the source of truth:
          a catalog that was down may lag behind it). A damaged one is reported in
          ``restore_problems`` and the previous one is tried;
        * an int ``n`` or ``"step:n"``: exactly that step;
        * ``"best:<metric>"`` (``best:<metric>:max`` for accuracies): through the catalog, or from the
          metrics recorded in the manifests when no catalog answers;
        * any other string: a user alias of the run in the catalog; ``CheckpointError`` when the
          catalog is not configured, unreachable, or has no such alias.

        The fastest tier holding the chosen checkpoint is read. Rank 0 resolves the selection
        (only it talks to the catalog); the ranks agree on it over the engine's own group.
        """
        self._check_open()
        self.stager.wait_all()
        if step is not None and select is not None:
            raise CheckpointError("give restore() a step or a select, not both")
        selection = step if select is None else select
        wanted: int | None = None
        pointer: RollbackPointer | None = None
        problem: str | None = None
        if self.rank == 0 or isinstance(selection, int):
            try:
                wanted, pointer = self._resolve(selection)
            except CheckpointError as e:
                if self.coordinator.world_size == 1:
                    raise
                problem = str(e)
        if self.coordinator.world_size > 1:
            flags = self.coordinator.agree_max_all(
                [0 if wanted is None else wanted + 1, int(problem is not None), int(pointer is not None)])
            wanted = flags[0] - 1 if flags[0] > 0 else None
            if flags[1]:
                raise CheckpointError(problem or f"rank 0 could not resolve select={selection!r}")
            from_pointer = bool(flags[2])
        else:
            from_pointer = pointer is not None
        # Rank 0 lists the tiers once and proposes; every rank loads the proposal (its memory tier,
        # else one manifest read per tier) and the job agrees on the outcome. Other ranks never
        # list storage: per-rank restore metadata stays independent of the world size.
        candidates = self._candidates() if self.rank == 0 else []
        if wanted is not None:
            candidates = [s for s in candidates if s == wanted]
        while True:
            proposal = max(candidates, default=-1)
            if self.coordinator.world_size > 1:
                proposal = self.coordinator.agree_max_all([proposal if self.rank == 0 else -1])[0]
            if proposal < 0:
                if wanted is not None:
                    raise CheckpointError(f"step {wanted} is not committed in any tier"
                                          + (f" ({'; '.join(self.restore_problems)})"
                                             if self.restore_problems else ""))
                if self.restore_problems:
                    raise CheckpointError("no committed checkpoint could be loaded: "
                                          + "; ".join(self.restore_problems))
                return 0
            ok = self._load(proposal)
            if self._agree_min(int(ok)):
                self._resumed(proposal, pointer, discard_newer=from_pointer)
                return proposal
            candidates = [s for s in candidates if s < proposal]

    def _agree_min(self, value: int) -> int:
        if self.coordinator.world_size == 1:
            return value
        return -self.coordinator.agree_max_all([-value])[0]

    def _resolve(self, selection: str | int | None) -> tuple[int | None, RollbackPointer | None]:
        """(step to restore or None for the newest, the rollback pointer it comes from)."""
        if selection is None or selection == "latest":
            pointer = self.catalog.rollback_pointer() if self.catalog is not None else None
            return (None, None) if pointer is None else (pointer.checkpoint.step, pointer)
        if isinstance(selection, str) and selection.startswith("step:"):
            try:
                selection = int(selection[len("step:"):])
            except ValueError:
                raise CheckpointError(f"select={selection!r}: the step must be an integer") from None
        if isinstance(selection, int) and not isinstance(selection, bool):
            if selection < 0:
                raise CheckpointError(f"cannot restore a negative step ({selection})")
            return selection, None
        if not isinstance(selection, str) or not selection:
            raise CheckpointError(f"select must be 'latest', 'best:<metric>', a step or an alias, "
                                  f"got {selection!r}")
        ref = self.catalog.resolve(selection) if self.catalog is not None else None
        if ref is not None:
            return ref.step, None
        if selection.startswith("best:"):
            metric, _, mode = selection[len("best:"):].partition(":")
            if not metric or mode not in ("", "min", "max"):
                raise CheckpointError(f"select={selection!r} must be best:<metric>[:min|:max]")
            best = self._best_in_storage(metric, maximize=mode == "max")
            if best is None:
                raise CheckpointError(f"no committed checkpoint of this run records the metric {metric!r}")
            return best, None
        if self.catalog is None:
            raise CheckpointError(f"select={selection!r} names an alias, and aliases live in the catalog: "
                                  "pass Checkpointer(catalog=...)")
        if not self.catalog.reachable():
            raise CheckpointError(f"cannot resolve alias {selection!r}: the catalog at "
                                  f"{self.catalog.config.url} is unreachable")
        raise CheckpointError(f"the catalog at {self.catalog.config.url} has no committed checkpoint "
                              f"named {selection!r} in run {self.catalog.run!r}")

    def _best_in_storage(self, metric: str, *, maximize: bool) -> int | None:
        """The committed step with the best ``metric`` in its manifest (newest on ties)."""
        scored: list[tuple[float, int]] = []
        for store in self.stores:
            try:
                steps = store.steps()
            except CheckpointError as e:
                self.restore_problems.append(f"{store.name}: {e}")
                continue
            for s in steps:
                value = store.metrics_of(s).get(metric)
                if value is not None:
                    scored.append((-value if maximize else value, -s))
        return -min(scored)[1] if scored else None

    def _resumed(self, step: int, pointer: RollbackPointer | None, *, discard_newer: bool) -> None:
        """Bookkeeping after every rank loaded checkpoint ``step``."""
        now = time.monotonic()
        for p in self.policies.values():
            p.saved(step, now)
        for store in self.stores:
            store.committed.append(step)  # saving this step again (a forced save) is not a new commit
        self._parent = step
        if discard_newer:  # a rollback: what came after ``step`` is an abandoned trajectory
            if self.memory is not None:
                self.memory.discard_after(step)
            for store in self.stores:
                try:
                    gone = store.discard_after(step)
                except (CheckpointError, OSError) as e:
                    log.warning("%s: could not discard the checkpoints after step %d: %s",
                                store.name, step, e)
                    continue
                if gone:
                    log.info("%s: rollback to step %d discarded steps %s", store.name, step, gone)
        if self.catalog is not None and pointer is not None:
            self.catalog.forget_after(step)
            self.catalog.rollback_done(pointer)

    def _holds(self, step: int) -> bool:
        if self.memory is not None and self.memory.get(step) is not None:
            return True
        for s in self.stores:
            try:
                if s.run.is_committed(step):
                    return True
            except (CheckpointError, OSError):
                continue
        return False

    def _roll_back_in_place(self, target: int, pointer: RollbackPointer | None) -> None:
        """Every rank: restore checkpoint ``target`` into the live state at this step boundary."""
        t0 = time.perf_counter()
        self.stager.wait_all()  # lazy copies read the live tensors we are about to overwrite
        for i in [i for i, snap in self._held.items() if snap.step > target]:
            self._held.pop(i).release()  # never persist a snapshot of the abandoned trajectory
        for f in self.flushers:
            f.wait_idle()  # a persist in flight (collective) ends before its step may be discarded
        if not self._agree_min(int(self._holds(target))):
            log.error("rollback to step %d requested through the catalog: no tier holds it on every "
                      "rank; training continues from the current state", target)
            if self.catalog is not None and pointer is not None:
                self.catalog.rollback_skipped(pointer)
            return
        ok = self._load(target)
        if not self._agree_min(int(ok)):
            why = "; ".join(self.restore_problems[-3:])
            raise CheckpointError(f"rollback to step {target} failed ({why}); the live state may be partly "
                                  "restored")
        self._resumed(target, pointer, discard_newer=True)
        self.rolled_back = target
        self.blocked_s += time.perf_counter() - t0
        log.warning("rolled back in place to step %d (requested through the catalog%s)", target,
                    f": {pointer.reason}" if pointer is not None and pointer.reason else "")

    def rollback(self) -> int:
        """Instant in-process rollback to the newest snapshot held in host memory."""
        if self.memory is None or not self.memory.steps():
            raise CheckpointError("no snapshot is held in host memory")
        step = self.memory.steps()[-1]
        self.stager.wait_all()
        local = LocalState(self.state)  # DTensors are restored through their local shards
        snap = self.memory.load(step, local.view)
        local.write_back()
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
        local = LocalState(self.state)  # DTensors of any mesh: each rank fills its local shards' boxes
        if self.memory is not None and self.memory.get(step) is not None:
            snap = self.memory.load(step, local.view)
            local.write_back()
            if "rng" in snap.rank_state:
                rng.restore(snap.rank_state["rng"])
            return True
        for s in self.stores:
            try:
                if not s.run.is_committed(step):
                    continue
                manifest = s.load(step, local.view, {**local.specs(), **self.specs})
                local.write_back()
            except (CheckpointError, OSError) as e:
                self.restore_problems.append(f"{s.name} step {step}: {e}")
                log.warning("checkpoint step %d in %s cannot be restored: %s", step, s.name, e)
                continue
            mine = s.rank_state(manifest, self.rank) if manifest.world_size == self.coordinator.world_size \
                else None
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
        try:
            self.agreement.drain()
        except Exception as e:  # a peer that died must not turn close() into a hang or a crash
            log.warning("step agreement could not be drained at close: %s", e)
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
