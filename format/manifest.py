"""The records of a committed checkpoint, and the strict parser of format v1 manifests.

A checkpoint exists exactly when ``manifest.json`` exists. In format v1 the manifest lists
every array, part and shard object with its writer, size and index checksum. In format v2
(``commit_record.py``) it is a small commit record: array records live in separately stored
tables and shard objects are derived from each part's grid, so nothing a reader fetches grows
with the number of ranks that wrote the checkpoint. Both parse into the same records below,
and readers never trust a storage key they did not derive from validated names and integers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ckptd.format.boxes import ShardBox, check_tiling, grid_cells
from ckptd.format.codecs import CodecSpec
from ckptd.format.dtypes import LogicalDType, logical_dtype
from ckptd.format.errors import LayoutError, MetadataError, UnsupportedFormatError
from ckptd.format.layout import TensorLayout
from ckptd.format.names import check_array_path, check_segment
from ckptd.format.strict_json import (
    dumps_sealed,
    integer,
    loads_sealed,
    lst,
    obj,
    string,
)
from ckptd.format.strict_json import shape as shape_of

FORMAT_NAME = "ckptd"
FORMAT_VERSION = 2
"""The version ckptd writes; it reads every version up to this one."""
MANIFEST_KEY = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20
ArrayKind = Literal["regular", "pieces", "scalar"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShardRecord:
    coords: tuple[int, ...]
    writer: int
    nbytes: int
    index_crc32c: int

    def to_json(self) -> list[Any]:
        return [list(self.coords), self.writer, self.nbytes, self.index_crc32c]


@dataclass(frozen=True, slots=True)
class PartRecord:
    """One stored Zarr array: the whole canonical array, or one piece of an irregular one.

    ``listed`` (format v1): ``shards`` names every shard object with its size and index
    checksum. Format v2 lists none (``shards`` is empty): every cell of the grid is a shard.
    """

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    grid: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[ShardRecord, ...]
    listed: bool = True

    @property
    def ncells(self) -> int:
        if not self.shape:
            return 1
        return math.prod(-(-s // g) for s, g in zip(self.shape, self.grid, strict=True))

    def cells(self) -> Iterator[tuple[int, ...]]:
        """Coordinates of every shard object of this part (scalar: the single ``()``)."""
        if not self.shape:
            return iter([()])
        return grid_cells(self.shape, self.grid)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "offset": list(self.offset),
            "shape": list(self.shape),
            "grid": list(self.grid),
            "chunks": list(self.chunks),
        }
        if self.listed:
            doc["shards"] = [s.to_json() for s in self.shards]
        return doc


@dataclass(frozen=True, slots=True)
class ArrayRecord:
    path: str
    dtype: LogicalDType
    shape: tuple[int, ...]
    kind: ArrayKind
    codec: CodecSpec
    layout: TensorLayout | None
    parts: tuple[PartRecord, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int | None:
        """Bytes of its shard objects; None in format v2 (only the checkpoint's total is recorded)."""
        if any(not p.listed for p in self.parts):
            return None
        return sum(s.nbytes for p in self.parts for s in p.shards)

    @property
    def shard_count(self) -> int:
        return sum(p.ncells if not p.listed else len(p.shards) for p in self.parts)

    def part_key(self, index: int) -> str:
        """Storage key (relative to the data group) of part ``index``'s Zarr array."""
        return self.path if self.kind != "pieces" else f"{self.path}/piece-{index:05d}"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "dtype": self.dtype.name,
            "storage_dtype": self.dtype.storage,
            "shape": list(self.shape),
            "kind": self.kind,
            "codec": self.codec.to_json(),
            "layout": None if self.layout is None else self.layout.to_json(),
            "nbytes": self.nbytes,
        }
        stored = self.stored_bytes
        if stored is not None:
            doc["stored_bytes"] = stored
        doc["parts"] = [p.to_json() for p in self.parts]
        return doc

    def unlisted(self) -> ArrayRecord:
        """The same array as format v2 records it: shards derived from the grid."""
        if not any(p.listed for p in self.parts):
            return self
        parts = tuple(PartRecord(p.offset, p.shape, p.grid, p.chunks, (), listed=False) for p in self.parts)
        return ArrayRecord(self.path, self.dtype, self.shape, self.kind, self.codec, self.layout, parts)


@dataclass(frozen=True, slots=True)
class Totals:
    """What format v2 records about all arrays and shard objects together."""

    arrays: int
    shards: int
    nbytes: int
    stored_bytes: int
    writers: int

    def to_json(self) -> dict[str, int]:
        return {"arrays": self.arrays, "shards": self.shards, "nbytes": self.nbytes,
                "stored_bytes": self.stored_bytes, "writers": self.writers}


@dataclass(frozen=True, slots=True)
class Manifest:
    """A committed checkpoint as readers see it, whatever its format version.

    ``arrays`` may be lazy (format v2 loads a table page on first access to one of its
    arrays); iterating it loads everything, which only whole-checkpoint tools do.
    """

    step: int
    checkpoint_id: str
    created_at: str
    world_size: int
    arrays: Mapping[str, ArrayRecord]
    state: dict[str, Any]
    mesh: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    attempt: str = ""
    """Format v2: the attempt directory (beside ``manifest.json``) holding this checkpoint's data."""
    totals: Totals | None = None
    rank_state: bool = False
    """Format v2: per-rank state objects exist (``ranks/r-NNNNNNN.json`` of the attempt's metadata)."""

    @property
    def nbytes(self) -> int:
        if self.totals is not None:
            return self.totals.nbytes
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def array_count(self) -> int:
        return self.totals.arrays if self.totals is not None else len(self.arrays)

    @property
    def stored_bytes(self) -> int:
        if self.totals is not None:
            return self.totals.stored_bytes
        return sum(a.stored_bytes or 0 for a in self.arrays.values())

    @property
    def writers(self) -> list[int]:
        """Ranks that wrote shards (format v1); format v2 records only their number (``totals``)."""
        return sorted({s.writer for a in self.arrays.values() for p in a.parts for s in p.shards})

    @property
    def writer_count(self) -> int:
        return self.totals.writers if self.totals is not None else len(self.writers)

    def to_json(self) -> dict[str, Any]:
        """Everything as one JSON document, in the shape of a format v1 manifest (what v1 writes; for a
        v2 checkpoint a full view — its commit record is written by ``commit_record``)."""
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "checkpoint_id": self.checkpoint_id,
            "created_at": self.created_at,
            "world_size": self.world_size,
            "writers": self.writers,
            "mesh": dict(self.mesh),
            "nbytes": self.nbytes,
            "stored_bytes": self.stored_bytes,
            "arrays": {p: a.to_json() for p, a in sorted(self.arrays.items())},
            "state": self.state,
            "metadata": dict(self.metadata),
        }
        if self.totals is not None:
            doc["attempt"] = self.attempt
            doc["totals"] = self.totals.to_json()
            doc["writers"] = self.totals.writers
        return doc

    def dumps(self) -> bytes:
        """The format v1 manifest, sealed (used to write v1 checkpoints for compatibility tests)."""
        return dumps_sealed(self.to_json())


# ---------------------------------------------------------------- parsing (never trusts input)


def loads_document(raw: bytes, where: str = MANIFEST_KEY) -> tuple[int, dict[str, Any]]:
    """Size limit, seal, syntax and version of a ``manifest.json``: ``(format_version, document)``."""
    doc = loads_sealed(raw, where, limit=MAX_MANIFEST_BYTES)
    if doc.get("format") != FORMAT_NAME:
        raise MetadataError(f"{where}: not a ckptd manifest (format={doc.get('format')!r})")
    version = integer(doc.get("format_version"), f"{where}: format_version", lo=1)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: checkpoint format version {version} is newer than this ckptd supports "
            f"({FORMAT_VERSION}); upgrade ckptd"
        )
    return version, doc


def loads(raw: bytes, where: str = MANIFEST_KEY) -> Manifest:
    """Parse a format v1 manifest (format v2 commit records need their tables: ``Run.manifest``)."""
    version, doc = loads_document(raw, where)
    if version != 1:
        raise MetadataError(f"{where}: format v{version} commit records are read through Run.manifest()")
    return with_context(where, lambda: parse(doc))


def with_context(where: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except MetadataError as e:
        raise type(e)(f"{where}: {e}") from e  # keep the leaf (UnsafeNameError) for callers who catch it
    except RecursionError as e:
        raise MetadataError(f"{where}: nested too deeply") from e


def parse(doc: Any) -> Manifest:
    """A format v1 manifest document (already sealed-checked) as records."""
    d = obj(doc, "manifest")
    version = integer(d.get("format_version"), "format_version", lo=1, hi=1)
    arrays_doc = obj(d.get("arrays"), "arrays")
    arrays = {check_array_path(p): parse_array(p, a, listed=True) for p, a in arrays_doc.items()}
    for a in arrays.values():
        check_listed_complete(a)
    for w in lst(d.get("writers", []), "writers"):
        integer(w, "writers", lo=0)
    for k in ("nbytes", "stored_bytes"):
        if k in d:
            integer(d[k], k, lo=0)
    return Manifest(
        step=integer(d.get("step"), "step", lo=0),
        checkpoint_id=string(d.get("checkpoint_id"), "checkpoint_id"),
        created_at=string(d.get("created_at"), "created_at"),
        world_size=integer(d.get("world_size"), "world_size", lo=1),
        arrays=arrays,
        state=obj(d.get("state"), "state"),
        mesh=parse_mesh(d.get("mesh", {})),
        metadata=obj(d.get("metadata", {}), "metadata"),
        format_version=version,
    )


def parse_mesh(doc: Any) -> dict[str, int]:
    return {check_segment(k): integer(v, f"mesh.{k}", lo=1) for k, v in obj(doc, "mesh").items()}


def check_listed_complete(a: ArrayRecord) -> None:
    """A v1 array lists every shard it has: without it a reader would return unwritten memory."""
    if a.kind == "pieces":
        if any(len(p.shards) != 1 for p in a.parts):
            raise MetadataError(f"array {a.path}: every piece has exactly one shard")
        return
    (part,) = a.parts
    # coordinates are unique and inside the grid (see parse_part), so the count decides
    if a.kind != "scalar" and 0 in a.shape:
        return
    if len(part.shards) != part.ncells:
        raise MetadataError(
            f"array {a.path}: the manifest lists {len(part.shards)} of its {part.ncells} shards"
        )


def parse_array(path: str, doc: Any, *, listed: bool, whole: bool = True) -> ArrayRecord:
    a = obj(doc, f"array {path}")
    dtype = logical_dtype(string(a.get("dtype"), f"{path}.dtype"))
    if string(a.get("storage_dtype", dtype.storage), f"{path}.storage_dtype") != dtype.storage:
        raise MetadataError(
            f"array {path}: storage dtype {a.get('storage_dtype')!r} does not store {dtype.name}"
        )
    shape = shape_of(a.get("shape"), f"{path}.shape")
    kind = a.get("kind")
    if kind not in ("regular", "pieces", "scalar"):
        raise MetadataError(f"array {path}: unknown kind {kind!r}")
    if (kind == "scalar") != (len(shape) == 0):
        raise MetadataError(f"array {path}: kind {kind!r} does not fit shape {list(shape)}")
    for k in ("nbytes", "stored_bytes"):
        if k in a:
            integer(a[k], f"{path}.{k}", lo=0)
    if "nbytes" in a and a["nbytes"] != math.prod(shape) * dtype.itemsize:
        raise MetadataError(f"array {path}: nbytes {a['nbytes']} does not match its shape and dtype")
    layout_doc = a.get("layout")
    parts = tuple(parse_part(path, shape, p, listed=listed) for p in lst(a.get("parts"), f"{path}.parts"))
    if kind != "pieces" and len(parts) != 1:
        raise MetadataError(f"array {path}: a {kind} array has exactly one part, got {len(parts)}")
    if kind == "pieces" and len(parts) > 2**20:
        raise MetadataError(f"array {path}: more than 2**20 pieces")
    for i, p in enumerate(parts):
        if kind != "pieces" and (any(p.offset) or p.shape != shape):
            raise MetadataError(
                f"array {path}: a {kind} array's only part covers the whole array: part {i} is "
                f"{list(p.shape)} at {list(p.offset)}, the array {list(shape)}"
            )
        if any(o + s > dim for o, s, dim in zip(p.offset, p.shape, shape, strict=True)):
            raise MetadataError(
                f"array {path}: part {i} ({list(p.shape)} at {list(p.offset)}) lies outside "
                f"shape {list(shape)}"
            )
    if kind == "pieces" and whole:  # a writer's report holds only its own pieces
        try:
            check_tiling(shape, [ShardBox(p.offset, p.shape) for p in parts])
        except LayoutError as e:
            raise MetadataError(f"array {path}: its pieces do not tile it: {e}") from e
    return ArrayRecord(
        path=path,
        dtype=dtype,
        shape=shape,
        kind=kind,
        codec=CodecSpec.from_json(a.get("codec")),
        layout=None if layout_doc is None else TensorLayout.from_json(layout_doc),
        parts=parts,
    )


def parse_part(path: str, array_shape: tuple[int, ...], doc: Any, *, listed: bool) -> PartRecord:
    p = obj(doc, f"{path} part")
    offset = shape_of(p.get("offset"), f"{path}.offset")
    pshape = shape_of(p.get("shape"), f"{path}.part.shape")
    grid = shape_of(p.get("grid"), f"{path}.grid", lo=1)
    chunks = shape_of(p.get("chunks"), f"{path}.chunks", lo=1)
    if not (len(offset) == len(pshape) == len(grid) == len(chunks) == len(array_shape)):
        raise MetadataError(
            f"array {path}: offset/shape/grid/chunks disagree in rank with shape {list(array_shape)}"
        )
    if any(g % c for g, c in zip(grid, chunks, strict=True)):
        raise MetadataError(f"array {path}: inner chunks {list(chunks)} do not divide shards {list(grid)}")
    if math.prod(g // c for g, c in zip(grid, chunks, strict=True)) > 2**24:
        raise MetadataError(f"array {path}: more than 2**24 inner chunks per shard")
    ncells = tuple(-(-s // g) for s, g in zip(pshape, grid, strict=True))
    if math.prod(ncells) > 2**24:
        raise MetadataError(f"array {path}: more than 2**24 shards")
    if not listed:
        if "shards" in p:
            raise MetadataError(f"array {path}: format v2 derives shards from the grid; none are listed")
        return PartRecord(offset, pshape, grid, chunks, (), listed=False)
    shards: list[ShardRecord] = []
    seen: set[tuple[int, ...]] = set()
    for s in lst(p.get("shards"), f"{path}.shards"):
        rec = lst(s, f"{path} shard")
        if len(rec) != 4:
            raise MetadataError(f"array {path}: shard record {rec!r} must have 4 fields")
        coords = tuple(integer(c, f"{path} shard coordinate", lo=0) for c in lst(rec[0], f"{path} coords"))
        if len(coords) != len(array_shape) or any(c >= n for c, n in zip(coords, ncells, strict=True)):
            raise MetadataError(
                f"array {path}: shard coordinates {list(coords)} outside the grid {list(ncells)}"
            )
        if coords in seen:
            raise MetadataError(f"array {path}: shard {list(coords)} listed twice")
        seen.add(coords)
        shards.append(
            ShardRecord(
                coords,
                integer(rec[1], "writer", lo=0),
                integer(rec[2], "nbytes", lo=0),
                integer(rec[3], "index_crc32c", lo=0, hi=2**32 - 1),
            )
        )
    return PartRecord(offset, pshape, grid, chunks, tuple(shards))
