"""Checkpoints: registration by the engine, the state machine, queries.

State machine (``deleting`` is reached only through retention GC; ``deleted`` also when the engine
discards the checkpoints after a rollback target, or sync finds a checkpoint gone from storage)::

    pending ──> committed ──> deleting ──> deleted
       │                         │
       └──────> failed <─────────┘      failed ──> deleting (GC collects partial data)

Setting the state a checkpoint already has is a no-op, so the engine may retry freely.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ckptd.api.errors import ConflictError, InvalidTransitionError, NotFoundError
from ckptd.api.models import Checkpoint, CheckpointMetric, CheckpointTag, Location, Run, utcnow
from ckptd.api.roots import require_checkpoint_location
from ckptd.api.schemas import (
    CheckpointCreate,
    CheckpointPublic,
    CheckpointUpdate,
    LayoutDoc,
    LocationIn,
)
from ckptd.api.services.checkpoint_pages import layout_summary
from ckptd.api.services.runs import get_run

TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"committed", "failed"}),
    "committed": frozenset({"deleting"}),
    "deleting": frozenset({"deleted", "failed"}),
    "failed": frozenset({"deleting"}),
    "deleted": frozenset(),
}


def transition(ckpt: Checkpoint, new_state: str, *, error: str | None = None) -> None:
    if new_state == ckpt.state:
        return
    if new_state not in TRANSITIONS[ckpt.state]:
        raise InvalidTransitionError(
            f"checkpoint {ckpt.id} (step {ckpt.step}) cannot go {ckpt.state} -> {new_state}"
        )
    ckpt.state = new_state
    if new_state == "committed":
        ckpt.committed_at = utcnow()
        ckpt.error = None
    if error is not None:
        ckpt.error = error


def get_checkpoint(session: Session, *, checkpoint_id: int) -> Checkpoint:
    ckpt = session.get(Checkpoint, checkpoint_id)
    if ckpt is None:
        raise NotFoundError("checkpoint", checkpoint_id)
    return ckpt


def set_locations(ckpt: Checkpoint, run: Run, locations: list[LocationIn]) -> None:
    """Add or replace (per tier) where the checkpoint lives: exactly its step's directory under the
    run's root for that tier (``<root>/step_<10 digits>``)."""
    by_tier = {loc.tier: loc for loc in ckpt.locations}
    for loc in locations:
        uri = require_checkpoint_location(loc.uri, run.roots.get(loc.tier), tier=loc.tier, step=ckpt.step)
        if loc.tier in by_tier:
            by_tier[loc.tier].uri = uri
        else:
            new = Location(tier=loc.tier, uri=uri)
            ckpt.locations.append(new)
            by_tier[loc.tier] = new


def set_metrics(ckpt: Checkpoint, metrics: dict[str, float]) -> None:
    current = {m.name: m for m in ckpt.metrics}
    for name, value in metrics.items():
        if name in current:
            current[name].value = value
        else:
            ckpt.metrics.append(CheckpointMetric(name=name, value=value))


def set_tags(ckpt: Checkpoint, tags: list[str]) -> None:
    wanted = set(tags)
    ckpt.tags[:] = [t for t in ckpt.tags if t.tag in wanted]
    have = {t.tag for t in ckpt.tags}
    ckpt.tags.extend(CheckpointTag(tag=t) for t in sorted(wanted - have))


def _layout_doc(layout: LayoutDoc) -> dict[str, Any]:
    return layout.model_dump(mode="json")


def register_checkpoint(
    session: Session, *, run_name: str, data: CheckpointCreate
) -> tuple[Checkpoint, bool]:
    """Register a pending checkpoint. Retrying a registration returns the existing row unchanged;
    a step whose earlier attempt failed or was deleted (a run that rolled back) starts afresh."""
    run = get_run(session, name=run_name)
    ckpt = session.scalar(select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.step == data.step))
    if ckpt is not None and ckpt.state in ("pending", "committed"):
        return ckpt, False
    if ckpt is not None and ckpt.state == "deleting":
        raise ConflictError(f"step {data.step} of run {run.name!r} is being deleted; retry when it is gone")
    parent_id = None
    if data.parent_step is not None:
        parent_id = session.scalar(
            select(Checkpoint.id).where(Checkpoint.run_id == run.id, Checkpoint.step == data.parent_step)
        )
    created = ckpt is None
    if ckpt is None:
        ckpt = Checkpoint(run=run, step=data.step, metrics=[], tags=[], locations=[])
        session.add(ckpt)
    else:  # failed or deleted: a new attempt at the same step
        ckpt.state, ckpt.error, ckpt.committed_at = "pending", None, None
        ckpt.metrics.clear()
        ckpt.tags.clear()
        ckpt.locations.clear()
        session.flush()
    ckpt.parent_id = parent_id
    ckpt.nbytes = data.nbytes
    ckpt.layout = None if data.layout is None else _layout_doc(data.layout)
    set_locations(ckpt, run, data.locations)
    set_metrics(ckpt, data.metrics)
    set_tags(ckpt, data.tags)
    session.flush()
    return ckpt, created


def update_checkpoint(session: Session, *, checkpoint_id: int, data: CheckpointUpdate) -> Checkpoint:
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id)
    if ckpt.state in ("deleting", "deleted") and data.state != ckpt.state:
        raise InvalidTransitionError(f"checkpoint {ckpt.id} is {ckpt.state}; it cannot be changed")
    if data.nbytes is not None:
        ckpt.nbytes = data.nbytes
    if data.layout is not None:
        ckpt.layout = _layout_doc(data.layout)
    if data.metrics is not None:
        set_metrics(ckpt, data.metrics)
    if data.tags is not None:
        set_tags(ckpt, data.tags)
    if data.locations is not None:
        set_locations(ckpt, ckpt.run, data.locations)
    if data.state is not None:
        transition(ckpt, data.state, error=data.error)
    session.flush()
    return ckpt


def mark_deleted(ckpt: Checkpoint, why: str) -> None:
    """Storage no longer holds the checkpoint (a rollback discarded it, sync found it gone): it is
    ``deleted`` whatever it was, except ``deleting``, which GC owns."""
    if ckpt.state in ("deleted", "deleting"):
        return
    ckpt.state, ckpt.error = "deleted", why
    ckpt.locations.clear()


def discard_after(session: Session, *, run_name: str, step: int) -> list[int]:
    """Mark every checkpoint of the run after ``step`` deleted (the engine rolled back to ``step``
    and removed the newer ones from storage); returns the steps that changed."""
    run = get_run(session, name=run_name)
    changed = []
    for ckpt in session.scalars(
        select(Checkpoint)
        .where(
            Checkpoint.run_id == run.id,
            Checkpoint.step > step,
            Checkpoint.state.in_(("pending", "committed", "failed")),
        )
        .order_by(Checkpoint.step)
    ):
        mark_deleted(ckpt, f"discarded by a rollback to step {step}")
        changed.append(ckpt.step)
    session.flush()
    return changed


def checkpoint_public(ckpt: Checkpoint) -> CheckpointPublic:
    """One loaded checkpoint as the API shows it (pages are built by ``checkpoint_pages``, alike)."""
    return CheckpointPublic.model_validate(
        {
            "id": ckpt.id,
            "run": ckpt.run.name,
            "step": ckpt.step,
            "state": ckpt.state,
            "parent_id": ckpt.parent_id,
            "nbytes": ckpt.nbytes,
            "metrics": {m.name: m.value for m in ckpt.metrics},
            "tags": [t.tag for t in ckpt.tags],
            "locations": [
                {"tier": loc.tier, "uri": loc.uri, "created_at": loc.created_at} for loc in ckpt.locations
            ],
            "layout_summary": layout_summary(ckpt.layout),
            "error": ckpt.error,
            "created_at": ckpt.created_at,
            "committed_at": ckpt.committed_at,
            "updated_at": ckpt.updated_at,
        }
    )
