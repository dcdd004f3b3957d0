"""Conversion jobs: ``POST /checkpoints/{id}/convert`` queues one, a background worker runs it.

The converter is pluggable (:data:`Converter`): the app gets one at construction, tests pass a
real callable, and :func:`default_converter` reshards with ``ckptd.converters.reshard``.
Jobs are rows, so their status survives a restart, and every server process on the database
claims from the same table (see :class:`JobRunner`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update

from ckptd.api.db import Database
from ckptd.api.errors import CatalogError, ConflictError
from ckptd.api.models import ConversionJob, utcnow
from ckptd.api.schemas import ConvertRequest, JobPublic
from ckptd.api.services.checkpoints import get_checkpoint
from ckptd.api.services.restore import persistent_sources
from ckptd.api.uris import check_uri, tier_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversionTask:
    """Everything a converter needs; every URI in it was validated by the catalog."""

    job_id: int
    checkpoint_id: int
    step: int
    source_uri: str
    layout: dict[str, Any]
    target_mesh: dict[str, int]
    output_uri: str


Converter = Callable[[ConversionTask], dict[str, Any]]
"""Runs one conversion and returns a JSON-able result; raising marks the job failed."""


def default_converter(task: ConversionTask) -> dict[str, Any]:
    """Reshard with ``ckptd.converters.reshard`` into a new run root at ``task.output_uri``.

    The one place the catalog uses converters (a job runs one); the arrow is allowed explicitly in
    pyproject.toml's import contracts. Imported here so that ``ckptd serve`` never loads torch."""
    from ckptd.converters.reshard import reshard  # heavy (torch): only the worker thread imports it
    from ckptd.format.run import Run, step_dir
    from ckptd.storage import open_store

    src_root, _, group = task.source_uri.rpartition("/")
    if group != step_dir(task.step):
        raise CatalogError(f"{task.source_uri!r} is not a <run root>/{step_dir(task.step)} checkpoint group")
    result = reshard(
        Run(open_store(src_root)), Run(open_store(task.output_uri)), mesh=task.target_mesh, step=task.step
    )
    return {
        "uri": f"{task.output_uri}/{group}",
        "arrays": len(result.manifest.arrays),
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
    }


def job_public(job: ConversionJob) -> JobPublic:
    return JobPublic.model_validate(job, from_attributes=True)


def create_job(db_session: Any, *, checkpoint_id: int, data: ConvertRequest) -> ConversionJob:
    """Insert a queued job; the caller commits and then hands its id to :meth:`JobRunner.enqueue`."""
    ckpt = get_checkpoint(db_session, checkpoint_id=checkpoint_id)
    if ckpt.state != "committed":
        raise ConflictError(
            f"checkpoint {ckpt.id} is {ckpt.state}; only committed checkpoints can be converted"
        )
    sources = [s for s in persistent_sources(ckpt) if data.tier is None or s.tier == data.tier]
    if not sources:
        raise ConflictError(
            f"checkpoint {ckpt.id} has no {data.tier or 'persistent'} location to convert from"
        )
    source = sources[0]
    root = ckpt.run.roots.get(source.tier)
    if root is None:
        raise ConflictError(f"run {ckpt.run.name!r} has no {source.tier} root to write the conversion under")
    # Built only from a validated root and integers: never from request strings.
    output = check_uri(f"{check_uri(root)}/converted/step{ckpt.step}-tp{data.tp}-pp{data.pp}-dp{data.dp}")
    job = ConversionJob(
        checkpoint_id=ckpt.id,
        status="queued",
        target={
            "tp": data.tp,
            "pp": data.pp,
            "dp": data.dp,
            "source_uri": source.uri,
            "tier": tier_of(source.uri),
        },
        output_uri=output,
    )
    db_session.add(job)
    db_session.flush()
    return job


class JobRunner:
    """One daemon thread per server process that claims queued jobs from the database and runs
    them one at a time (conversions are I/O and memory heavy: one at a time keeps the server's
    footprint bounded).

    Several server processes share the job table (a scaled-out catalog on PostgreSQL): a job is
    claimed with a row lock that the others skip (``SELECT ... FOR UPDATE SKIP LOCKED``) and a
    conditional ``UPDATE ... WHERE status = 'queued'`` (the guard SQLite relies on), so it runs
    exactly once. The claimant renews ``heartbeat_at`` while it runs; a running job whose lease
    (``lease_s``) ran out belonged to a process that died, and is failed by whichever server
    notices. ``enqueue`` only wakes this process's worker; the others find the job within ``poll_s``.
    """

    def __init__(
        self,
        db: Database,
        converter: Converter = default_converter,
        *,
        poll_s: float = 2.0,
        lease_s: float = 60.0,
    ) -> None:
        self._db = db
        self._converter = converter
        self._poll_s = poll_s
        self._lease_s = lease_s
        self.worker_id = f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.idle = threading.Event()
        """Set while this process's worker has nothing to run."""
        self.idle.set()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name="ckptd-conversion-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None

    def enqueue(self, job_id: int) -> None:
        """A job was queued (its row committed): look for it now rather than at the next poll."""
        self.idle.clear()
        self._wake.set()

    def _work(self) -> None:
        next_expiry = 0.0
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_expiry:  # a lease is renewed every lease_s/3: check as often
                    self.expire_stale()
                    next_expiry = time.monotonic() + self._lease_s / 3
                task = self.claim()
            except Exception:  # a database hiccup must not kill the worker thread
                log.exception("conversion jobs: claiming failed; retrying")
                task = None
            if task is None:
                self.idle.set()
                self._wake.wait(self._poll_s)
                self._wake.clear()
                continue
            self.idle.clear()
            try:
                self._run(task)
            except Exception:  # a broken job must not kill the worker thread
                log.exception("conversion job %s crashed the runner", task.job_id)

    def expire_stale(self) -> int:
        """Fail running jobs whose claimant stopped renewing its lease; returns how many."""
        cutoff = utcnow() - timedelta(seconds=self._lease_s)
        with self._db.session() as s:
            result = s.execute(
                update(ConversionJob)
                .where(
                    ConversionJob.status == "running",
                    or_(ConversionJob.heartbeat_at.is_(None), ConversionJob.heartbeat_at < cutoff),
                )
                .values(
                    status="failed",
                    error=f"its server process stopped renewing the job's lease ({self._lease_s:g} s): "
                    "it died or lost the database",
                    finished_at=utcnow(),
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def claim(self) -> ConversionTask | None:
        """Claim the oldest queued job for this process, or None when there is none to take."""
        with self._db.session() as s:
            job = s.scalar(
                select(ConversionJob)
                .where(ConversionJob.status == "queued")
                .order_by(ConversionJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)  # SQLite has no row locks: the UPDATE below guards
            )
            if job is None:
                return None
            now = utcnow()
            taken = s.execute(
                update(ConversionJob)
                .where(ConversionJob.id == job.id, ConversionJob.status == "queued")
                .values(status="running", started_at=now, claimed_by=self.worker_id, heartbeat_at=now)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                return None  # another process took it between our read and our write
            ckpt = get_checkpoint(s, checkpoint_id=job.checkpoint_id)
            return ConversionTask(
                job_id=job.id,
                checkpoint_id=ckpt.id,
                step=ckpt.step,
                source_uri=str(job.target["source_uri"]),
                layout=dict(ckpt.layout or {}),
                target_mesh={k: int(job.target[k]) for k in ("tp", "pp", "dp")},
                output_uri=job.output_uri,
            )

    def _mine(self, job_id: int) -> ColumnElement[bool]:
        return and_(
            ConversionJob.id == job_id,
            ConversionJob.status == "running",
            ConversionJob.claimed_by == self.worker_id,
        )

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self._lease_s / 3):
            try:
                with self._db.session() as s:
                    s.execute(update(ConversionJob).where(self._mine(job_id)).values(heartbeat_at=utcnow()))
            except Exception as e:  # the next beat may get through; the lease has slack for two misses
                log.warning("conversion job %s: renewing its lease failed: %r", job_id, e)

    def _run(self, task: ConversionTask) -> None:
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(task.job_id, done), daemon=True)
        beat.start()
        try:
            result = self._converter(task)
            status, error = "succeeded", None
        except Exception as e:  # the converter's failure is the job's outcome, not the server's
            result, status, error = None, "failed", f"{type(e).__name__}: {e}"[:4000]
        finally:
            done.set()
            beat.join()
        with self._db.session() as s:
            # only while the job is still ours: a job expired meanwhile keeps its failure
            s.execute(
                update(ConversionJob)
                .where(self._mine(task.job_id))
                .values(status=status, error=error, result=result, finished_at=utcnow())
            )
