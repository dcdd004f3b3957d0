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
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ckptd.engine.agreement import StepAgreement
from ckptd.engine.catalog import CatalogLink
from ckptd.engine.config import CatalogConfig, CheckpointerConfig, Retention, ShardSpec, TierConfig
from ckptd.engine.coordination import Coordinator, DistributedCoordinator, LocalCoordinator
from ckptd.engine.flusher import Flusher
from ckptd.engine.policy import SavePolicy
from ckptd.engine.pool import HostPool
from ckptd.engine.restore_path import RestorePath, parse_restore_selection
from ckptd.engine.save_path import Notify, SavePath
from ckptd.engine.signals import PreemptionHandler
from ckptd.engine.snapshot import Snapshot, Stager
from ckptd.engine.tiers import MemoryTier, StoreTier
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import CheckpointError, ConfigError
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


def _config_from(uri: str | None, config: CheckpointerConfig | None,
                 options: dict[str, Any]) -> CheckpointerConfig:
    """The config, from ``config=`` or from the keywords: never both (a keyword given beside a
    config would be silently ignored, so it is an error)."""
    if config is not None:
        given = sorted(k for k, v in options.items() if v != _KEYWORD_DEFAULTS[k])
        if uri is not None and uri != config.uri:
            given.insert(0, "uri")
        if given:
            raise ConfigError(f"Checkpointer(config=...) takes its settings from the config; also given: "
                              f"{', '.join(given)}. Set them on the CheckpointerConfig instead")
        return config
    if uri is None:
        raise ConfigError("Checkpointer needs a run root: Checkpointer(uri, state=...) or config=")
    mode = options.pop("metric_mode")
    if mode not in ("min", "max"):
        raise ConfigError(f"metric_mode must be 'min' (losses) or 'max' (accuracies), got {mode!r}")
    retention = Retention(keep_last=options.pop("keep_last"), keep_every=options.pop("keep_every"),
                          keep_best=options.pop("keep_best"), metric=options.pop("metric"), mode=mode)
    return CheckpointerConfig(uri=uri, retention=retention, **options)


_KEYWORD_DEFAULTS: dict[str, Any] = {
    "every": None, "every_seconds": None, "keep_last": None, "keep_every": None, "keep_best": None,
    "metric": None, "metric_mode": "min", "memory_keep": 1, "tiers": (), "codec": None,
    "host_budget_bytes": None, "catalog": None, "run_name": None, "storage_options": None, "lazy": True,
    "handle_signals": True, "exit_on_preempt": True, "agree_every": 1, "direct_io": False,
}
"""``Checkpointer`` keywords that map to ``CheckpointerConfig`` fields, with their defaults."""


class Checkpointer:
    """See the module docstring; every keyword but ``state``, ``layouts``, ``coordinator`` and
    ``optimizers`` maps to a ``CheckpointerConfig`` field: pass either those keywords or ``config=``."""

    def __init__(
        self,
        uri: str | None = None,
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
        direct_io: bool = False,
    ) -> None:
        self.config = _config_from(uri, config, {
            "every": every, "every_seconds": every_seconds, "keep_last": keep_last, "keep_every": keep_every,
            "keep_best": keep_best, "metric": metric, "metric_mode": metric_mode, "memory_keep": memory_keep,
            "tiers": tiers, "codec": codec, "host_budget_bytes": host_budget_bytes, "catalog": catalog,
            "run_name": run_name, "storage_options": storage_options, "lazy": lazy,
            "handle_signals": handle_signals, "exit_on_preempt": exit_on_preempt, "agree_every": agree_every,
            "direct_io": direct_io})
        self.state = state
        self.coordinator = coordinator or self._default_coordinator(self.config.commit_timeout_s)
        self.rank = self.coordinator.rank
        self.catalog: CatalogLink | None = None  # the tiers' callbacks read it from the flush threads
        # Optimizers in the state tree are found; ones whose tensors the state holds only as
        # views (a trainer's canonical adapter) are passed explicitly. Both get the pre-step hook.
        found = find_optimizers(state)
        self.saving = SavePath(
            self.config, state=state, specs={path: ShardSpec.of(v) for path, v in (layouts or {}).items()},
            coordinator=self.coordinator,
            optimizers=found + [o for o in optimizers if all(o is not f for f in found)],
            notify=Notify(pending=self._on_pending, committed=self._on_commit, failed=self._on_failed))
        self.signals = PreemptionHandler()
        self._signals_installed = self.config.handle_signals and self.signals.install()
        self._pointer: RollbackPointer | None = None
        self.catalog = self._catalog_link()
        self.restoring = RestorePath(self.saving, coordinator=self.coordinator, catalog=self.catalog)
        self.rolled_back: int | None = None
        """The step restored in place by the last ``step()`` call (an operator's rollback from the
        catalog), else None. When set, the live state is that checkpoint's: continue from it."""
        self._closed = False

    def _catalog_link(self) -> CatalogLink | None:
        cfg = self.config
        if not isinstance(cfg.catalog, CatalogConfig) or self.rank != 0:
            return None
        name = cfg.run_name or cfg.uri.rstrip("/").rsplit("/", 1)[-1]
        roots: dict[str, str] = {s.config.kind: s.run.url for s in self.stores}
        return CatalogLink(cfg.catalog, run=name, roots=roots)

    @staticmethod
    def _default_coordinator(timeout_s: float) -> Coordinator:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return DistributedCoordinator(timeout_s=timeout_s)
        return LocalCoordinator()

    # ---------------------------------------------------------------- the parts, for inspection
    @property
    def memory(self) -> MemoryTier | None:
        return self.saving.memory

    @property
    def stores(self) -> list[StoreTier]:
        return self.saving.stores

    @property
    def flushers(self) -> list[Flusher]:
        return self.saving.flushers

    @property
    def policies(self) -> dict[str, SavePolicy]:
        return self.saving.policies

    @property
    def pool(self) -> HostPool:
        return self.saving.pool

    @property
    def stager(self) -> Stager:
        return self.saving.stager

    @property
    def agreement(self) -> StepAgreement:
        return self.saving.agreement

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.saving.optimizers

    @property
    def last_saved(self) -> int | None:
        """The step of the newest snapshot staged (or None)."""
        return self.saving.last_saved

    @property
    def blocked_s(self) -> float:
        """Total time ``step()``/``save()`` spent staging (the training-visible cost)."""
        return self.saving.blocked_s

    @property
    def restore_problems(self) -> list[str]:
        """Why checkpoints could not be listed or loaded by ``restore()`` and rollbacks."""
        return self.restoring.problems

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
        self.saving.raise_errors()
        pointer = self.catalog.take_rollback() if self.catalog is not None else None
        if pointer is not None:
            self._pointer = pointer  # rank 0 alone knows it; the target step travels in the vote
        target = self._pointer.checkpoint.step if self._pointer is not None else None
        decision = self.saving.vote(step, self.signals, target)
        if decision.preempt:
            self.saving.preempted_at = self.saving.agreement.boundary
            self.saving.snapshot(step, metrics, self.saving.tier_names, decision.idle)
            self.wait()
            self.signals.clear()
            if decision.terminate and self.config.exit_on_preempt:
                raise SystemExit(SIGTERM_EXIT_CODE)
            return True
        if decision.rollback_to is not None:
            pointer, self._pointer = self._pointer, None
            if self.restoring.roll_back_in_place(decision.rollback_to, pointer):
                self.rolled_back = decision.rollback_to
            return False
        if decision.due:
            self.saving.snapshot(step, metrics, decision.due, decision.idle)
            return True
        self.saving.pump(decision.idle)
        return False

    def save(self, step: int, *, metrics: Mapping[str, float] | None = None) -> None:
        """Forced snapshot to every tier (on every rank at the same step); returns once staged."""
        self._check_open()
        self.saving.raise_errors()
        self.saving.snapshot(step, metrics, self.saving.tier_names, self.saving.idle_now())

    def wait(self) -> None:
        """Return when every tier holds the newest snapshot durably; raise background errors."""
        self._check_open()
        self.saving.wait()

    # ---------------------------------------------------------------- catalog notifications
    # Called on the flush threads of rank 0; each only queues a notification (never blocks).
    def _where(self, tier: str, step: int) -> tuple[str, str]:
        store = next(s for s in self.stores if s.name == tier)
        return store.config.kind, f"{store.run.url}/{step_dir(step)}"

    def _on_pending(self, tier: str, snap: Snapshot) -> None:
        if self.catalog is not None:
            kind, uri = self._where(tier, snap.step)
            self.catalog.pending(kind, uri, snap.step, snap.metrics, self.saving.parents.get(snap.step))

    def _on_commit(self, tier: str, manifest: Manifest) -> None:
        if self.catalog is not None:
            kind, uri = self._where(tier, manifest.step)
            self.catalog.committed(kind, uri, manifest, self.saving.parents.get(manifest.step))

    def _on_failed(self, tier: str, step: int, error: BaseException) -> None:
        if self.catalog is not None:
            kind, uri = self._where(tier, step)
            self.catalog.failed(kind, uri, step, f"{type(error).__name__}: {error}")

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this Checkpointer is closed")

    # ---------------------------------------------------------------- restore path
    def restore(self, step: int | None = None, *, select: str | int | None = None) -> int:
        """Load a committed, verified checkpoint into the state and return its step (0: none).

        Which one (``step=n`` is the same as ``select=n``; the grammar is ``ckptd.wire.selector``):

        * nothing, or ``select="latest"``: the catalog's rollback pointer when an operator set one
          (it is then acknowledged, and the checkpoints after it are discarded: that trajectory
          was abandoned), else the newest committed checkpoint in storage (the source of truth:
          a catalog that was down may lag behind it). A damaged one is reported in
          ``restore_problems`` and the previous one is tried;
        * an int ``n`` or ``"step:n"``: exactly that step;
        * ``"best:<metric>"`` (``best:<metric>:max`` for accuracies): through the catalog, or from the
          metrics recorded in the manifests when no catalog answers;
        * any other string: a user alias of the run in the catalog.

        An invalid selector raises ``ConfigError``; a checkpoint that cannot be found (no such
        step, metric or alias) ``CheckpointNotFoundError``; an unreachable catalog ``StorageError``.
        The fastest tier holding the chosen checkpoint is read. Rank 0 resolves the selection
        (only it talks to the catalog); the ranks agree on it over the engine's own group.
        """
        self._check_open()
        return self.restoring.restore(parse_restore_selection(step, select))

    def rollback(self) -> int:
        """Instant in-process rollback to the newest snapshot held in host memory."""
        return self.restoring.rollback()

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._signals_installed:
            self.signals.uninstall()
        self.saving.close()
        if self.catalog is not None:
            self.catalog.close()
        if not isinstance(self.coordinator, LocalCoordinator):
            self.coordinator.close()
