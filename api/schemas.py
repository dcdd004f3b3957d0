"""Pydantic schemas of the HTTP API: ``*Base`` (shared fields), ``*Create``, ``*Update`` and ``*Public``.

Every field a client sends is bounded and validated here: names through
:func:`ckptd.format.names.check_segment`, storage URIs through :func:`ckptd.api.uris.check_uri`,
metric values finite, collections and documents of bounded size.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from ckptd.api.uris import check_uri
from ckptd.format.layout import TensorLayout
from ckptd.format.names import check_array_path, check_segment
from ckptd.wire.contract import (
    MAX_DOC_BYTES,
    MAX_ERROR_CHARS,
    MAX_LAYOUT_ARRAYS,
    MAX_METRICS,
    MAX_TAGS,
    METRIC_NAME_PATTERN,
    METRIC_NAME_RE,
    TAG_PATTERN,
)
from ckptd.wire.contract import (
    MAX_ID as MAX_ID,  # re-exported: the routes bound ids and steps with the wire limits
)
from ckptd.wire.contract import (
    MAX_STEP as MAX_STEP,
)
from ckptd.wire.selector import Alias, is_reserved, parse_selector

# The limits are the wire contract's (ckptd.wire.contract), shared with the engine.
MAX_ARRAYS = MAX_LAYOUT_ARRAYS


def _bounded_json(doc: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(doc, allow_nan=False)) > MAX_DOC_BYTES:
        raise ValueError(f"document larger than {MAX_DOC_BYTES} bytes")
    return doc


def check_selector(value: str) -> str:
    """A selector in the grammar of :mod:`ckptd.wire.selector`; aliases must also be path segments."""
    if isinstance(parse_selector(value), Alias):  # SelectorError is a ValueError: pydantic reports it
        return check_alias_name(value)
    return value


def check_alias_name(value: str) -> str:
    check_segment(value)
    if is_reserved(value):
        raise ValueError(f"alias {value!r} is reserved (latest, best:<metric>, step:<n>)")
    return value


METRIC_RE = METRIC_NAME_RE
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(check_segment)]
AliasName = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(check_alias_name)]
Selector = Annotated[str, StringConstraints(min_length=1, max_length=220), AfterValidator(check_selector)]
MetricName = Annotated[str, StringConstraints(pattern=f"^{METRIC_NAME_PATTERN}$")]
MetricValue = Annotated[float, Field(allow_inf_nan=False)]
Tag = Annotated[str, StringConstraints(pattern=f"^{TAG_PATTERN}$")]
Uri = Annotated[str, StringConstraints(min_length=1, max_length=1024), AfterValidator(check_uri)]
Tier = Literal["memory", "local", "remote"]
Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
JsonDoc = Annotated[dict[str, Any], AfterValidator(_bounded_json)]
Metrics = Annotated[dict[MetricName, MetricValue], Field(max_length=MAX_METRICS)]
Tags = Annotated[list[Tag], Field(max_length=MAX_TAGS)]
RunStatus = Literal["active", "completed", "failed", "archived"]
CheckpointState = Literal["pending", "committed", "deleting", "deleted", "failed"]


def check_unicode(doc: Any) -> Any:
    """Refuse a document with a string (key or value, at any depth) that is not valid Unicode: JSON's
    ``\\ud800`` escapes decode to lone surrogates, which no database or JSON encoder can store."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"string {item[:40]!r} contains a lone UTF-16 surrogate") from e
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return doc


class Strict(BaseModel):
    """A request body: no unknown fields, every string valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return check_unicode(data)


# --- runs ------------------------------------------------------------------------------------------


class KeepBest(Strict):
    metric: MetricName
    n: int = Field(ge=1, le=10_000)
    mode: Literal["min", "max"] = "min"


class RetentionPolicy(Strict):
    """Which committed checkpoints GC keeps; everything else committed (and every failed one) goes."""

    keep_last: int | None = Field(default=None, ge=1, le=100_000)
    keep_best: KeepBest | None = None
    keep_every: int | None = Field(
        default=None, ge=1, le=MAX_STEP, description="keep steps divisible by this"
    )
    collect_failed: bool = True


class RunBase(Strict):
    config: JsonDoc = Field(default_factory=dict)
    roots: dict[Tier, Uri] = Field(default_factory=dict, description="storage root of the run per tier")
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy)


class RunCreate(RunBase):
    name: Name


class RunUpdate(Strict):
    status: RunStatus | None = None
    config: JsonDoc | None = None
    roots: dict[Tier, Uri] | None = None
    retention: RetentionPolicy | None = None


class RunPublic(RunBase):
    id: int
    name: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    checkpoints: int = 0
    committed: int = 0
    latest_step: int | None = None


# --- checkpoints -----------------------------------------------------------------------------------


class ArraySpec(Strict):
    dtype: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
    shape: Annotated[list[Annotated[int, Field(ge=0, le=2**48)]], Field(max_length=32)]
    layout: dict[str, Any] = Field(default_factory=dict)
    nbytes: int = Field(default=0, ge=0, le=2**62)

    @field_validator("layout")
    @classmethod
    def _layout_parses(cls, v: dict[str, Any]) -> dict[str, Any]:
        _bounded_json(v)
        TensorLayout.from_json(v or {"partition": []})  # raises MetadataError/LayoutError (ValueErrors)
        return v


class LayoutDoc(Strict):
    mesh: dict[Name, Annotated[int, Field(ge=1, le=65_536)]] = Field(default_factory=dict, max_length=16)
    arrays: dict[str, ArraySpec] = Field(default_factory=dict, max_length=MAX_ARRAYS)

    @field_validator("arrays")
    @classmethod
    def _paths_safe(cls, v: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        for path in v:
            check_array_path(path)
        return v


class LocationIn(Strict):
    tier: Tier
    uri: Uri


class LocationPublic(LocationIn):
    created_at: datetime


class CheckpointCreate(Strict):
    step: Step
    parent_step: Step | None = Field(default=None, description="lineage: the step this one continues from")
    locations: Annotated[list[LocationIn], Field(max_length=3)] = Field(default_factory=list)
    layout: LayoutDoc | None = None
    nbytes: int | None = Field(default=None, ge=0, le=2**62)
    metrics: Metrics = Field(default_factory=dict)
    tags: Tags = Field(default_factory=list)


class CheckpointUpdate(Strict):
    """Engine-side updates; ``deleting``/``deleted`` are reached only through retention GC."""

    state: Literal["committed", "failed"] | None = None
    error: Annotated[str, StringConstraints(max_length=MAX_ERROR_CHARS)] | None = None
    nbytes: int | None = Field(default=None, ge=0, le=2**62)
    layout: LayoutDoc | None = None
    metrics: Metrics | None = Field(default=None, description="merged into the existing metrics")
    tags: Tags | None = Field(default=None, description="replaces the existing tags")
    locations: Annotated[list[LocationIn], Field(max_length=3)] | None = Field(
        default=None, description="added to (or replacing, per tier) the existing locations"
    )


class LayoutSummary(BaseModel):
    mesh: dict[str, int]
    arrays: int
    dtypes: dict[str, int]


class CheckpointPublic(BaseModel):
    id: int
    run: str
    step: int
    state: CheckpointState
    parent_id: int | None
    nbytes: int | None
    metrics: dict[str, float]
    tags: list[str]
    locations: list[LocationPublic]
    layout_summary: LayoutSummary | None
    error: str | None
    created_at: datetime
    committed_at: datetime | None
    updated_at: datetime


class CheckpointPage(BaseModel):
    items: list[CheckpointPublic]
    next_cursor: str | None


class RunPage(BaseModel):
    items: list[RunPublic]
    next_cursor: str | None


# --- aliases, rollback -----------------------------------------------------------------------------


class AliasSet(Strict):
    checkpoint_id: int = Field(ge=1, le=MAX_ID)


class AliasPublic(BaseModel):
    run: str
    name: str
    computed: bool
    checkpoint: CheckpointPublic


class RollbackRequest(Strict):
    """Exactly one of ``checkpoint_id`` or ``select`` (latest, best:<metric>[:min|:max], step:<n>, alias)."""

    checkpoint_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    select: Selector | None = None
    reason: Annotated[str, StringConstraints(max_length=1000)] | None = None


class RollbackPublic(BaseModel):
    run: str
    checkpoint: CheckpointPublic
    reason: str | None
    requested_at: datetime


# --- retention -------------------------------------------------------------------------------------


class GCEntry(BaseModel):
    checkpoint_id: int
    step: int
    state: CheckpointState
    reason: str


class GCPlan(BaseModel):
    run: str
    keep: list[GCEntry]
    delete: list[GCEntry]


class GCResult(BaseModel):
    run: str
    deleted: list[GCEntry]
    failed: list[GCEntry]


# --- restore plans ---------------------------------------------------------------------------------


class Box(BaseModel):
    offset: list[int]
    shape: list[int]


class ArrayRead(BaseModel):
    array: str
    uri: str
    dtype: str
    shape: list[int]
    box: Box
    nbytes: int


class RankPlan(BaseModel):
    rank: int
    coords: dict[str, int]
    reads: list[ArrayRead]
    nbytes: int


class RestorePlan(BaseModel):
    checkpoint_id: int
    run: str
    step: int
    source_mesh: dict[str, int]
    target_mesh: dict[str, int]
    rank_order: list[str]
    sources: list[LocationPublic]
    ranks: list[RankPlan]


# --- conversion jobs, sync -------------------------------------------------------------------------


class ConvertRequest(Strict):
    tp: int = Field(default=1, ge=1, le=1024)
    pp: int = Field(default=1, ge=1, le=1024)
    dp: int = Field(default=1, ge=1, le=1024)
    tier: Literal["local", "remote"] | None = Field(default=None, description="source tier; default fastest")


JobStatus = Literal["queued", "running", "succeeded", "failed"]


class JobPublic(BaseModel):
    id: int
    checkpoint_id: int
    status: JobStatus
    target: dict[str, Any]
    output_uri: str
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class DiscardRequest(Strict):
    after_step: Step = Field(description="the step the run rolled back to; every later one is discarded")


class DiscardResult(BaseModel):
    run: str
    deleted: list[int] = Field(description="steps marked deleted by this request")


class SyncRequest(Strict):
    tier: Literal["local", "remote"] = "local"


class SyncReport(BaseModel):
    run: str
    tier: str
    added: list[int] = Field(default_factory=list)
    committed: list[int] = Field(default_factory=list)
    unchanged: list[int] = Field(default_factory=list)
    missing: list[int] = Field(default_factory=list, description="committed in the catalog, no manifest")
    deleted: list[int] = Field(
        default_factory=list, description="of the missing, those no other tier holds: marked deleted"
    )
    rejected: dict[str, str] = Field(default_factory=dict, description="step -> why its manifest was ignored")


class Health(BaseModel):
    status: Literal["ok"]
    database: str
    schema_revision: str | None
