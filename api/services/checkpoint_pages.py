"""Checkpoint lists: filtered, sorted, cursor-paginated pages read without ORM objects.

A page is read in a constant number of statements whatever its size: one for the checkpoints
(joined to their run's name) and one each for their metrics, tags and locations
(``checkpoint_id IN (...)``). An empty page costs one more, to tell "no such run" (404) from
"no matches". Rows are plain tuples: hydrating ORM objects, their identity map and the run's JSON
columns for every row cost more than the queries themselves (W4 profile).

``tests/api/test_query_counts.py`` pins the statement count, so a lazy load that slips back in
fails a test instead of a benchmark.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, select
from sqlalchemy.orm import Session

from ckptd.api.errors import InvalidRequestError
from ckptd.api.models import Checkpoint, CheckpointMetric, CheckpointTag, Location, Run
from ckptd.api.schemas import CheckpointPage, CheckpointPublic, LayoutSummary, LocationPublic
from ckptd.api.services.pagination import after, check_limit, decode_cursor, encode_cursor
from ckptd.api.services.runs import get_run
from ckptd.format.names import check_segment

SORT_KEYS = ("step", "created_at", "nbytes", "id")
_COLUMNS = (
    Checkpoint.id,
    Run.name,
    Checkpoint.step,
    Checkpoint.state,
    Checkpoint.parent_id,
    Checkpoint.nbytes,
    Checkpoint.layout,
    Checkpoint.error,
    Checkpoint.created_at,
    Checkpoint.committed_at,
    Checkpoint.updated_at,
)


def layout_summary(layout: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mesh, array count and dtype histogram of a registered layout document."""
    if layout is None:
        return None
    arrays = layout.get("arrays", {})
    dtypes: dict[str, int] = {}
    for a in arrays.values():
        dtype = a.get("dtype", "?")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    return {"mesh": layout.get("mesh", {}), "arrays": len(arrays), "dtypes": dtypes}


def _summary(layout: dict[str, Any] | None) -> LayoutSummary | None:
    summary = layout_summary(layout)
    return None if summary is None else LayoutSummary.model_construct(**summary)


def _sort_key(sort: str) -> tuple[str, bool, Any, type]:
    """(key name, descending, column, cursor key type) of a ``[-]key`` or ``[-]metric:<name>`` sort."""
    descending = sort.startswith("-")
    key_name = sort.lstrip("-")
    if key_name.startswith("metric:"):
        return key_name, descending, CheckpointMetric.value, float
    if key_name in SORT_KEYS:
        return (
            key_name,
            descending,
            getattr(Checkpoint, key_name),
            datetime if key_name == "created_at" else int,
        )
    raise InvalidRequestError(f"cannot sort by {sort!r}")


def list_checkpoints(
    session: Session,
    *,
    run: str | None = None,
    state: str | None = None,
    tag: str | None = None,
    tier: str | None = None,
    min_step: int | None = None,
    max_step: int | None = None,
    sort: str = "-step",
    limit: int = 50,
    cursor: str | None = None,
) -> CheckpointPage:
    """Filtered, sorted, cursor-paginated checkpoints. ``sort`` is ``[-]step|created_at|nbytes|id`` or
    ``[-]metric:<name>`` (only checkpoints that have the metric)."""
    check_limit(limit)
    key_name, descending, key_col, key_type = _sort_key(sort)
    query = _sorted_query(key_name, key_col)
    query = _filtered(query, run=run, state=state, tag=tag, tier=tier, min_step=min_step, max_step=max_step)
    if cursor is not None:
        try:
            key, row_id = decode_cursor(cursor, key_type)
        except InvalidRequestError:
            if run is not None:
                get_run(session, name=run)  # a missing run is a 404 before a bad cursor is a 422
            raise
        query = query.where(after(key_col, Checkpoint.id, key, row_id, descending=descending))
    order: list[ColumnElement[Any]] = (
        [key_col.desc(), Checkpoint.id.desc()] if descending else [key_col.asc(), Checkpoint.id.asc()]
    )
    rows = session.execute(query.order_by(*order).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    if not rows and run is not None:
        get_run(session, name=run)  # 404 for a run that does not exist, an empty page otherwise
    next_cursor = None
    if more and rows:
        last = rows[-1]
        value = last.sort_key.isoformat() if key_name == "created_at" else last.sort_key
        next_cursor = encode_cursor(value, last.id)
    items = _public(session, rows)
    return CheckpointPage.model_construct(items=items, next_cursor=next_cursor)


def _sorted_query(key_name: str, key_col: Any) -> Select[Any]:
    """The page's columns plus its sort key; a metric sort keeps only checkpoints with that metric."""
    query: Select[Any] = select(*_COLUMNS, key_col.label("sort_key")).join(Run, Run.id == Checkpoint.run_id)
    if key_name.startswith("metric:"):
        return query.join(
            CheckpointMetric,
            (CheckpointMetric.checkpoint_id == Checkpoint.id)
            & (CheckpointMetric.name == key_name[len("metric:") :]),
        )
    if key_name == "nbytes":
        return query.where(Checkpoint.nbytes.is_not(None))
    return query


def _filtered(
    query: Select[Any],
    *,
    run: str | None,
    state: str | None,
    tag: str | None,
    tier: str | None,
    min_step: int | None,
    max_step: int | None,
) -> Select[Any]:
    """The query restricted by each filter given (None: not filtered)."""
    if run is not None:
        query = query.where(Run.name == check_segment(run))
    if state is not None:
        query = query.where(Checkpoint.state == state)
    if tag is not None:
        query = query.where(
            select(CheckpointTag.tag)
            .where(CheckpointTag.checkpoint_id == Checkpoint.id, CheckpointTag.tag == tag)
            .exists()
        )
    if tier is not None:
        query = query.where(
            select(Location.tier)
            .where(Location.checkpoint_id == Checkpoint.id, Location.tier == tier)
            .exists()
        )
    if min_step is not None:
        query = query.where(Checkpoint.step >= min_step)
    if max_step is not None:
        query = query.where(Checkpoint.step <= max_step)
    return query


def _public(session: Session, rows: Sequence[Row[Any]]) -> list[CheckpointPublic]:
    """The rows as the API shows them, with their metrics, tags and locations in three statements."""
    ids = [r.id for r in rows]
    metrics: dict[int, dict[str, float]] = defaultdict(dict)
    tags: dict[int, list[str]] = defaultdict(list)
    locations: dict[int, list[LocationPublic]] = defaultdict(list)
    if ids:
        for cid, name, value in session.execute(
            select(CheckpointMetric.checkpoint_id, CheckpointMetric.name, CheckpointMetric.value)
            .where(CheckpointMetric.checkpoint_id.in_(ids))
            .order_by(CheckpointMetric.name)
        ):
            metrics[cid][name] = value
        for cid, t in session.execute(
            select(CheckpointTag.checkpoint_id, CheckpointTag.tag)
            .where(CheckpointTag.checkpoint_id.in_(ids))
            .order_by(CheckpointTag.tag)
        ):
            tags[cid].append(t)
        for cid, tier, uri, created_at in session.execute(
            select(Location.checkpoint_id, Location.tier, Location.uri, Location.created_at)
            .where(Location.checkpoint_id.in_(ids))
            .order_by(Location.tier)
        ):
            locations[cid].append(LocationPublic.model_construct(tier=tier, uri=uri, created_at=created_at))
    # Built without validation: every value was validated on its way in, and the checks of the input
    # types (URIs, names, JSON sizes) cost more than the rest of the request (W4 profile).
    # CheckpointPublic's fields are filled with the same types validation would produce (a test
    # compares each page item with the validated single-checkpoint endpoint).
    return [
        CheckpointPublic.model_construct(
            id=r.id,
            run=r.name,
            step=r.step,
            state=r.state,
            parent_id=r.parent_id,
            nbytes=r.nbytes,
            metrics=metrics.get(r.id, {}),
            tags=tags.get(r.id, []),
            locations=locations.get(r.id, []),
            layout_summary=_summary(r.layout),
            error=r.error,
            created_at=r.created_at,
            committed_at=r.committed_at,
            updated_at=r.updated_at,
        )
        for r in rows
    ]
