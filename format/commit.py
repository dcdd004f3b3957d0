"""Committing a checkpoint: Zarr metadata and tables first, the commit record last.

The committer runs once (rank 0, or the single process) after every writer has made its
shards durable. It checks that the writers wrote exactly what the storage plan requires — a
missing writer is an error, never a silently partial checkpoint — writes ``zarr.json`` for
every array and group and the format v2 metadata objects, and finally creates
``manifest.json`` exclusively: of two attempts at one step exactly one commits. Until that
last write the checkpoint does not exist for any reader.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping, check_tiling
from ckptd.format.codecs import crc32c
from ckptd.format.commit_record import (
    STATE_NAME,
    BlobRef,
    check_attempt,
    encode_pages,
    encode_record,
    encode_state,
    meta_key,
    page_key,
)
from ckptd.format.errors import LayoutError
from ckptd.format.lease import Lease
from ckptd.format.manifest import MANIFEST_KEY, ArrayRecord, Manifest, PartRecord, RankState, Totals
from ckptd.format.names import check_segment
from ckptd.format.rank_array import rank_array_document, rank_array_key
from ckptd.format.store import Store
from ckptd.format.tally import Tally, expected_tally
from ckptd.format.writer import ArrayReport, WriterReport
from ckptd.format.zarr_meta import (
    ZARR_JSON,
    array_document,
    checkpoint_groups,
    group_document,
    root_attributes,
)


def merge_reports(reports: Sequence[WriterReport]) -> dict[str, ArrayRecord]:
    merged: dict[str, ArrayReport] = {}
    for rep in reports:
        for path, a in rep.arrays.items():
            m = merged.get(path)
            if m is None:
                merged[path] = ArrayReport(a.dtype, a.shape, a.kind, a.codec, a.layout, dict(a.parts), a.plan)
                continue
            if (m.dtype, m.shape, m.kind, m.codec) != (a.dtype, a.shape, a.kind, a.codec):
                raise LayoutError(
                    f"{path}: writers disagree on dtype/shape/storage "
                    f"({m.dtype.name}{list(m.shape)} {m.kind} vs {a.dtype.name}{list(a.shape)} {a.kind})"
                )
            for i, p in a.parts.items():
                have = m.parts.get(i)
                if have is None:
                    m.parts[i] = p
                elif (have.offset, have.shape, have.grid, have.chunks) != (
                    p.offset,
                    p.shape,
                    p.grid,
                    p.chunks,
                ):
                    raise LayoutError(f"{path}: writers planned part {i} differently")
                else:
                    m.parts[i] = PartRecord(p.offset, p.shape, p.grid, p.chunks, (*have.shards, *p.shards))
    out: dict[str, ArrayRecord] = {}
    for path, m in merged.items():
        parts = tuple(
            PartRecord(p.offset, p.shape, p.grid, p.chunks, tuple(sorted(p.shards, key=lambda s: s.coords)))
            for _, p in sorted(m.parts.items())
        )
        record = ArrayRecord(path, m.dtype, m.shape, m.kind, m.codec, m.layout, parts)
        check_complete(record)
        out[path] = record
    return out


def check_complete(a: ArrayRecord) -> None:
    """Every element of the array is in exactly one shard that some writer reported."""
    if a.kind == "scalar":
        if len(a.parts) != 1 or len(a.parts[0].shards) != 1:
            raise LayoutError(f"{a.path}: scalar array was not written exactly once")
        return
    if a.kind == "pieces":
        check_tiling(a.shape, [ShardBox(p.offset, p.shape) for p in a.parts])
        for i, p in enumerate(a.parts):
            if len(p.shards) != 1:
                raise LayoutError(f"{a.path}: piece {i} has {len(p.shards)} shards, expected 1")
        return
    (part,) = a.parts
    expected = {
        c
        for c in cells_overlapping(ShardBox.whole(a.shape), part.grid)
        if not cell_box(c, part.grid, a.shape).is_empty()
    }
    got = [s.coords for s in part.shards]
    if len(got) != len(set(got)):
        raise LayoutError(f"{a.path}: a shard was written by more than one writer")
    missing = expected - set(got)
    if missing:
        raise LayoutError(
            f"{a.path}: {len(missing)} of {len(expected)} shards were not written "
            f"(e.g. {sorted(missing)[0]}); "
            "a writer is missing from the commit"
        )


def new_attempt() -> str:
    """A fresh attempt directory name: every save attempt writes its data into its own directory,
    so a zombie writer's late shards can never join another attempt's commit."""
    return f"a-{uuid.uuid4().hex[:16]}"


def commit(
    store: Store,
    *,
    step: int,
    reports: Sequence[WriterReport],
    state: dict[str, Any],
    world_size: int = 1,
    mesh: Mapping[str, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    attempt: str | None = None,
    rank_state: RankState = False,
    lease: Lease | None = None,
) -> Manifest:
    """Publish a checkpoint whose shards the writers of ``reports`` made durable in ``store``.

    ``store`` is rooted at the step directory. With ``attempt`` (format v2) the writers wrote into
    ``<attempt>/``; ``reports`` are complete (every shard record), as in one process or when a
    caller gathered them itself (DCP's storage layer does). Without ``attempt`` a format v1
    checkpoint is written (the data at the step directory's root; kept for compatibility tests).
    """
    arrays = merge_reports(reports)
    if attempt is None:
        return _commit_v1(store, step=step, arrays=arrays, state=state, world_size=world_size, mesh=mesh,
                          metadata=metadata)
    total = sum((r.tally for r in reports), Tally())
    totals = Totals(arrays=len(arrays), shards=total.shards, nbytes=total.nbytes,
                    stored_bytes=total.stored_bytes, writers=len({r.rank for r in reports if r.tally.shards}))
    documented = set().union(*(r.documented for r in reports)) if reports else set()
    return publish(store, step=step, attempt=attempt, arrays=arrays, state=state, world_size=world_size,
                   mesh=mesh, metadata=metadata, totals=totals, rank_state=rank_state, lease=lease,
                   documented=documented)


def check_tally(arrays: Mapping[str, ArrayRecord], got: Tally) -> None:
    """The writers' summed tally must be exactly what the storage plan of ``arrays`` requires."""
    want = expected_tally(arrays.values())
    if got.shards != want.shards or got.fingerprint != want.fingerprint:
        raise LayoutError(
            f"the writers wrote {got.shards} shard objects but the storage plan has {want.shards}"
            + ("" if got.shards != want.shards else " (a shard was written twice or at the wrong place)")
            + ": a writer is missing from the commit, or ranks disagree about the layout"
        )


def publish(
    store: Store,
    *,
    step: int,
    attempt: str,
    arrays: Mapping[str, ArrayRecord],
    state: dict[str, Any],
    world_size: int,
    mesh: Mapping[str, int] | None,
    metadata: Mapping[str, Any] | None,
    totals: Totals,
    rank_state: RankState = False,
    lease: Lease | None = None,
    documented: Collection[str] = (),
) -> Manifest:
    """Format v2 commit: Zarr metadata and tables, then the commit record, created exclusively.

    :class:`CheckpointExistsError` when another attempt committed this step first; nothing of
    this attempt is then visible (its directory is collected by gc).
    """
    check_attempt(attempt)
    from ckptd.format.tree import tensor_paths  # the tree module loads torch; reading a run must not

    missing = [p for p in tensor_paths(state) if p not in arrays]
    if missing:
        raise LayoutError(f"the state refers to arrays that no writer wrote: {missing[:5]}")
    mesh = {check_segment(str(k)): int(v) for k, v in (mesh or {}).items()}
    manifest = Manifest(
        step=step, checkpoint_id=uuid.uuid4().hex, created_at=_now(), world_size=world_size,
        arrays={p: a.unlisted() for p, a in arrays.items()}, state=state, mesh=mesh,
        metadata=dict(metadata or {}), format_version=2, attempt=attempt, totals=totals,
        rank_state=rank_state,
    )
    pages = encode_pages(attempt, manifest.arrays)
    state_raw = encode_state(attempt, state)
    record = encode_record(manifest, [ref for ref, _ in pages], BlobRef(len(state_raw), crc32c(state_raw)))
    documents = _zarr_documents(manifest, prefix=f"{attempt}/", skip=set(documented))
    documents.update({page_key(attempt, i): raw for i, (_, raw) in enumerate(pages)})
    documents[meta_key(attempt, STATE_NAME)] = state_raw
    if rank_state == "array":  # the ranks wrote their rows; the array's description comes with the rest
        documents[rank_array_key(attempt, "zarr.json")] = rank_array_document(world_size)
    _write_all(store, documents)
    store.flush()
    if lease is not None:
        lease.check()
    store.write_exclusive(MANIFEST_KEY, record)
    return manifest


def _commit_v1(store: Store, *, step: int, arrays: dict[str, ArrayRecord], state: dict[str, Any],
               world_size: int, mesh: Mapping[str, int] | None,
               metadata: Mapping[str, Any] | None) -> Manifest:
    from ckptd.format.tree import tensor_paths

    missing = [p for p in tensor_paths(state) if p not in arrays]
    if missing:
        raise LayoutError(f"the state refers to arrays that no writer wrote: {missing[:5]}")
    manifest = Manifest(step=step, checkpoint_id=uuid.uuid4().hex, created_at=_now(), world_size=world_size,
                        arrays=arrays, state=state, mesh=dict(mesh or {}), metadata=dict(metadata or {}),
                        format_version=1)
    _write_all(store, _zarr_documents(manifest, prefix=""))
    store.flush()
    store.write_atomic(MANIFEST_KEY, manifest.dumps())
    return manifest


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _zarr_documents(manifest: Manifest, *, prefix: str, skip: set[str] | None = None) -> dict[str, bytes]:
    """``zarr.json`` of every group and of the arrays not in ``skip`` (their lead writers wrote them)."""
    documents: dict[str, bytes] = {}
    for a in manifest.arrays.values():
        if skip and a.path in skip:
            continue
        for i, part in enumerate(a.parts):
            documents[f"{prefix}{a.part_key(i)}/{ZARR_JSON}"] = array_document(a, part, i)
    for g in sorted(checkpoint_groups(manifest.arrays.values())):  # verify.py checks the same set
        attrs = root_attributes(manifest.format_version, manifest.step) if g == "" else {}
        documents[f"{prefix}{g}/{ZARR_JSON}" if g else f"{prefix}{ZARR_JSON}"] = group_document(attrs)
    return documents


def _write_all(store: Store, documents: Mapping[str, bytes]) -> None:
    # Hundreds of small objects: write them concurrently (object stores answer in parallel).
    if not documents:
        return
    with ThreadPoolExecutor(min(16, len(documents))) as pool:
        for f in [pool.submit(store.write, key, [doc]) for key, doc in documents.items()]:
            f.result()
