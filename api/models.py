"""SQLAlchemy 2 models of the catalog: runs, checkpoints and what hangs off them.

Metrics and tags are rows, not JSON, so that ``best:<metric>``, metric sorting and tag
filters are indexed queries on SQLite and PostgreSQL alike. The full layout document a
checkpoint registered (mesh + arrays) is JSON: it is read whole, by restore plans.

Every change here needs a migration in ``migrations/versions``; ``tests/api/test_migrations.py``
fails when autogenerate finds a difference.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite has no time zones), always returned time-zone aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a time-zone aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_created_at_id", "created_at", "id"),)  # the default list order

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    roots: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Storage root per tier (``{"local": "/nvme/ckpt/run1", "remote": "s3://b/run1"}``)."""
    retention: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("run_id", "step"),
        Index("ix_checkpoints_run_state_step", "run_id", "state", "step"),
        # lists across runs sort by (key, id) and stop after a page: without these, every such
        # request scans and sorts the whole table (W4 filter_all_runs)
        Index("ix_checkpoints_step_id", "step", "id"),
        Index("ix_checkpoints_created_at_id", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    nbytes: Mapped[int | None] = mapped_column(BigInteger)
    layout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """``{"mesh": {...}, "arrays": {path: {dtype, shape, layout, nbytes}}}`` as the manifest has it."""
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    committed_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    run: Mapped[Run] = relationship(lazy="joined", innerjoin=True)
    metrics: Mapped[list[CheckpointMetric]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="CheckpointMetric.name"
    )
    tags: Mapped[list[CheckpointTag]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="CheckpointTag.tag"
    )
    locations: Mapped[list[Location]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="Location.tier"
    )


class CheckpointMetric(Base):
    __tablename__ = "checkpoint_metrics"
    __table_args__ = (Index("ix_checkpoint_metrics_name_value", "name", "value"),)

    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class CheckpointTag(Base):
    __tablename__ = "checkpoint_tags"
    __table_args__ = (Index("ix_checkpoint_tags_tag", "tag"),)

    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)


class Location(Base):
    """One tier holding a checkpoint, and the URI of the checkpoint's group in it."""

    __tablename__ = "locations"

    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    tier: Mapped[str] = mapped_column(String(16), primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Base):
    """A user-defined name for a checkpoint of a run (``latest`` and ``best:<m>`` are computed)."""

    __tablename__ = "aliases"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    checkpoint: Mapped[Checkpoint] = relationship(lazy="joined", innerjoin=True)


class Rollback(Base):
    """The checkpoint a run must resume from; a running Checkpointer polls it and restores in place."""

    __tablename__ = "rollbacks"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    reason: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)

    checkpoint: Mapped[Checkpoint] = relationship(lazy="joined", innerjoin=True)


class ConversionJob(Base):
    """A conversion, claimed by one server process at a time (``claimed_by``), which renews
    ``heartbeat_at`` while it runs: several ``ckptd serve`` processes share one job table."""

    __tablename__ = "conversion_jobs"
    __table_args__ = (Index("ix_conversion_jobs_status_id", "status", "id"),)  # the claim query

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    output_uri: Mapped[str] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    """The server process running the job (host:pid:nonce)."""
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    """Renewed by that process while the job runs; a stale one means the process died."""
