"""Retention: which checkpoints of a run garbage collection deletes, and deleting them.

The plan keeps, of the committed checkpoints, the union of ``keep_last`` newest, ``keep_best``
by a metric and every step divisible by ``keep_every``; the newest committed checkpoint, alias
targets and the rollback target are always kept; pending and deleting ones are never touched.
A run without any keep rule keeps every committed checkpoint. Failed checkpoints are collected
(their partial data removed) unless ``collect_failed`` is false.

Execution is "delete from storage, then mark": ``committed -> deleting`` is committed to the
database first (so a crash leaves a visible ``deleting`` row that the next GC retries), then every
non-memory location is removed from storage — only when it lies strictly inside the run's root
for that tier — and only then does the row become ``deleted``.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptd.api.errors import OutsideRunRootError, StorageDeleteError
from ckptd.api.models import Checkpoint, Run
from ckptd.api.schemas import GCEntry, GCPlan, GCResult, RetentionPolicy
from ckptd.api.services.checkpoints import transition
from ckptd.api.services.runs import get_run
from ckptd.api.services.selection import protected_ids
from ckptd.api.uris import require_within
from sqlalchemy import select
from sqlalchemy.orm import Session

StorageDeleter = Callable[[str], None]
"""Deletes the tree at a URI (a checkpoint group); missing trees are not an error."""


def fsspec_delete(uri: str) -> None:
    import fsspec  # imported lazily: only GC execution touches storage

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as e:
        raise StorageDeleteError(f"deleting {uri!r} failed: {e}") from e


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


def delete_checkpoint_data(ckpt: Checkpoint, run: Run, *, delete: StorageDeleter) -> None:
    """Remove every non-memory location of ``ckpt`` from storage, refusing anything outside the run root."""
    for loc in list(ckpt.locations):
        if loc.tier == "memory":
            continue  # in-process snapshots belong to the training process; they age out there
        uri = require_within(loc.uri, run.roots.get(loc.tier), tier=loc.tier)
        delete(uri)


def execute_gc(session: Session, *, run_name: str, delete: StorageDeleter = fsspec_delete) -> GCResult:
    """Apply the plan: mark ``deleting`` (committed first), delete from storage, mark ``deleted``."""
    plan, doomed = plan_gc(session, run_name=run_name)
    run = get_run(session, name=run_name)
    result = GCResult(run=run.name, deleted=[], failed=[])
    for ckpt in doomed:
        transition(ckpt, "deleting")
        session.commit()
        try:
            delete_checkpoint_data(ckpt, run, delete=delete)
        except (StorageDeleteError, OutsideRunRootError, OSError) as e:
            ckpt.error = f"GC could not delete its data: {e}"[:4000]
            session.commit()
            result.failed.append(_entry(ckpt, str(e)))
            continue
        transition(ckpt, "deleted")
        ckpt.locations.clear()
        session.commit()
        result.deleted.append(_entry(ckpt, next(e.reason for e in plan.delete if e.checkpoint_id == ckpt.id)))
    return result
