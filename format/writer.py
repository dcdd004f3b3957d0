"""Writing one rank's boxes of a checkpoint.

Many writers (ranks, processes, machines) write boxes of the same arrays at once with
no coordination: each shard object has exactly one writer, because the storage plan
(``plan.py``) makes every writer box a union of whole shards. A writer ends with a
``WriterReport`` — plain JSON — that the committer merges into the manifest.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping
from ckptd.format.codecs import CodecSpec, crc32c
from ckptd.format.dtypes import LogicalDType, of_tensor, tensor_to_numpy
from ckptd.format.errors import CheckpointError, LayoutError, StorageError
from ckptd.format.layout import Mesh, TensorLayout
from ckptd.format.manifest import ArrayKind, ArrayRecord, PartRecord, ShardRecord
from ckptd.format.names import check_array_path
from ckptd.format.plan import DEFAULT_CHUNK_BYTES, ArrayPlan, PartPlan, cached_plan
from ckptd.format.shard import ShardGeometry, encode_shard
from ckptd.format.store import Store
from ckptd.format.tally import Tally, shard_fingerprint

if TYPE_CHECKING:  # annotations only: verifying and listing runs import this module without torch
    import torch


def shard_key(array_key: str, coords: Sequence[int]) -> str:
    """Storage key of a shard: Zarr v3 ``default`` chunk key encoding with separator ``.``.

    ``.`` rather than ``/`` keeps every shard of an array in the array's own directory:
    two fewer directories per array to create and fsync on local disks.
    """
    return f"{array_key}/" + ".".join(["c", *(str(c) for c in coords)])


@dataclass(slots=True)
class ArrayReport:
    """What one writer wrote of one array (merged across writers by the committer)."""

    dtype: LogicalDType
    shape: tuple[int, ...]
    kind: ArrayKind
    codec: CodecSpec
    layout: TensorLayout | None
    parts: dict[int, PartRecord] = field(default_factory=dict)
    plan: ArrayPlan | None = None
    """The whole array's storage plan (every writer computes the same one)."""
    lead: bool = False
    """This writer owns the array's first box: it describes the array to the committer (format v2
    gathers one description per array, not one per writer)."""

    def record(self, path: str) -> ArrayRecord:
        """The array as planned, shards derived from the grid (format v2)."""
        assert self.plan is not None
        parts = tuple(
            PartRecord(p.offset, p.shape, p.grid, p.chunks, (), listed=False) for p in self.plan.parts
        )
        return ArrayRecord(path, self.dtype, self.shape, self.kind, self.codec, self.layout, parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "kind": self.kind,
            "codec": self.codec.to_json(),
            "layout": None if self.layout is None else self.layout.to_json(),
            "parts": {str(i): p.to_json() for i, p in self.parts.items()},
        }


@dataclass(slots=True)
class WriterReport:
    rank: int
    arrays: dict[str, ArrayReport] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    """Count, fingerprint and bytes of the shards written (see ``tally.py``)."""
    rank_state: bool = False
    """This writer also wrote its own rank-state chunk (format v2: a row of the rank-state array)."""
    documented: set[str] = field(default_factory=set)
    """Arrays whose ``zarr.json`` this writer wrote (the lead writer of each array does, so the
    committer's work does not grow with the number of arrays times their metadata)."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for a in self.arrays.values() for p in a.parts.values() for s in p.shards)

    def lead_records(self) -> dict[str, ArrayRecord]:
        """The arrays this writer describes to the committer (it owns their first box)."""
        return {p: a.record(p) for p, a in self.arrays.items() if a.lead and a.plan is not None}


class CheckpointWriter:
    """Writes boxes of arrays into one checkpoint directory of a store, on a thread pool.

    ``add`` schedules the work and returns at once; the tensor's memory must not change
    until ``finish`` returns (the engine guarantees that with host snapshots). Encoding
    (crc32c, compression) and file I/O release the GIL, so threads overlap.
    """

    def __init__(
        self,
        store: Store,
        *,
        rank: int = 0,
        codec: CodecSpec | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        threads: int = 8,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.store = store
        self.rank = rank
        self.codec = codec or CodecSpec()
        self.chunk_bytes = chunk_bytes
        self._own_pool = executor is None
        self._pool = executor or ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptd-write")
        self._futures: list[Future[Any]] = []
        self._lock = threading.Lock()
        self._report = WriterReport(rank)

    def add(
        self,
        path: str,
        tensor: torch.Tensor,
        *,
        shape: Sequence[int] | None = None,
        box: ShardBox | None = None,
        layout: TensorLayout | None = None,
        mesh: Mesh | None = None,
        boxes: Sequence[ShardBox] | None = None,
    ) -> None:
        """Schedule writing ``tensor`` as box ``box`` of the array ``path`` of global ``shape``.

        The set of all writer boxes comes from ``boxes``, or from ``layout`` and ``mesh``;
        without either, this writer is the only one and ``tensor`` is the whole array.
        """
        check_array_path(path)
        dtype = of_tensor(tensor)
        gshape = tuple(int(s) for s in (shape if shape is not None else tensor.shape))
        box = box or ShardBox.whole(gshape)
        if tuple(tensor.shape) != box.shape:
            raise LayoutError(
                f"{path}: tensor of shape {tuple(tensor.shape)} does not fill its box {box.to_json()}"
            )
        if not box.fits_in(gshape):
            raise LayoutError(f"{path}: box {box.to_json()} lies outside the global shape {gshape}")
        plan = cached_plan(
            gshape, dtype.itemsize, box, self.chunk_bytes, boxes=boxes, layout=layout, mesh=mesh
        )
        codec = CodecSpec() if plan.kind == "scalar" else self.codec
        lead = not any(box.offset) and (not box.is_empty() or math.prod(gshape) == 0)
        stores_nothing = box.is_empty() and plan.kind == "pieces"  # a short trailing ZeRO shard
        with self._lock:
            rep = self._report.arrays.get(path)
            if rep is None:
                rep = self._report.arrays[path] = ArrayReport(dtype, gshape, plan.kind, codec, layout,
                                                              plan=plan, lead=lead)
            elif rep.dtype != dtype or rep.shape != gshape:
                raise LayoutError(f"{path}: written twice with different dtype or shape")
            rep.lead = rep.lead or lead
            document = rep.lead and path not in self._report.documented
            if document:
                self._report.documented.add(path)
            if not stores_nothing:
                part = plan.part_for(box)
                rep.parts.setdefault(part.index,
                                     PartRecord(part.offset, part.shape, part.grid, part.chunks, ()))
        if document:
            self._document(path, rep)
        if stores_nothing:
            return
        data = tensor_to_numpy(tensor)
        array_key = path if plan.kind != "pieces" else f"{path}/piece-{part.index:05d}"
        for coords in self._shards_of(plan, part, box):
            self._futures.append(
                self._pool.submit(self._write_shard, path, array_key, part, coords, box, data, codec)
            )

    @staticmethod
    def _shards_of(plan: ArrayPlan, part: PartPlan, box: ShardBox) -> list[tuple[int, ...]]:
        if plan.kind == "scalar":
            return [()]
        if plan.kind == "pieces" or box.is_empty():
            return [(0,) * len(part.shape)] if plan.kind == "pieces" else []
        return list(cells_overlapping(box, part.grid))

    def _write_shard(
        self,
        path: str,
        array_key: str,
        part: PartPlan,
        coords: tuple[int, ...],
        box: ShardBox,
        data: np.ndarray,
        codec: CodecSpec,
    ) -> None:
        if not coords and not part.shape:  # 0-d: one plain chunk "c", no sharding
            raw = data.reshape(-1).view(np.uint8).tobytes()
            buffers: list[Any] = [raw, struct.pack("<I", crc32c(raw))]
            key = f"{array_key}/c"
            nbytes, index_crc = len(raw) + 4, 0
        else:
            local_box = ShardBox(
                tuple(o - po for o, po in zip(box.offset, part.offset, strict=True)), box.shape
            )
            cell = cell_box(coords, part.grid, part.shape)
            if local_box.intersect(cell) != cell:
                raise LayoutError(f"{path}: shard {coords} is not wholly inside this writer's box")
            sub = data[cell.relative_to(local_box)]
            geom = ShardGeometry(cell.offset, part.grid, part.chunks, part.shape)
            enc = encode_shard(sub, geom, codec)
            buffers, nbytes, index_crc = enc.buffers, enc.nbytes, enc.index_crc32c
            key = shard_key(array_key, coords)
        try:
            self.store.write(key, buffers)
        except CheckpointError:
            raise
        except OSError as e:
            raise StorageError(f"writing {key} to {self.store.url} failed: {e}") from e
        record = ShardRecord(coords, self.rank, nbytes, index_crc)
        cell_nbytes = (math.prod(cell_box(coords, part.grid, part.shape).shape) if part.shape else 1) * (
            data.dtype.itemsize)
        with self._lock:
            self._report.tally += Tally(1, shard_fingerprint(path, part.index, coords), cell_nbytes, nbytes)
            rep = self._report.arrays[path]
            old = rep.parts[part.index]
            rep.parts[part.index] = PartRecord(
                old.offset, old.shape, old.grid, old.chunks, (*old.shards, record)
            )

    def finish(self) -> WriterReport:
        """Wait for every scheduled shard, make them durable, and return the report.

        The first failure is raised (as a :class:`CheckpointError`) after all work has stopped.
        """
        error: BaseException | None = None
        for f in self._futures:
            try:
                f.result()
            except BaseException as e:  # keep draining so no thread writes after we return
                error = error or e
        self._futures.clear()
        if self._own_pool:
            self._pool.shutdown(wait=True)
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise StorageError(f"writing checkpoint shards failed: {error}", url=self.store.url) from error
        try:
            self.store.flush()
        except OSError as e:
            raise StorageError(f"making shards durable in {self.store.url} failed: {e}") from e
        return self._report


    def _document(self, path: str, rep: ArrayReport) -> None:
        """Schedule the ``zarr.json`` of an array whose first box this writer owns (format v2: every
        array's metadata is written by exactly one writer, in parallel with the others).

        Scheduled when the array is added, beside its shards: written after the last shard they
        were hundreds of small serial writes on the critical path of every save (0.07 s of a
        1.3 s W1 save on our 2-core box)."""
        from ckptd.format.zarr_meta import ZARR_JSON, array_document

        rec = rep.record(path)
        for i, part in enumerate(rec.parts):
            doc = array_document(rec, part, i)
            self._futures.append(self._pool.submit(self.store.write, f"{rec.part_key(i)}/{ZARR_JSON}", [doc]))


def write_state(
    writer: CheckpointWriter,
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Schedule whole tensors (single-writer arrays)."""
    for path, t in tensors.items():
        writer.add(path, t)


def report_to_json(report: WriterReport) -> dict[str, Any]:
    """A writer report as JSON, to send to the committer (TCPStore, gloo) without pickling."""
    return {"rank": report.rank, "arrays": {p: a.to_json() for p, a in report.arrays.items()},
            "tally": report.tally.counters(), "documented": sorted(report.documented),
            "rank_state": report.rank_state}


def report_from_json(doc: Any) -> WriterReport:
    """Parse a report produced by ``report_to_json``; validated like a manifest."""
    from ckptd.format.dtypes import logical_dtype
    from ckptd.format.errors import MetadataError
    from ckptd.format.manifest_parse import parse_array  # the same strict validation as manifests

    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("arrays"), dict)
        or not isinstance(doc.get("rank"), int)
    ):
        raise MetadataError("malformed writer report")
    rep = WriterReport(int(doc["rank"]))
    for path, a in doc["arrays"].items():
        if not isinstance(a, dict) or not isinstance(a.get("parts"), dict):
            raise MetadataError(f"malformed writer report for {path!r}")
        parts_doc = a["parts"]
        rec = parse_array(
            check_array_path(path),
            {**a, "parts": list(parts_doc.values())}
            if a.get("kind") == "pieces"
            else {**a, "parts": list(parts_doc.values()) or [_empty_part(a)]},
            listed=True,
            whole=False,
        )
        ar = ArrayReport(logical_dtype(a["dtype"]), rec.shape, rec.kind, rec.codec, rec.layout)
        for key, part in zip(parts_doc.keys(), rec.parts, strict=False):
            ar.parts[int(key)] = part
        rep.arrays[path] = ar
    tally = doc.get("tally")
    if isinstance(tally, dict):
        keys = ("shards", "fp_lo", "fp_hi", "nbytes", "stored_bytes")
        if not all(isinstance(tally.get(k), int) and tally[k] >= 0 for k in keys):
            raise MetadataError("malformed writer report tally")
        rep.tally = Tally.from_counters({k: tally[k] for k in keys})
    documented = doc.get("documented", [])
    if isinstance(documented, list):
        rep.documented = {check_array_path(p) for p in documented if isinstance(p, str) and p in rep.arrays}
    rep.rank_state = doc.get("rank_state") is True
    return rep


def _empty_part(a: dict[str, Any]) -> dict[str, Any]:
    shape = a.get("shape", [])
    n = len(shape) if isinstance(shape, list) else 0
    return {"offset": [0] * n, "shape": shape, "grid": [1] * n, "chunks": [1] * n, "shards": []}
