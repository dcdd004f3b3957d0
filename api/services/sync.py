"""Reconcile the catalog from the manifests in storage (storage is the source of truth).

Two halves with a small seam between them, so that each is testable alone:

* :func:`read_run_manifests` lists a run root with ``ckptd.storage.open_store`` and
  ``ckptd.format.run.Run`` and returns :class:`ManifestRecord` s (step, URI, manifest JSON);
* :func:`reconcile` applies records to the catalog: unknown steps are added as committed,
  pending/failed rows whose manifest exists become committed (the manifest is written last,
  so it exists only for a complete checkpoint), committed rows gain the tier's location, and
  committed rows of that tier without a manifest are reported as ``missing``, lose that tier's
  location, and are marked ``deleted`` when no other persistent tier holds them (a rollback or
  an operator removed them) — only when the root itself was found: an unmounted volume or an
  unreachable bucket looks empty, and is no evidence that anything is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from ckptd.api.errors import InvalidRequestError, StorageDeleteError
from ckptd.api.models import Checkpoint, Location, Run
from ckptd.api.roots import local_path
from ckptd.api.schemas import CheckpointCreate, LayoutDoc, LocationIn, RunCreate, SyncReport
from ckptd.api.services.checkpoints import mark_deleted, register_checkpoint, set_locations, transition
from ckptd.api.services.retention import open_fs
from ckptd.api.services.runs import create_run
from ckptd.api.uris import check_uri, require_within
from ckptd.format.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    step: int
    uri: str
    """URI of the checkpoint group (``<run root>/step_<n>``)."""
    doc: dict[str, Any]
    """The manifest as JSON: ``step``, ``created_at``, ``arrays``, ``mesh``, ``metadata`` ..."""


def root_exists(root: str) -> bool:
    """Whether the run root itself is there (a local directory, an object prefix with objects)."""
    root = check_uri(root)
    path = local_path(root)
    if path is not None:
        if os.path.exists(path) and not os.path.isdir(path):
            raise InvalidRequestError(f"run root {root!r} is not a directory")
        return os.path.isdir(path)
    fs, fs_path = open_fs(root)
    try:
        return bool(fs.exists(fs_path))
    except Exception as e:  # the backend's own errors: the storage did not answer
        raise StorageDeleteError(f"cannot reach {root!r}: {type(e).__name__}: {e}") from e


def read_run_manifests(root: str) -> tuple[list[ManifestRecord], dict[str, str]]:
    """Committed checkpoints under a run root, and steps whose manifest could not be read.

    The catalog reads storage here because the manifests in storage are the source of truth
    (an arrow allowed explicitly in pyproject.toml's import contracts)."""
    from ckptd.format.run import Run, step_dir  # the storage stack is only needed when syncing
    from ckptd.storage import open_store

    root = check_uri(root)
    if local_path(root) is None:
        open_fs(root)  # a backend this server lacks is the client's 422, before the store wraps it
    try:
        run = Run(open_store(root, fsync=False))
        steps = run.steps()
    except CheckpointError as e:
        raise StorageDeleteError(f"cannot list {root!r}: {e}") from e
    except Exception as e:  # the backend's own errors (timeouts, auth): the storage did not answer
        raise StorageDeleteError(f"cannot list {root!r}: {type(e).__name__}: {e}") from e
    records: list[ManifestRecord] = []
    rejected: dict[str, str] = {}
    for step in steps:
        try:
            manifest = run.manifest(step)
        except CheckpointError as e:
            rejected[str(step)] = str(e)
            continue
        records.append(ManifestRecord(step=step, uri=f"{root}/{step_dir(step)}", doc=manifest.to_json()))
    return records, rejected


def checkpoint_from_manifest(record: ManifestRecord, tier: str) -> CheckpointCreate:
    """Validate what a manifest says about a checkpoint exactly like an API request."""
    doc = record.doc
    arrays = {
        path: {
            "dtype": a.get("dtype"),
            "shape": a.get("shape"),
            "layout": a.get("layout") or {},
            "nbytes": a.get("nbytes", 0),
        }
        for path, a in (doc.get("arrays") or {}).items()
    }
    layout = LayoutDoc.model_validate({"mesh": doc.get("mesh") or {}, "arrays": arrays})
    meta = doc.get("metadata") or {}
    base: dict[str, Any] = {
        "step": record.step,
        "locations": [LocationIn.model_validate({"tier": tier, "uri": record.uri})],
        "layout": layout,
        "nbytes": doc.get("nbytes", sum(int(a.get("nbytes", 0)) for a in arrays.values())),
    }
    try:
        return CheckpointCreate.model_validate(
            {**base, "metrics": meta.get("metrics") or {}, "tags": meta.get("tags") or []}
        )
    except ValidationError:  # bad metrics/tags do not make the checkpoint less real: keep it without them
        return CheckpointCreate.model_validate(base)


def reconcile(
    session: Session,
    *,
    run_name: str,
    tier: str,
    root: str,
    records: Iterable[ManifestRecord],
    rejected: dict[str, str] | None = None,
    mark_missing: bool = True,
) -> SyncReport:
    """Apply ``records`` (every committed checkpoint found under ``root``) to the catalog; with
    ``mark_missing``, committed checkpoints of this tier not among them are gone from it."""
    if tier not in ("local", "remote"):
        raise InvalidRequestError(f"cannot sync the {tier!r} tier")
    run, _ = create_run(session, data=RunCreate.model_validate({"name": run_name, "roots": {tier: root}}))
    report = SyncReport(run=run.name, tier=tier, rejected=dict(rejected or {}))
    seen: set[int] = set()
    for record in sorted(records, key=lambda r: r.step):
        try:
            if record.doc.get("step") != record.step:
                raise InvalidRequestError(f"manifest says step {record.doc.get('step')!r}")
            require_within(record.uri, run.roots.get(tier), tier=tier)
            data = checkpoint_from_manifest(record, tier)
        except (ValidationError, ValueError, CheckpointError) as e:
            report.rejected[str(record.step)] = str(e)[:500]
            continue
        seen.add(record.step)
        _apply_record(session, run, tier, record.step, data, report)
        session.flush()
    _forget_missing(session, run, tier, seen, report, mark_missing=mark_missing)
    session.flush()
    return report


def _apply_record(
    session: Session, run: Run, tier: str, step: int, data: CheckpointCreate, report: SyncReport
) -> None:
    """Bring the catalog's checkpoint ``step`` in line with a committed manifest found in ``tier``."""
    ckpt = session.scalar(select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.step == step))
    if ckpt is None or ckpt.state == "deleted":
        ckpt, _ = register_checkpoint(session, run_name=run.name, data=data)
        transition(ckpt, "committed")
        report.added.append(step)
    elif ckpt.state in ("pending", "failed"):
        if ckpt.state == "failed":  # the manifest is proof of a complete checkpoint
            ckpt.state = "pending"
        set_locations(ckpt, run, data.locations)
        if ckpt.layout is None and data.layout is not None:
            ckpt.layout = data.layout.model_dump(mode="json")
        if ckpt.nbytes is None:
            ckpt.nbytes = data.nbytes
        transition(ckpt, "committed")
        report.committed.append(step)
    elif ckpt.state == "committed" and not any(loc.tier == tier for loc in ckpt.locations):
        set_locations(ckpt, run, data.locations)
        report.committed.append(step)
    else:  # committed with this tier already, or deleting (GC owns it)
        report.unchanged.append(step)


def _forget_missing(
    session: Session, run: Run, tier: str, seen: set[int], report: SyncReport, *, mark_missing: bool
) -> None:
    """Committed checkpoints the catalog places in ``tier`` but storage no longer holds."""
    held_here = session.scalars(
        select(Checkpoint)
        .join(Location, Location.checkpoint_id == Checkpoint.id)
        .where(Checkpoint.run_id == run.id, Checkpoint.state == "committed", Location.tier == tier)
        .order_by(Checkpoint.step)
    )
    for ckpt in [c for c in held_here if c.step not in seen]:
        report.missing.append(ckpt.step)
        if not mark_missing:
            continue
        ckpt.locations[:] = [loc for loc in ckpt.locations if loc.tier != tier]
        if not any(loc.tier != "memory" for loc in ckpt.locations):
            mark_deleted(ckpt, f"sync found no manifest under the {tier} root")
            report.deleted.append(ckpt.step)


def sync_from_storage(session: Session, *, run_name: str, tier: str, root: str) -> SyncReport:
    found = root_exists(root)
    records, rejected = read_run_manifests(root)
    return reconcile(
        session,
        run_name=run_name,
        tier=tier,
        root=root,
        records=records,
        rejected=rejected,
        mark_missing=found,
    )
