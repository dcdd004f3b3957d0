"""``/api/v1/runs``: runs, their checkpoint registration, aliases, rollback, retention and sync."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status

from ckptd.api.deps import Authorized, DeleterDep, SessionDep, SettingsDep, read
from ckptd.api.errors import InvalidRequestError
from ckptd.api.models import Rollback
from ckptd.api.roots import require_allowed_root
from ckptd.api.routes.params import AliasPathName, Cursor, Limit, RunName
from ckptd.api.schemas import (
    AliasPublic,
    AliasSet,
    CheckpointCreate,
    CheckpointPublic,
    DiscardRequest,
    DiscardResult,
    GCPlan,
    GCResult,
    RollbackPublic,
    RollbackRequest,
    RunCreate,
    RunPage,
    RunPublic,
    RunStatus,
    RunUpdate,
    Selector,
    SyncReport,
    SyncRequest,
    check_alias_name,
    check_selector,
)
from ckptd.api.services import checkpoints, retention, runs, selection, sync
from ckptd.wire.selector import is_reserved

router = APIRouter(prefix="/runs", tags=["runs"])


@router.get("", response_model=RunPage)
async def list_runs(
    request: Request,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    name_prefix: Annotated[str | None, Query(max_length=200)] = None,
    sort: Literal["created_at", "-created_at", "name", "-name"] = "-created_at",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> RunPage:
    items, next_cursor = await read(
        request,
        partial(
            runs.list_runs, status=status_, name_prefix=name_prefix, sort=sort, limit=limit, cursor=cursor
        ),
    )
    return RunPage.model_construct(items=items, next_cursor=next_cursor)


@router.post(
    "",
    response_model=RunPublic,
    status_code=201,
    dependencies=[Authorized],
    responses={200: {"description": "the run already existed", "model": RunPublic}},
)
def create_run(session: SessionDep, settings: SettingsDep, data: RunCreate, response: Response) -> RunPublic:
    run, created = runs.create_run(session, data=data, allow_roots=settings.allow_roots)
    if not created:
        response.status_code = status.HTTP_200_OK
    session.flush()
    return runs.run_public(run, runs.run_stats(session, run_ids=[run.id]).get(run.id))


@router.get("/{run}", response_model=RunPublic)
def get_run(session: SessionDep, run: RunName) -> RunPublic:
    r = runs.get_run(session, name=run)
    return runs.run_public(r, runs.run_stats(session, run_ids=[r.id]).get(r.id))


@router.patch("/{run}", response_model=RunPublic, dependencies=[Authorized])
def update_run(session: SessionDep, settings: SettingsDep, run: RunName, data: RunUpdate) -> RunPublic:
    """Status, config, retention; roots only while the run has no checkpoint (or for a new tier)."""
    r = runs.update_run(session, name=run, data=data, allow_roots=settings.allow_roots)
    return runs.run_public(r, runs.run_stats(session, run_ids=[r.id]).get(r.id))


@router.post(
    "/{run}/checkpoints",
    response_model=CheckpointPublic,
    status_code=201,
    dependencies=[Authorized],
    responses={200: {"description": "already registered (a retry)", "model": CheckpointPublic}},
)
def register_checkpoint(
    session: SessionDep, run: RunName, data: CheckpointCreate, response: Response
) -> CheckpointPublic:
    ckpt, created = checkpoints.register_checkpoint(session, run_name=run, data=data)
    if not created:
        response.status_code = status.HTTP_200_OK
    return checkpoints.checkpoint_public(ckpt)


# --- aliases ---------------------------------------------------------------------------------------


@router.get("/{run}/aliases", response_model=list[AliasPublic])
def list_aliases(session: SessionDep, run: RunName) -> list[AliasPublic]:
    return [
        AliasPublic(run=run, name=name, computed=computed, checkpoint=checkpoints.checkpoint_public(c))
        for name, computed, c in selection.list_aliases(session, run_name=run)
    ]


@router.get("/{run}/resolve", response_model=AliasPublic)
def resolve(session: SessionDep, run: RunName, select: Annotated[Selector, Query()]) -> AliasPublic:
    """Resolve a selector: ``latest``, ``best:<metric>[:min|:max]``, ``step:<n>`` or a user alias
    (a query parameter, because metric names may contain ``/``)."""
    return _resolved(session, run, select)


@router.get("/{run}/aliases/{name}", response_model=AliasPublic)
def resolve_alias(session: SessionDep, run: RunName, name: AliasPathName) -> AliasPublic:
    """Resolve an alias or a selector without ``/`` (``latest``, ``best:loss``, ``step:100``)."""
    try:
        selector = check_selector(name)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e
    return _resolved(session, run, selector)


def _resolved(session: SessionDep, run: str, selector: str) -> AliasPublic:
    ckpt = selection.resolve(session, run_name=run, selector=selector)
    computed = is_reserved(selector)  # resolve() parsed it: reserved syntax is a computed selector
    return AliasPublic(
        run=ckpt.run.name, name=selector, computed=computed, checkpoint=checkpoints.checkpoint_public(ckpt)
    )


@router.put("/{run}/aliases/{name}", response_model=AliasPublic, dependencies=[Authorized])
def set_alias(session: SessionDep, run: RunName, name: AliasPathName, data: AliasSet) -> AliasPublic:
    try:
        name = check_alias_name(name)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e
    alias = selection.set_alias(session, run_name=run, name=name, checkpoint_id=data.checkpoint_id)
    return AliasPublic(
        run=run, name=alias.name, computed=False, checkpoint=checkpoints.checkpoint_public(alias.checkpoint)
    )


@router.delete("/{run}/aliases/{name}", status_code=204, dependencies=[Authorized])
def delete_alias(session: SessionDep, run: RunName, name: AliasPathName) -> None:
    selection.delete_alias(session, run_name=run, name=name)


# --- rollback --------------------------------------------------------------------------------------


def _rollback_public(rb: Rollback) -> RollbackPublic:
    return RollbackPublic(
        run=rb.checkpoint.run.name,
        checkpoint=checkpoints.checkpoint_public(rb.checkpoint),
        reason=rb.reason,
        requested_at=rb.requested_at,
    )


@router.get("/{run}/rollback", response_model=RollbackPublic | None)
def get_rollback(session: SessionDep, run: RunName) -> RollbackPublic | None:
    """The checkpoint the run must resume from, or ``null``; a running Checkpointer polls this."""
    rb = selection.get_rollback(session, run_name=run)
    return None if rb is None else _rollback_public(rb)


@router.post("/{run}/rollback", response_model=RollbackPublic, dependencies=[Authorized])
def request_rollback(session: SessionDep, run: RunName, data: RollbackRequest) -> RollbackPublic:
    return _rollback_public(selection.request_rollback(session, run_name=run, data=data))


@router.delete("/{run}/rollback", status_code=204, dependencies=[Authorized])
def clear_rollback(
    session: SessionDep,
    run: RunName,
    checkpoint_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> None:
    """The engine acknowledges that it restored the rollback target.

    With ``checkpoint_id`` only a pointer to that checkpoint is cleared: a newer request set
    between the engine's poll and its acknowledgement survives.
    """
    selection.clear_rollback(session, run_name=run, checkpoint_id=checkpoint_id)


# --- retention, sync -------------------------------------------------------------------------------


@router.get("/{run}/gc", response_model=GCPlan)
def preview_gc(session: SessionDep, run: RunName) -> GCPlan:
    plan, _ = retention.plan_gc(session, run_name=run)
    return plan


@router.post("/{run}/gc", response_model=GCResult, dependencies=[Authorized])
def execute_gc(session: SessionDep, settings: SettingsDep, deleter: DeleterDep, run: RunName) -> GCResult:
    """Delete what the retention plan does not keep; checkpoints whose data storage would not give
    up are listed under ``failed`` (and are ``failed``, retried by the next GC)."""
    return retention.execute_gc(session, run_name=run, delete=deleter, allow_roots=settings.allow_roots)


@router.post("/{run}/sync", response_model=SyncReport, dependencies=[Authorized])
def sync_run(session: SessionDep, settings: SettingsDep, run: RunName, data: SyncRequest) -> SyncReport:
    """Reconcile the run from the manifests under its registered root for ``tier`` (never a URI
    from the request): checkpoints found are added or committed, committed ones gone from storage
    are marked deleted (when the root itself is there)."""
    r = runs.get_run(session, name=run)
    root = r.roots.get(data.tier)
    if root is None:
        raise InvalidRequestError(f"run {r.name!r} has no {data.tier} root to sync from")
    require_allowed_root(root, settings.allow_roots)
    return sync.sync_from_storage(session, run_name=r.name, tier=data.tier, root=root)


@router.post("/{run}/discard", response_model=DiscardResult, dependencies=[Authorized])
def discard(session: SessionDep, run: RunName, data: DiscardRequest) -> DiscardResult:
    """The engine rolled back to ``after_step`` and deleted the newer checkpoints from storage: mark
    them deleted (an abandoned trajectory is never ``latest``). Retrying is harmless."""
    steps = checkpoints.discard_after(session, run_name=run, step=data.after_step)
    return DiscardResult(run=run, deleted=steps)
