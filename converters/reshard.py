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
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptd.converters.model_facts import LayoutRule, mesh_refusal
from ckptd.converters.outputs import attempt_discarded_on_failure
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
from ckptd.format.store import Store
from ckptd.format.tally import Tally, shard_fingerprint
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
    refuse: LayoutRule | None = None,
    force: bool = False,
) -> ReshardResult:
    """Rewrite checkpoint ``step`` (default: latest) of ``src`` into ``dst`` for the layout ``mesh``.

    With ``refuse`` (the trainer's layout rule, e.g. ``ckptd.training.config.refuse_layout``), a
    mesh it refuses for the model the checkpoint records (``model_facts``) is a ``LayoutError``
    unless ``force``. A failed conversion (disk full, a damaged source) deletes
    what it wrote: no partial attempt is left in ``dst``."""
    if step is None:
        step = src.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {src.url}")
    for axis, size in mesh.items():
        if not isinstance(size, int) or size < 1:
            raise LayoutError(f"mesh axis {axis}={size!r} must be a positive integer")
    reader = src.reader(step)
    refusal = mesh_refusal(reader.manifest, mesh, refuse) if refuse is not None else None
    if refusal is not None and not force:
        raise LayoutError(f"{refusal} (--force converts anyway)")
    out_step = step if dst_step is None else dst_step
    out_store = dst.prepare(out_step, overwrite=overwrite)
    with attempt_discarded_on_failure(dst, out_step):
        reports, bytes_written = write_arrays(reader, out_store, mesh, codec, chunk_bytes, progress, threads)
        meta: dict[str, Any] = dict(reader.manifest.metadata)
        meta["converted_from"] = {
            "uri": src.url,
            "step": step,
            "mesh": dict(reader.manifest.mesh),
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        manifest = dst.commit(out_step, reports, state=reader.manifest.state,
                              world_size=math.prod(mesh.values()), mesh=dict(mesh), metadata=meta)
    # format v2 keeps only totals: what was read is the source's stored size
    return ReshardResult(manifest=manifest, bytes_read=reader.manifest.stored_bytes,
                         bytes_written=bytes_written)


def write_arrays(
    reader: CheckpointReader,
    out_store: Store,
    mesh: Mapping[str, int],
    codec: CodecSpec | None,
    chunk_bytes: int,
    progress: Callable[[int], None] | None,
    threads: int,
) -> tuple[list[WriterReport], int]:
    """Every array's shards in the target layout; returns the writer reports and the bytes written."""
    reports: list[WriterReport] = []
    bytes_written = 0
    # Shards stream concurrently; memory stays bounded by ``threads`` chunks in flight (plus
    # the source chunks each read touches), whatever the model size.
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptd-reshard") as pool:
        pending = []
        for a in reader.manifest.arrays.values():
            conv = _ArrayConverter(reader, a, out_store, codec or a.codec, progress)
            reports.append(conv.schedule(mesh, chunk_bytes, pool))
            pending.append(conv)
        try:
            for conv in pending:
                bytes_written += conv.finish()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return reports, bytes_written


class _ArrayConverter:
    """One array: planned in the target layout, its shards streamed on a pool, its report filled as
    they finish."""

    def __init__(
        self,
        reader: CheckpointReader,
        a: ArrayRecord,
        out_store: Store,
        codec: CodecSpec,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.reader, self.a, self.out_store, self.codec, self.progress = reader, a, out_store, codec, progress
        self.jobs: list[tuple[int, Future[ShardRecord]]] = []

    def schedule(self, mesh: Mapping[str, int], chunk_bytes: int, pool: ThreadPoolExecutor) -> WriterReport:
        """Plan the array and submit its shards; returns the report (parts filled by ``finish``)."""
        a = self.a
        layout = target_layout(a.layout, mesh)
        boxes = [ShardBox.whole(a.shape)]
        if layout is not None and a.shape:
            boxes = layout.all_boxes(a.shape, mesh)
        self.plan = plan_array(a.shape, a.dtype.itemsize, boxes, chunk_bytes)
        if self.plan.kind == "scalar":
            self.codec = CodecSpec()
        report = self.writer_report = WriterReport(rank=0)
        self.report = ArrayReport(a.dtype, a.shape, self.plan.kind, self.codec, layout)
        report.arrays[a.path] = self.report
        for part in self.plan.parts:
            key = self.key(part)
            if self.plan.kind == "scalar":
                self.jobs.append((part.index, pool.submit(self._scalar, key)))
            elif 0 not in part.shape:
                for coords in cells_overlapping(ShardBox.whole(part.shape), part.grid):
                    if not cell_box(coords, part.grid, part.shape).is_empty():
                        self.jobs.append((part.index, pool.submit(self._shard, key, part, coords)))
        return report

    def key(self, part: PartPlan) -> str:
        return self.a.path if self.plan.kind != "pieces" else f"{self.a.path}/piece-{part.index:05d}"

    def _read(self, box: ShardBox) -> np.ndarray:
        return tensor_to_numpy(self.reader.read(self.a.path, box))

    def _scalar(self, key: str) -> ShardRecord:
        raw = self._read(ShardBox((), ())).reshape(-1).view(np.uint8).tobytes()
        stream = self.out_store.open_write(f"{key}/c")
        try:
            stream.write(raw)
            stream.write(crc32c(raw).to_bytes(4, "little"))
            stream.close()
        except BaseException:
            stream.abort()
            raise
        return ShardRecord((), 0, len(raw) + 4, 0)

    def _shard(self, key: str, part: PartPlan, coords: tuple[int, ...]) -> ShardRecord:
        cell = cell_box(coords, part.grid, part.shape)
        geom = ShardGeometry(cell.offset, part.grid, part.chunks, part.shape)

        def read_part(b: ShardBox) -> np.ndarray:
            return self._read(ShardBox(tuple(o + po for o, po in zip(b.offset, part.offset, strict=True)),
                                       b.shape))

        stream = self.out_store.open_write(shard_key(key, coords))
        try:
            nbytes, crc = stream_shard(stream, geom, self.codec, self.a.dtype.itemsize, read_part)
            stream.close()
        except BaseException:
            stream.abort()
            raise
        if self.progress is not None:
            self.progress(cell.numel * self.a.dtype.itemsize)
        return ShardRecord(coords, 0, nbytes, crc)

    def finish(self) -> int:
        """Wait for this array's shards; fills the report's parts and tally (the manifest's totals)
        and returns the bytes written."""
        done: dict[int, list[ShardRecord]] = {p.index: [] for p in self.plan.parts}
        itemsize = self.a.dtype.itemsize
        for index, fut in self.jobs:
            record = fut.result()
            done[index].append(record)
            part = self.plan.parts[index]
            cells = math.prod(cell_box(record.coords, part.grid, part.shape).shape) if part.shape else 1
            self.writer_report.tally += Tally(1, shard_fingerprint(self.key(part), index, record.coords),
                                              cells * itemsize, record.nbytes)
        for part in self.plan.parts:
            self.report.parts[part.index] = PartRecord(
                part.offset, part.shape, part.grid, part.chunks, tuple(done[part.index])
            )
        return sum(r.nbytes for records in done.values() for r in records)
