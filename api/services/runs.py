"""Runs: create (idempotent, the engine registers on every start), read, list, update."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from ckptd.api.errors import ConflictError, NotFoundError
from ckptd.api.models import Checkpoint, Run
from ckptd.api.roots import require_allowed_root
from ckptd.api.schemas import RetentionPolicy, RunCreate, RunPublic, RunUpdate
from ckptd.api.services.pagination import after, check_limit, decode_cursor, encode_cursor
from ckptd.format.names import check_segment

RUN_SORTS = ("created_at", "-created_at", "name", "-name")
_RUN_COLUMNS = (
    Run.id,
    Run.name,
    Run.status,
    Run.config,
    Run.roots,
    Run.retention,
    Run.created_at,
    Run.updated_at,
)


def get_run(session: Session, *, name: str) -> Run:
    run = session.scalar(select(Run).where(Run.name == check_segment(name)))
    if run is None:
        raise NotFoundError("run", name)
    return run


def _allowed_roots(roots: Mapping[Any, str], allow: Iterable[str] | None) -> dict[str, str]:
    return {str(tier): require_allowed_root(uri, allow) for tier, uri in roots.items()}


def create_run(
    session: Session, *, data: RunCreate, allow_roots: Iterable[str] | None = None
) -> tuple[Run, bool]:
    """Create the run, or return the existing one when the request agrees with it.

    Every root must lie under ``allow_roots`` (the server's allowed prefixes; ``None`` for the
    operator's own command line). Roots a re-registration names for tiers the run has no root for
    yet are added; a different root for a tier that has one is a conflict (roots bound what GC may
    delete).
    """
    roots = _allowed_roots(data.roots, allow_roots)
    existing = session.scalar(select(Run).where(Run.name == data.name))
    if existing is None:
        run = Run(
            name=data.name,
            config=data.config,
            roots=roots,
            retention=data.retention.model_dump(exclude_none=True),
        )
        try:
            with session.begin_nested():
                session.add(run)
            return run, True
        except IntegrityError:  # a concurrent request created it first
            existing = session.scalar(select(Run).where(Run.name == data.name))
            if existing is None:
                raise
    for tier, uri in roots.items():
        if existing.roots.get(tier, uri) != uri:
            raise ConflictError(
                f"run {data.name!r} already has {tier} root {existing.roots[tier]!r}, not {uri!r}"
            )
    if not roots.keys() <= existing.roots.keys():
        existing.roots = {**existing.roots, **roots}
    return existing, False


def update_run(
    session: Session, *, name: str, data: RunUpdate, allow_roots: Iterable[str] | None = None
) -> Run:
    """Change a run. Once it has a checkpoint its roots are fixed: a root may be added for a tier
    without one, but none may move or go (the checkpoints' locations, and what GC deletes, hang
    off them)."""
    run = get_run(session, name=name)
    roots = None if data.roots is None else _allowed_roots(data.roots, allow_roots)
    if roots is not None and roots != run.roots:
        changed = sorted(t for t, uri in run.roots.items() if roots.get(t) != uri)
        has_checkpoint = session.scalar(select(Checkpoint.id).where(Checkpoint.run_id == run.id).limit(1))
        if changed and has_checkpoint is not None:
            raise ConflictError(
                f"run {run.name!r} has checkpoints: its {', '.join(changed)} root cannot change any more"
            )
    if data.status is not None:
        run.status = data.status
    if data.config is not None:
        run.config = data.config
    if roots is not None:
        run.roots = roots
    if data.retention is not None:
        run.retention = data.retention.model_dump(exclude_none=True)
    session.flush()
    return run


def list_runs(
    session: Session,
    *,
    status: str | None = None,
    name_prefix: str | None = None,
    sort: str = "-created_at",
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[RunPublic], str | None]:
    check_limit(limit)
    descending = sort.startswith("-")
    key_name = sort.lstrip("-")
    key_col: InstrumentedAttribute[str] | InstrumentedAttribute[datetime] = (
        Run.name if key_name == "name" else Run.created_at
    )
    query = select(*_RUN_COLUMNS)  # rows, not ORM objects: a page of runs is read, never changed
    if status is not None:
        query = query.where(Run.status == status)
    if name_prefix:
        query = query.where(Run.name.startswith(name_prefix, autoescape=True))
    if cursor is not None:
        bound, row_id = decode_cursor(cursor, datetime if key_name == "created_at" else str)
        query = query.where(after(key_col, Run.id, bound, row_id, descending=descending))
    order: list[ColumnElement[Any]] = (
        [key_col.desc(), Run.id.desc()] if descending else [key_col.asc(), Run.id.asc()]
    )
    runs = session.execute(query.order_by(*order).limit(limit + 1)).all()
    more = len(runs) > limit
    runs = runs[:limit]
    stats = run_stats(session, run_ids=[r.id for r in runs])
    items = [_public(r._mapping, stats.get(r.id)) for r in runs]
    next_cursor = None
    if more and runs:
        last = runs[-1]
        next_cursor = encode_cursor(last.name if key_name == "name" else last.created_at.isoformat(), last.id)
    return items, next_cursor


def run_stats(session: Session, *, run_ids: list[int]) -> dict[int, tuple[int, int, int | None]]:
    """run id -> (checkpoints, committed checkpoints, latest committed step)."""
    if not run_ids:
        return {}
    committed = (Checkpoint.state == "committed").cast(Checkpoint.id.type)  # 1/0 on both dialects
    rows = session.execute(
        select(
            Checkpoint.run_id,
            func.count(Checkpoint.id),
            func.coalesce(func.sum(committed), 0),
            func.max(Checkpoint.step).filter(Checkpoint.state == "committed"),
        )
        .where(Checkpoint.run_id.in_(run_ids))
        .group_by(Checkpoint.run_id)
    )
    return {rid: (int(n), int(c), None if latest is None else int(latest)) for rid, n, c, latest in rows}


def run_public(run: Run, stats: tuple[int, int, int | None] | None = None) -> RunPublic:
    return _public({c.key: getattr(run, c.key) for c in _RUN_COLUMNS}, stats)


def _public(run: Mapping[Any, Any], stats: tuple[int, int, int | None] | None) -> RunPublic:
    """Built without re-validating what was validated on its way in (the config's size, the roots'
    URIs): those checks cost more than the rest of a list request. The retention policy is parsed,
    so that it shows every field with its default, as a validated one does."""
    n, committed, latest = stats or (0, 0, None)
    fields = {**run, "retention": RetentionPolicy.model_validate(run["retention"])}
    return RunPublic.model_construct(**fields, checkpoints=n, committed=committed, latest_step=latest)
