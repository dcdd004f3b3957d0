"""Conversion jobs: ``POST /checkpoints/{id}/convert`` queues one, a background worker runs it.

The converter is pluggable (:data:`Converter`): the app gets one at construction, tests pass a
real callable, and :func:`default_converter` reshards with ``ckptd.converters.reshard``.
Jobs are rows, so their status survives a restart: on start the runner
re-queues ``queued`` jobs and fails ``running`` ones (their worker died with the old process).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptd.api.db import Database
from ckptd.api.errors import CatalogError, ConflictError
from ckptd.api.models import ConversionJob, utcnow
from ckptd.api.schemas import ConvertRequest, JobPublic
from ckptd.api.services.checkpoints import get_checkpoint
from ckptd.api.services.restore import persistent_sources
from ckptd.api.uris import check_uri, tier_of
from sqlalchemy import select

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
    """Reshard with ``ckptd.converters.reshard`` into a new run root at ``task.output_uri``."""
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
    """One daemon thread draining a queue of job ids (conversions are I/O and memory heavy:
    running them one at a time keeps the server's footprint bounded)."""

    def __init__(self, db: Database, converter: Converter = default_converter) -> None:
        self._db = db
        self._converter = converter
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.idle = threading.Event()
        self.idle.set()

    def start(self) -> None:
        with self._db.session() as s:
            for job in s.scalars(select(ConversionJob).where(ConversionJob.status == "running")):
                job.status, job.error, job.finished_at = (
                    "failed",
                    "the server restarted while it ran",
                    utcnow(),
                )
            queued = list(s.scalars(select(ConversionJob.id).where(ConversionJob.status == "queued")))
        self._thread = threading.Thread(target=self._work, name="ckptd-conversion-jobs", daemon=True)
        self._thread.start()
        for job_id in queued:
            self.enqueue(job_id)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def enqueue(self, job_id: int) -> None:
        self.idle.clear()
        self._queue.put(job_id)

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run_one(job_id)
            except Exception:  # a broken job must not kill the worker thread
                log.exception("conversion job %s crashed the runner", job_id)
            finally:
                if self._queue.empty():
                    self.idle.set()

    def _run_one(self, job_id: int) -> None:
        with self._db.session() as s:
            job = s.get(ConversionJob, job_id)
            if job is None or job.status != "queued":
                return
            ckpt = get_checkpoint(s, checkpoint_id=job.checkpoint_id)
            task = ConversionTask(
                job_id=job.id,
                checkpoint_id=ckpt.id,
                step=ckpt.step,
                source_uri=str(job.target["source_uri"]),
                layout=dict(ckpt.layout or {}),
                target_mesh={k: int(job.target[k]) for k in ("tp", "pp", "dp")},
                output_uri=job.output_uri,
            )
            job.status, job.started_at = "running", utcnow()
        try:
            result = self._converter(task)
            status, error = "succeeded", None
        except Exception as e:  # the converter's failure is the job's outcome, not the server's
            result, status, error = None, "failed", f"{type(e).__name__}: {e}"[:4000]
        with self._db.session() as s:
            job = s.get(ConversionJob, job_id)
            if job is not None:
                job.status, job.error, job.result, job.finished_at = status, error, result, utcnow()
