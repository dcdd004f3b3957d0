"""Retention: which checkpoints of a run garbage collection deletes, and deleting them.

The plan keeps, of the committed checkpoints, the union of ``keep_last`` newest, ``keep_best``
by a metric and every step divisible by ``keep_every``; the newest committed checkpoint, alias
targets and the rollback target are always kept; pending and deleting ones are never touched.
A run without any keep rule keeps every committed checkpoint. Failed checkpoints are collected
(their partial data removed) unless ``collect_failed`` is false.

Execution is "delete from storage, then mark": ``committed -> deleting`` is committed to the
database first (so a crash leaves a visible ``deleting`` row that the next GC retries), then every
non-memory location is removed from storage — only when it is its step's directory under the run's
root for that tier (see ``ckptd.api.roots``) — and only then does the row become ``deleted``. When
storage refuses, the row becomes ``failed`` (retried by the next GC), never stays ``deleting``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ckptd.api.errors import BackendNotInstalledError, CatalogError, StorageDeleteError
from ckptd.api.models import Checkpoint, Run
from ckptd.api.roots import deletable_local_dir, require_allowed_root, require_checkpoint_location
from ckptd.api.schemas import GCEntry, GCPlan, GCResult, RetentionPolicy
from ckptd.api.services.checkpoints import transition
from ckptd.api.services.runs import get_run
from ckptd.api.services.selection import protected_ids

StorageDeleter = Callable[[str], None]
"""Deletes the tree at a URI (a checkpoint group); missing trees are not an error."""


def open_fs(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``uri``; a backend this server lacks is a 422, not a 500."""
    import fsspec  # imported lazily: only GC and sync touch storage

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:  # gs:// without gcsfs, az:// without adlfs ...
        scheme = uri.split("://", 1)[0]
        raise BackendNotInstalledError(
            f"the storage backend for {scheme}:// is not installed on this catalog server ({e})"
        ) from e
    except (ValueError, OSError) as e:
        raise StorageDeleteError(f"cannot open {uri!r}: {e}") from e
    return fs, path


def fsspec_delete(uri: str) -> None:
    fs, path = open_fs(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # whatever the backend raises (timeouts, auth, ...) is this checkpoint's failure
        raise StorageDeleteError(f"deleting {uri!r} failed: {type(e).__name__}: {e}") from e


def _entry(ckpt: Checkpoint, reason: str) -> GCEntry:
    return GCEntry(checkpoint_id=ckpt.id, step=ckpt.step, state=ckpt.state, reason=reason)  # type: ignore[arg-type]


def plan_gc(session: Session, *, run_name: str) -> tuple[GCPlan, list[Checkpoint]]:
    """The GC plan of a run, and the checkpoints it would delete."""
    run = get_run(session, name=run_name)
    policy = RetentionPolicy.model_validate(run.retention)
    ckpts = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.run_id == run.id, Checkpoint.state.in_(("committed", "failed", "deleting")))
            .order_by(Checkpoint.step.desc())
        )
    )
    committed = [c for c in ckpts if c.state == "committed"]
    keep: dict[int, str] = {cid: why for cid, why in protected_ids(session, run=run).items()}
    if committed:
        keep.setdefault(committed[0].id, "latest")
    has_rules = policy.keep_last is not None or policy.keep_best is not None or policy.keep_every is not None
    if not has_rules:
        for c in committed:
            keep.setdefault(c.id, "no retention rule")
    if policy.keep_last is not None:
        for c in committed[: policy.keep_last]:
            keep.setdefault(c.id, f"keep_last {policy.keep_last}")
    if policy.keep_every is not None:
        for c in committed:
            if c.step % policy.keep_every == 0:
                keep.setdefault(c.id, f"keep_every {policy.keep_every}")
    if policy.keep_best is not None:
        best = policy.keep_best
        scored = [(m.value, c) for c in committed for m in c.metrics if m.name == best.metric]
        scored.sort(key=lambda vc: (vc[0] if best.mode == "min" else -vc[0], -vc[1].step))
        for _, c in scored[: best.n]:
            keep.setdefault(c.id, f"keep_best {best.metric} {best.mode}")
    plan = GCPlan(run=run.name, keep=[], delete=[])
    doomed: list[Checkpoint] = []
    for c in ckpts:
        if c.id in keep:
            plan.keep.append(_entry(c, keep[c.id]))
        elif c.state == "failed" and not policy.collect_failed:
            plan.keep.append(_entry(c, "collect_failed is false"))
        else:
            plan.delete.append(
                _entry(c, {"committed": "retention", "failed": "failed", "deleting": "retry"}[c.state])
            )
            doomed.append(c)
    return plan, doomed


def delete_checkpoint_data(
    ckpt: Checkpoint, run: Run, *, delete: StorageDeleter, allow_roots: Iterable[str] | None = None
) -> None:
    """Remove every non-memory location of ``ckpt`` from storage. Each must still be its step's
    directory under a run root that lies under ``allow_roots``, and a local one a real directory
    (not a symlink) inside it: nothing else is ever deleted, whatever the database says."""
    for loc in list(ckpt.locations):
        if loc.tier == "memory":
            continue  # in-process snapshots belong to the training process; they age out there
        root = run.roots.get(loc.tier)
        if root is not None:
            require_allowed_root(root, allow_roots)
        uri = require_checkpoint_location(loc.uri, root, tier=loc.tier, step=ckpt.step)
        assert root is not None  # require_checkpoint_location refuses a tier without a root
        deletable_local_dir(uri, root)
        delete(uri)


def execute_gc(
    session: Session,
    *,
    run_name: str,
    delete: StorageDeleter = fsspec_delete,
    allow_roots: Iterable[str] | None = None,
) -> GCResult:
    """Apply the plan: mark ``deleting`` (committed first), delete from storage, mark ``deleted``.

    A checkpoint whose data cannot be deleted (a backend this server lacks, unreachable storage, a
    location GC refuses to touch) becomes ``failed`` with the reason: some of its data may be gone,
    the next GC retries it, and its step can be written again; it never stays ``deleting``.
    """
    plan, doomed = plan_gc(session, run_name=run_name)
    run = get_run(session, name=run_name)
    result = GCResult(run=run.name, deleted=[], failed=[])
    for ckpt in doomed:
        transition(ckpt, "deleting")
        session.commit()
        try:
            delete_checkpoint_data(ckpt, run, delete=delete, allow_roots=allow_roots)
        except (CatalogError, OSError) as e:
            transition(ckpt, "failed", error=f"GC could not delete its data: {e}"[:4000])
            session.commit()
            result.failed.append(_entry(ckpt, str(e)))
            continue
        transition(ckpt, "deleted")
        ckpt.locations.clear()
        session.commit()
        result.deleted.append(_entry(ckpt, next(e.reason for e in plan.delete if e.checkpoint_id == ckpt.id)))
    return result
