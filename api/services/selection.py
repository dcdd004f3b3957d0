"""Choosing a checkpoint: selectors, aliases and a run's rollback pointer.

Selectors follow the one grammar of :mod:`ckptd.wire.selector` (also what
``Checkpointer.restore(select=...)`` sends):

* ``latest`` — the committed checkpoint with the highest step;
* ``best:<metric>`` / ``best:<metric>:min`` / ``best:<metric>:max`` — the committed checkpoint with the
  lowest (default) or highest value of the metric, newest step on ties;
* ``step:<n>`` — the committed checkpoint at step n;
* anything else — a user-defined alias of the run.

Only committed checkpoints are ever selected: a rollback to a pending, failed or deleted one
could not be restored.
"""

from __future__ import annotations

import contextlib

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ckptd.api.errors import ConflictError, InvalidRequestError, NotFoundError
from ckptd.api.models import Alias, Checkpoint, CheckpointMetric, Rollback, Run, utcnow
from ckptd.api.schemas import RollbackRequest
from ckptd.api.services.checkpoints import get_checkpoint
from ckptd.api.services.runs import get_run
from ckptd.wire.selector import Alias as AliasSelector
from ckptd.wire.selector import Best, Latest, SelectorError, parse_selector


def resolve(session: Session, *, run_name: str, selector: str) -> Checkpoint:
    """The committed checkpoint ``selector`` names (grammar: :mod:`ckptd.wire.selector`)."""
    run = get_run(session, name=run_name)
    try:
        parsed = parse_selector(selector)
    except SelectorError as e:
        raise InvalidRequestError(str(e)) from None
    query = select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.state == "committed")
    if isinstance(parsed, AliasSelector):
        return _aliased(session, run, parsed.name)
    if isinstance(parsed, Latest):
        ckpt = session.scalar(query.order_by(Checkpoint.step.desc()).limit(1))
    elif isinstance(parsed, Best):
        value = CheckpointMetric.value.desc() if parsed.maximize else CheckpointMetric.value.asc()
        ckpt = session.scalar(
            query.join(CheckpointMetric, CheckpointMetric.checkpoint_id == Checkpoint.id)
            .where(CheckpointMetric.name == parsed.metric)
            .order_by(value, Checkpoint.step.desc())
            .limit(1)
        )
    else:
        ckpt = session.scalar(query.where(Checkpoint.step == parsed.step))
    if ckpt is None:
        raise NotFoundError("committed checkpoint", f"{run.name}/{selector}")
    return ckpt


def _aliased(session: Session, run: Run, name: str) -> Checkpoint:
    alias = session.get(Alias, (run.id, name))
    if alias is None:
        raise NotFoundError("alias", f"{run.name}/{name}")
    if alias.checkpoint.state != "committed":
        raise ConflictError(f"alias {name!r} points at a {alias.checkpoint.state} checkpoint")
    return alias.checkpoint


def set_alias(session: Session, *, run_name: str, name: str, checkpoint_id: int) -> Alias:
    run = get_run(session, name=run_name)
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id)
    if ckpt.run_id != run.id:
        raise InvalidRequestError(
            f"checkpoint {checkpoint_id} belongs to run {ckpt.run.name!r}, not {run.name!r}"
        )
    if ckpt.state != "committed":
        raise ConflictError(f"checkpoint {checkpoint_id} is {ckpt.state}; only committed ones can be aliased")
    alias = session.get(Alias, (run.id, name))
    if alias is None:
        alias = Alias(run_id=run.id, name=name, checkpoint=ckpt)
        session.add(alias)
    else:
        alias.checkpoint = ckpt
    session.flush()
    return alias


def delete_alias(session: Session, *, run_name: str, name: str) -> None:
    run = get_run(session, name=run_name)
    if session.execute(delete(Alias).where(Alias.run_id == run.id, Alias.name == name)).rowcount == 0:  # type: ignore[attr-defined]
        raise NotFoundError("alias", f"{run.name}/{name}")


def list_aliases(session: Session, *, run_name: str) -> list[tuple[str, bool, Checkpoint]]:
    """(name, computed, checkpoint): ``latest`` when the run has a committed checkpoint, then user aliases."""
    run = get_run(session, name=run_name)
    out: list[tuple[str, bool, Checkpoint]] = []
    with contextlib.suppress(NotFoundError):
        out.append(("latest", True, resolve(session, run_name=run.name, selector="latest")))
    for alias in session.scalars(select(Alias).where(Alias.run_id == run.id).order_by(Alias.name)):
        out.append((alias.name, False, alias.checkpoint))
    return out


def request_rollback(session: Session, *, run_name: str, data: RollbackRequest) -> Rollback:
    """Point the run at the checkpoint it must resume from (replacing an earlier request)."""
    if (data.checkpoint_id is None) == (data.select is None):
        raise InvalidRequestError("give exactly one of checkpoint_id or select")
    run = get_run(session, name=run_name)
    if data.checkpoint_id is not None:
        ckpt = get_checkpoint(session, checkpoint_id=data.checkpoint_id)
        if ckpt.run_id != run.id:
            raise InvalidRequestError(
                f"checkpoint {ckpt.id} belongs to run {ckpt.run.name!r}, not {run.name!r}"
            )
        if ckpt.state != "committed":
            raise ConflictError(
                f"checkpoint {ckpt.id} is {ckpt.state}; a run can only roll back to a committed one"
            )
    else:
        assert data.select is not None
        ckpt = resolve(session, run_name=run.name, selector=data.select)
    rollback = session.get(Rollback, run.id)
    if rollback is None:
        rollback = Rollback(run_id=run.id, checkpoint=ckpt, reason=data.reason)
        session.add(rollback)
    else:
        rollback.checkpoint, rollback.reason, rollback.requested_at = ckpt, data.reason, utcnow()
    session.flush()
    return rollback


def get_rollback(session: Session, *, run_name: str) -> Rollback | None:
    run = get_run(session, name=run_name)
    return session.get(Rollback, run.id)


def clear_rollback(session: Session, *, run_name: str, checkpoint_id: int | None = None) -> None:
    """The engine acknowledges a rollback it has performed (only that one, given its checkpoint)."""
    run = get_run(session, name=run_name)
    stmt = delete(Rollback).where(Rollback.run_id == run.id)
    if checkpoint_id is not None:
        stmt = stmt.where(Rollback.checkpoint_id == checkpoint_id)
    session.execute(stmt)


def protected_ids(session: Session, *, run: Run) -> dict[int, str]:
    """Checkpoint ids GC must keep whatever the policy says, and why."""
    out: dict[int, str] = {}
    for cid, name in session.execute(select(Alias.checkpoint_id, Alias.name).where(Alias.run_id == run.id)):
        out[cid] = f"alias {name}"
    rb = session.get(Rollback, run.id)
    if rb is not None:
        out[rb.checkpoint_id] = "rollback target"
    return out
