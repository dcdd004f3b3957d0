"""``/api/v1/checkpoints`` and ``/api/v1/jobs``: queries, engine updates, lineage, restore plans, jobs."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request

from ckptd.api.deps import Authorized, JobsDep, SessionDep, read
from ckptd.api.errors import NotFoundError
from ckptd.api.models import ConversionJob
from ckptd.api.routes.params import CheckpointId, CheckpointSort, Cursor, JobId, Limit, MeshSize, StepBound
from ckptd.api.schemas import (
    CheckpointPage,
    CheckpointPublic,
    CheckpointState,
    CheckpointUpdate,
    ConvertRequest,
    JobPublic,
    RestorePlan,
    Tag,
    Tier,
)
from ckptd.api.services import checkpoint_pages, checkpoints, jobs, restore

router = APIRouter(tags=["checkpoints"])
MAX_LINEAGE = 1000


@router.get("/checkpoints", response_model=CheckpointPage)
async def list_checkpoints(
    request: Request,
    run: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    state: CheckpointState | None = None,
    tag: Annotated[Tag | None, Query()] = None,
    tier: Tier | None = None,
    min_step: StepBound = None,
    max_step: StepBound = None,
    sort: CheckpointSort = "-step",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> CheckpointPage:
    return await read(
        request,
        partial(
            checkpoint_pages.list_checkpoints,
            run=run,
            state=state,
            tag=tag,
            tier=tier,
            min_step=min_step,
            max_step=max_step,
            sort=sort,
            limit=limit,
            cursor=cursor,
        ),
    )


@router.get("/checkpoints/{checkpoint_id}", response_model=CheckpointPublic)
def get_checkpoint(session: SessionDep, checkpoint_id: CheckpointId) -> CheckpointPublic:
    return checkpoints.checkpoint_public(checkpoints.get_checkpoint(session, checkpoint_id=checkpoint_id))


@router.patch("/checkpoints/{checkpoint_id}", response_model=CheckpointPublic, dependencies=[Authorized])
def update_checkpoint(
    session: SessionDep, checkpoint_id: CheckpointId, data: CheckpointUpdate
) -> CheckpointPublic:
    """Engine updates: ``state`` committed or failed, bytes, layout, metrics, tags, more tiers."""
    return checkpoints.checkpoint_public(
        checkpoints.update_checkpoint(session, checkpoint_id=checkpoint_id, data=data)
    )


@router.get("/checkpoints/{checkpoint_id}/lineage", response_model=list[CheckpointPublic])
def lineage(session: SessionDep, checkpoint_id: CheckpointId) -> list[CheckpointPublic]:
    """The checkpoint and its ancestors through ``parent_id``, newest first."""
    out: list[CheckpointPublic] = []
    current: int | None = checkpoint_id
    seen: set[int] = set()
    while current is not None and current not in seen and len(out) < MAX_LINEAGE:
        seen.add(current)
        ckpt = checkpoints.get_checkpoint(session, checkpoint_id=current)
        out.append(checkpoints.checkpoint_public(ckpt))
        current = ckpt.parent_id
    return out


@router.get("/checkpoints/{checkpoint_id}/restore-plan", response_model=RestorePlan)
def restore_plan(
    session: SessionDep,
    checkpoint_id: CheckpointId,
    tp: MeshSize = 1,
    pp: MeshSize = 1,
    dp: MeshSize = 1,
    rank: Annotated[int | None, Query(ge=0, le=2**20)] = None,
) -> RestorePlan:
    """For each rank of the target mesh (row-major over pp, dp, tp), the arrays and boxes it reads."""
    return restore.restore_plan(session, checkpoint_id=checkpoint_id, tp=tp, pp=pp, dp=dp, rank=rank)


@router.post(
    "/checkpoints/{checkpoint_id}/convert",
    response_model=JobPublic,
    status_code=202,
    dependencies=[Authorized],
)
def convert(
    session: SessionDep, runner: JobsDep, checkpoint_id: CheckpointId, data: ConvertRequest
) -> JobPublic:
    """Queue a conversion of the checkpoint to another (tp, pp, dp) layout; poll ``/jobs/{id}``."""
    job = jobs.create_job(session, checkpoint_id=checkpoint_id, data=data)
    session.commit()  # the worker reads the job in its own session
    runner.enqueue(job.id)
    return jobs.job_public(job)


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(session: SessionDep, job_id: JobId) -> JobPublic:
    job = session.get(ConversionJob, job_id)
    if job is None:
        raise NotFoundError("job", job_id)
    return jobs.job_public(job)
