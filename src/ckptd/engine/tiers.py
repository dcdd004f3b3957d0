"""The levels a snapshot lives on: host memory, and run roots on local disk or object storage.

``MemoryTier`` keeps the newest snapshots in the host pool (instant in-process rollback).
``StoreTier`` persists a snapshot as a committed checkpoint of the universal format: every
rank writes its own boxes, rank 0 commits (manifest last) through the coordinator, then
applies the tier's retention. A failed persist never touches committed checkpoints: the
partial directory has no manifest, so readers never see it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckptd.engine.config import ShardSpec, TierConfig
from ckptd.engine.coordination import Coordinator, Gathered
from ckptd.engine.policy import to_delete
from ckptd.engine.snapshot import Snapshot
from ckptd.format.boxes import ShardBox
from ckptd.format.commit import check_tally, publish
from ckptd.format.commit_record import LEASE_NAME, meta_key
from ckptd.format.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    LayoutError,
    StorageError,
)
from ckptd.format.lease import Lease
from ckptd.format.manifest import Manifest, Totals
from ckptd.format.rank_array import encode_rank_chunk, rank_chunk_key
from ckptd.format.run import Run, step_dir
from ckptd.format.tree import flatten as flatten_tree
from ckptd.format.tree import restore as restore_tree
from ckptd.format.writer import CheckpointWriter, WriterReport
from ckptd.storage import LocalStore, open_store

ENGINE_KEY = "ckptd.engine"
"""Manifest metadata written by the engine (format v1 also kept the per-rank RNG states there)."""

Committed = Callable[[str, Manifest], None]
Pending = Callable[[str, Snapshot], None]
Failed = Callable[[str, int, BaseException], None]
"""Observers of a store tier's checkpoints (rank 0 only; they must return at once: the engine's
catalog link just queues a notification)."""


class MemoryTier:
    """The newest ``keep_last`` snapshots, held in the host pool."""

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self.name = config.name
        self.keep = config.retention.keep_last or 1
        self._snapshots: collections.deque[Snapshot] = collections.deque()

    def add(self, snap: Snapshot) -> None:
        self._snapshots.append(snap.retain())
        while len(self._snapshots) > self.keep:
            self._snapshots.popleft().release()

    def evict_oldest(self) -> bool:
        """Give a slot back to the pool under memory pressure (this tier is a cache)."""
        if not self._snapshots:
            return False
        self._snapshots.popleft().release()
        return True

    def steps(self) -> list[int]:
        return [s.step for s in self._snapshots]

    def discard_after(self, step: int) -> None:
        """Drop snapshots newer than ``step`` (a rollback abandoned them)."""
        keep = [s for s in self._snapshots if s.step <= step]
        for s in self._snapshots:
            if s.step > step:
                s.release()
        self._snapshots = collections.deque(keep)

    def get(self, step: int) -> Snapshot | None:
        return next((s for s in self._snapshots if s.step == step), None)

    def load(self, step: int, state: Any) -> Snapshot:
        snap = self.get(step)
        if snap is None:
            raise CheckpointNotFoundError(f"step {step} is not held in host memory")
        snap.wait_copied()

        def read(path: str, dest: torch.Tensor | None) -> torch.Tensor:
            src = snap.host[path]
            if dest is None:
                return src.clone()
            with torch.no_grad():
                dest.copy_(src)
            return dest

        restore_tree(state, snap.skeleton, read)
        return snap

    def close(self) -> None:
        while self._snapshots:
            self._snapshots.popleft().release()


class StoreTier:
    """A run root (local path or fsspec URL) with the tier's retention."""

    def __init__(self, config: TierConfig, coordinator: Coordinator, *,
                 on_commit: Committed | None = None, on_pending: Pending | None = None,
                 on_failed: Failed | None = None) -> None:
        assert config.uri is not None
        self.config = config
        self.name = config.name
        self.coordinator = coordinator
        self.run = Run(open_store(config.uri, config.storage_options))
        self.on_commit = on_commit
        self.on_pending = on_pending
        self.on_failed = on_failed
        self._metrics: dict[int, dict[str, float]] = {}
        self.committed: list[int] = []
        """Steps this process committed (or saw committed by its job), in order."""

    # ---------------------------------------------------------------- save
    def persist(self, snap: Snapshot, key: str) -> None:
        """Write ``snap`` as checkpoint ``snap.step`` (collective over the job's ranks).

        Every attempt writes into its own directory and commits exclusively: a step another
        writer committed (a zombie of an earlier job) fails with ``CheckpointExistsError`` and
        the two never mix. A step this job already committed (a forced save after a periodic
        one) is skipped, identically on every rank.
        """
        snap.wait_copied()
        if snap.step in self.committed:
            return
        rank, world = self.coordinator.rank, self.coordinator.world_size
        attempt = self.coordinator.attempt_name(f"{self.name}/{key}")
        if rank == 0 and self.on_pending is not None:
            self.on_pending(self.name, snap)
        lease: list[Lease] = []
        try:
            self.coordinator.commit(
                key,
                open_attempt=lambda: lease.append(self._open(snap.step, attempt)),
                write=lambda: self._write(snap, attempt, rank, world),
                finalize=lambda gathered: self._finalize(snap, attempt, gathered, lease[0]),
            )
        except BaseException as e:
            if rank == 0:
                self._discard(snap.step, attempt)
                if self.on_failed is not None:
                    self.on_failed(self.name, snap.step, e)
            if isinstance(e, CheckpointError):
                raise
            raise StorageError(f"{self.name}: checkpoint of step {snap.step} failed: {e}",
                               url=self.run.url) from e
        finally:
            for held in lease:
                held.__exit__()
        self.committed.append(snap.step)
        del self.committed[:-64]

    def _open(self, step: int, attempt: str) -> Lease:
        if self.run.is_committed(step):
            raise CheckpointExistsError(f"{self.name}: step {step} is already committed in {self.run.url} "
                                        "by another writer")
        return Lease(self.run.checkpoint_store(step), meta_key(attempt, LEASE_NAME)).__enter__()

    def _write(self, snap: Snapshot, attempt: str, rank: int, world: int) -> WriterReport:
        cfg = self.config
        store = self.run.attempt_store(snap.step, attempt)
        if isinstance(store, LocalStore):
            store.direct_io = cfg.direct_io  # like threads, a setting of each save
        writer = CheckpointWriter(store, rank=rank, codec=cfg.codec, chunk_bytes=cfg.chunk_bytes,
                                  threads=cfg.threads)
        for path in snap.paths:
            spec = snap.specs.get(path)
            tensor = snap.host[path]
            if spec is None:
                if rank == 0:  # a tensor without a layout is replicated: the lowest rank writes it
                    writer.add(path, tensor)
            elif spec.write:
                writer.add(path, tensor, shape=spec.shape, box=spec.box, layout=spec.layout, mesh=spec.mesh,
                           boxes=spec.boxes)
        report = writer.finish()
        if snap.rank_state:  # what only this rank restores: its chunk of the rank-state array
            step_store = self.run.checkpoint_store(snap.step)
            step_store.write(rank_chunk_key(attempt, rank), encode_rank_chunk(attempt, rank, snap.rank_state))
            step_store.flush()
            report.rank_state = True
        return report

    def _finalize(self, snap: Snapshot, attempt: str, gathered: Gathered, lease: Lease) -> None:
        mesh: dict[str, int] = {}
        for spec in snap.specs.values():
            if spec.mesh:
                mesh.update({str(k): int(v) for k, v in spec.mesh.items()})
        check_tally(gathered.arrays, gathered.tally)
        # Metrics live at metadata["metrics"], where ckptd.save, `ckptd inspect` and the catalog's
        # sync look for them; the engine's own bookkeeping goes under its key.
        metadata = {"metrics": snap.metrics, ENGINE_KEY: {"tier": self.config.kind}}
        t = gathered.tally
        totals = Totals(arrays=len(gathered.arrays), shards=t.shards, nbytes=t.nbytes,
                        stored_bytes=t.stored_bytes, writers=gathered.writers)
        manifest = publish(self.run.checkpoint_store(snap.step), step=snap.step, attempt=attempt,
                           arrays=gathered.arrays, state=snap.skeleton,
                           world_size=self.coordinator.world_size,
                           mesh=mesh, metadata=metadata, totals=totals,
                           rank_state="array" if gathered.rank_states else False, lease=lease,
                           documented=gathered.arrays.keys())
        lease.release()
        self._metrics[snap.step] = dict(snap.metrics)
        self.apply_retention()
        if self.on_commit is not None:
            self.on_commit(self.name, manifest)

    def _discard(self, step: int, attempt: str) -> None:
        """Best effort: free the space a failed attempt took (a full disk needs it back). Only this
        attempt's directories: another attempt of the step may be a live writer's."""
        try:
            step_store = self.run.checkpoint_store(step)
            step_store.delete_prefix(attempt)
            step_store.delete_prefix(attempt + ".meta")
            if not step_store.list_dir("") and not self.run.is_committed(step):
                self.run.store.delete_prefix(step_dir(step))  # nothing else was there: no empty leftover
        except Exception:  # the original failure is what the user must see
            pass

    # ---------------------------------------------------------------- retention
    def metrics_of(self, step: int) -> dict[str, float]:
        if step not in self._metrics:
            try:
                found = self.run.manifest(step).metadata.get("metrics", {})
                found = found if isinstance(found, dict) else {}
                self._metrics[step] = {k: v for k, v in found.items() if isinstance(v, int | float)}
            except CheckpointError:
                self._metrics[step] = {}
        return self._metrics[step]

    def apply_retention(self) -> list[int]:
        """Delete what the tier's retention lets go (rank 0 only; newest is always kept)."""
        rule = self.config.retention
        if rule.keeps_everything or self.coordinator.rank != 0:
            return []
        steps = self.run.steps()
        metrics = {s: self.metrics_of(s) for s in steps} if rule.keep_best else {}
        doomed = to_delete(steps, rule, metrics)
        for s in doomed:
            self.run.delete(s)
            self._metrics.pop(s, None)
        return doomed

    def discard_after(self, step: int) -> list[int]:
        """Delete the committed checkpoints newer than ``step`` (rank 0): after a rollback they
        belong to an abandoned trajectory, and a later save of the same step must not be mistaken
        for them (``persist`` skips steps that are already committed)."""
        if self.coordinator.rank != 0:
            return []
        doomed = [s for s in self.run.steps() if s > step]
        for s in doomed:
            self.run.delete(s)
            self._metrics.pop(s, None)
        self.committed[:] = [s for s in self.committed if s <= step]
        return doomed

    # ---------------------------------------------------------------- restore
    def steps(self) -> list[int]:
        return self.run.steps()

    def rank_state(self, manifest: Manifest, rank: int) -> dict[str, Any] | None:
        """This rank's own saved state (RNG): its object in format v2, the metadata in v1."""
        if manifest.format_version >= 2:
            return self.run.rank_state(manifest.step, rank, manifest)
        meta = manifest.metadata.get(ENGINE_KEY, {})
        ranks = meta.get("rank_state", {}) if isinstance(meta, dict) else {}
        mine = ranks.get(str(rank)) if isinstance(ranks, dict) else None
        return mine if isinstance(mine, dict) else None

    def load(self, step: int, state: Any, specs: Mapping[str, ShardSpec]) -> Manifest:
        """Read checkpoint ``step`` into ``state``: each tensor with a spec reads only its box."""
        reader = self.run.reader(step)
        filled: set[str] = set()

        def read(path: str, dest: torch.Tensor | None) -> torch.Tensor:
            filled.add(path)
            spec = specs.get(path)
            box = spec.box if spec is not None else None
            if box is not None and box == ShardBox.whole(spec.shape if spec else ()):
                box = None
            return reader.read(path, box=box, out=dest)

        restore_tree(state, reader.manifest.state, read)
        # The committed skeleton is the committing rank's view of the state. Another rank (a
        # later pipeline stage, say) may hold tensors that view lacks: fill those from the
        # manifest's arrays too, and refuse a checkpoint that lacks one — never skip silently.
        _, mine = flatten_tree(state)
        for path, tensor in mine.items():
            if path in filled:
                continue
            if path not in reader.manifest.arrays:
                raise LayoutError(
                    f"checkpoint step {step} in {self.name} has no array {path!r}, which this rank's state "
                    "holds: it was written by a different model or state layout"
                )
            read(path, tensor)
        return reader.manifest
