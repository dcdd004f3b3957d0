"""Committing a checkpoint: merge writer reports, write Zarr metadata, then the manifest last.

The committer runs once (rank 0, or the single process) after every writer has made
its shards durable. It checks that the writers' shards tile every array — a missing
writer is an error, never a silently partial checkpoint — writes ``zarr.json`` for
every array and group, and finally publishes ``manifest.json`` atomically. Until that
last write the checkpoint does not exist for any reader.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping, check_tiling
from ckptd.format.errors import LayoutError
from ckptd.format.manifest import MANIFEST_KEY, ArrayRecord, Manifest, PartRecord
from ckptd.format.store import Store
from ckptd.format.tree import tensor_paths
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
                merged[path] = ArrayReport(a.dtype, a.shape, a.kind, a.codec, a.layout, dict(a.parts))
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


def commit(
    store: Store,
    *,
    step: int,
    reports: Sequence[WriterReport],
    state: dict[str, Any],
    world_size: int = 1,
    mesh: Mapping[str, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """Publish a checkpoint whose shards the writers of ``reports`` have made durable in ``store``."""
    arrays = merge_reports(reports)
    missing = [p for p in tensor_paths(state) if p not in arrays]
    if missing:
        raise LayoutError(f"the state refers to arrays that no writer wrote: {missing[:5]}")
    manifest = Manifest(
        step=step,
        checkpoint_id=uuid.uuid4().hex,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        world_size=world_size,
        arrays=arrays,
        state=state,
        mesh=dict(mesh or {}),
        metadata=dict(metadata or {}),
    )
    documents: dict[str, bytes] = {}
    for a in arrays.values():
        for i, part in enumerate(a.parts):
            documents[f"{a.part_key(i)}/{ZARR_JSON}"] = array_document(a, part, i)
    for g in sorted(checkpoint_groups(arrays.values())):  # verify.py checks the same set
        attrs = root_attributes(manifest.format_version, step) if g == "" else {}
        documents[f"{g}/{ZARR_JSON}" if g else ZARR_JSON] = group_document(attrs)
    # Hundreds of small objects: write them concurrently (object stores answer in parallel).
    with ThreadPoolExecutor(16) as pool:
        for f in [pool.submit(store.write, key, [doc]) for key, doc in documents.items()]:
            f.result()
    store.flush()
    store.write_atomic(MANIFEST_KEY, manifest.dumps())
    return manifest
