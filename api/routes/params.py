"""Bounded path and query parameters shared by the route modules."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from ckptd.api.schemas import MAX_ID, MAX_STEP

RunName = Annotated[str, Path(min_length=1, max_length=200, description="run name (a safe path segment)")]
CheckpointId = Annotated[int, Path(ge=1, le=MAX_ID)]
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
Cursor = Annotated[str | None, Query(max_length=1024, description="next_cursor of the previous page")]
StepBound = Annotated[int | None, Query(ge=0, le=MAX_STEP)]
AliasPathName = Annotated[str, Path(min_length=1, max_length=220)]
CheckpointSort = Annotated[
    str,
    Query(
        pattern=r"^-?(step|created_at|nbytes|id|metric:[A-Za-z0-9_.\-/]{1,200})$",
        description="[-]step|created_at|nbytes|id|metric:<name>; '-' sorts descending",
    ),
]
MeshSize = Annotated[int, Query(ge=1, le=1024)]
