"""Reshard a checkpoint to another parallel layout by streaming chunks.

The universal format stores canonical tensors, so any layout can already *read* any
checkpoint. Resharding rewrites the shard grid so that every rank of the target
layout reads exactly one shard per tensor (one request, no read amplification) and
records the target mesh. Memory stays bounded: shards are streamed chunk by chunk
(``format.shard.stream_shard``), each chunk read from the source through the reader,
which fetches only the source chunks that overlap.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping
from ckptd.format.codecs import CodecSpec, crc32c
from ckptd.format.dtypes import tensor_to_numpy
from ckptd.format.errors import CheckpointNotFoundError, LayoutError
from ckptd.format.layout import TensorLayout
from ckptd.format.manifest import ArrayRecord, Manifest, PartRecord, ShardRecord
from ckptd.format.plan import DEFAULT_CHUNK_BYTES, PartPlan, plan_array
from ckptd.format.reader import CheckpointReader
from ckptd.format.run import Run
from ckptd.format.shard import ShardGeometry, stream_shard
from ckptd.format.writer import ArrayReport, WriterReport, shard_key


@dataclass(frozen=True, slots=True, kw_only=True)
class ReshardResult:
    manifest: Manifest
    bytes_read: int
    bytes_written: int


def target_layout(layout: TensorLayout | None, mesh: Mapping[str, int]) -> TensorLayout | None:
    """The source layout re-expressed over the target mesh: axes the target lacks are dropped."""
    if layout is None:
        return None
    axes = set(mesh)
    return TensorLayout(
        partition=tuple(tuple(a for a in dims if a in axes) for dims in layout.partition),
        replicated=tuple(a for a in layout.replicated if a in axes),
        padded=layout.padded,
        fused=layout.fused,
        alias_of=layout.alias_of,
        extra=layout.extra,
    )


def reshard(
    src: Run,
    dst: Run,
    *,
    mesh: Mapping[str, int],
    step: int | None = None,
    dst_step: int | None = None,
    codec: CodecSpec | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    threads: int = 8,
) -> ReshardResult:
    """Rewrite checkpoint ``step`` (default: latest) of ``src`` into ``dst`` for the layout ``mesh``."""
    if step is None:
        step = src.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {src.url}")
    for axis, size in mesh.items():
        if not isinstance(size, int) or size < 1:
            raise LayoutError(f"mesh axis {axis}={size!r} must be a positive integer")
    reader = src.reader(step)
    out_step = step if dst_step is None else dst_step
    out_store = dst.prepare(out_step, overwrite=overwrite)
    reports: list[WriterReport] = []
    bytes_read, bytes_written = reader.manifest.stored_bytes, 0  # format v2 keeps only totals
    # Shards stream concurrently; memory stays bounded by ``threads`` chunks in flight (plus
    # the source chunks each read touches), whatever the model size.
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptd-reshard") as pool:
        pending = []
        for a in reader.manifest.arrays.values():
            rep, finish = _convert_array(
                reader, a, out_store, mesh, codec or a.codec, chunk_bytes, progress, pool
            )
            reports.append(rep)
            pending.append(finish)
        try:
            for finish in pending:
                bytes_written += finish()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    meta: dict[str, Any] = dict(reader.manifest.metadata)
    meta["converted_from"] = {
        "uri": src.url,
        "step": step,
        "mesh": dict(reader.manifest.mesh),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    world = 1
    for size in mesh.values():
        world *= size
    manifest = dst.commit(
        out_step, reports, state=reader.manifest.state, world_size=world, mesh=dict(mesh), metadata=meta
    )
    return ReshardResult(manifest=manifest, bytes_read=bytes_read, bytes_written=bytes_written)


def _convert_array(
    reader: CheckpointReader,
    a: ArrayRecord,
    out_store: Any,
    mesh: Mapping[str, int],
    codec: CodecSpec,
    chunk_bytes: int,
    progress: Callable[[int], None] | None,
    pool: ThreadPoolExecutor,
) -> tuple[WriterReport, Callable[[], int]]:
    """Plan one array in the target layout and schedule its shards on ``pool``.

    Returns the report (shard records are filled in as shards finish) and a function that
    waits for this array's shards and returns the bytes written.
    """
    layout = target_layout(a.layout, mesh)
    boxes = layout.all_boxes(a.shape, mesh) if layout is not None and a.shape else [ShardBox.whole(a.shape)]
    plan = plan_array(a.shape, a.dtype.itemsize, boxes, chunk_bytes)
    if plan.kind == "scalar":
        codec = CodecSpec()
    report = WriterReport(rank=0)
    ar = ArrayReport(a.dtype, a.shape, plan.kind, codec, layout)
    report.arrays[a.path] = ar
    jobs: list[tuple[int, Future[ShardRecord]]] = []

    def read(box: ShardBox) -> np.ndarray:
        return tensor_to_numpy(reader.read(a.path, box))

    def scalar(key: str) -> ShardRecord:
        raw = read(ShardBox((), ())).reshape(-1).view(np.uint8).tobytes()
        stream = out_store.open_write(f"{key}/c")
        stream.write(raw)
        stream.write(crc32c(raw).to_bytes(4, "little"))
        stream.close()
        return ShardRecord((), 0, len(raw) + 4, 0)

    def shard(key: str, part: PartPlan, coords: tuple[int, ...]) -> ShardRecord:
        cell = cell_box(coords, part.grid, part.shape)
        geom = ShardGeometry(cell.offset, part.grid, part.chunks, part.shape)

        def read_part(b: ShardBox) -> np.ndarray:
            return read(ShardBox(tuple(o + po for o, po in zip(b.offset, part.offset, strict=True)), b.shape))

        stream = out_store.open_write(shard_key(key, coords))
        try:
            nbytes, crc = stream_shard(stream, geom, codec, a.dtype.itemsize, read_part)
            stream.close()
        except BaseException:
            stream.abort()
            raise
        if progress is not None:
            progress(cell.numel * a.dtype.itemsize)
        return ShardRecord(coords, 0, nbytes, crc)

    for part in plan.parts:
        key = a.path if plan.kind != "pieces" else f"{a.path}/piece-{part.index:05d}"
        if plan.kind == "scalar":
            jobs.append((part.index, pool.submit(scalar, key)))
        elif 0 not in part.shape:
            for coords in cells_overlapping(ShardBox.whole(part.shape), part.grid):
                if not cell_box(coords, part.grid, part.shape).is_empty():
                    jobs.append((part.index, pool.submit(shard, key, part, coords)))

    def finish() -> int:
        done: dict[int, list[ShardRecord]] = {p.index: [] for p in plan.parts}
        for index, fut in jobs:
            done[index].append(fut.result())
        for part in plan.parts:
            ar.parts[part.index] = PartRecord(
                part.offset, part.shape, part.grid, part.chunks, tuple(done[part.index])
            )
        return sum(r.nbytes for records in done.values() for r in records)

    return report, finish
