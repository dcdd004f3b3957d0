"""The manifest: the commit record of a checkpoint, and its strict JSON validation.

A checkpoint exists exactly when ``manifest.json`` exists. The manifest lists every
array, every stored part of it and every shard object with its writer, size and
index checksum, so a reader never lists storage and never trusts a key it did not
derive from validated names and integer grid coordinates.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptd.format.boxes import ShardBox, check_tiling
from ckptd.format.codecs import CodecSpec, crc32c
from ckptd.format.dtypes import LogicalDType, logical_dtype
from ckptd.format.errors import IntegrityError, LayoutError, MetadataError, UnsupportedFormatError
from ckptd.format.layout import TensorLayout
from ckptd.format.names import check_array_path, check_segment

FORMAT_NAME = "ckptd"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest.json"
MAX_NDIM = 32
MAX_ELEMENTS = 2**52
MAX_MANIFEST_BYTES = 256 * 2**20

ArrayKind = Literal["regular", "pieces", "scalar"]


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
    """One stored Zarr array: the whole canonical array, or one piece of an irregular one."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    grid: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[ShardRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": list(self.offset),
            "shape": list(self.shape),
            "grid": list(self.grid),
            "chunks": list(self.chunks),
            "shards": [s.to_json() for s in self.shards],
        }


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
    def stored_bytes(self) -> int:
        return sum(s.nbytes for p in self.parts for s in p.shards)

    def part_key(self, index: int) -> str:
        """Storage key (relative to the checkpoint) of part ``index``'s Zarr array."""
        return self.path if self.kind != "pieces" else f"{self.path}/piece-{index:05d}"

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype.name,
            "storage_dtype": self.dtype.storage,
            "shape": list(self.shape),
            "kind": self.kind,
            "codec": self.codec.to_json(),
            "layout": None if self.layout is None else self.layout.to_json(),
            "nbytes": self.nbytes,
            "stored_bytes": self.stored_bytes,
            "parts": [p.to_json() for p in self.parts],
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    step: int
    checkpoint_id: str
    created_at: str
    world_size: int
    arrays: Mapping[str, ArrayRecord]
    state: dict[str, Any]
    mesh: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def stored_bytes(self) -> int:
        return sum(a.stored_bytes for a in self.arrays.values())

    @property
    def writers(self) -> list[int]:
        return sorted({s.writer for a in self.arrays.values() for p in a.parts for s in p.shards})

    def to_json(self) -> dict[str, Any]:
        return {
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

    def dumps(self) -> bytes:
        """The manifest as JSON, ending with its own checksum (see ``_CHECKSUM``)."""
        body = json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False).encode()
        return seal(body)


# The manifest's last member is ``"crc32c": N``, the CRC32C of the document with that member
# removed (``...}`` — i.e. the bytes before ``,"crc32c":`` followed by ``}``). JSON readers see a
# plain field; ckptd checks it before parsing, so a flipped byte anywhere — even inside a value
# such as a learning rate in the state — is an integrity error, not a silently different state.
_CHECKSUM = re.compile(rb',"crc32c":(\d{1,10})\}\s*$')


def seal(body: bytes) -> bytes:
    if not body.endswith(b"}"):
        raise MetadataError("a manifest body must be a JSON object")
    return body[:-1] + b',"crc32c":' + str(crc32c(body)).encode() + b"}"


def check_seal(raw: bytes, where: str) -> None:
    m = _CHECKSUM.search(raw)
    if m is None:
        return  # manifests written by other tools may omit it; ckptd always writes it
    body = raw[: m.start()] + b"}"
    if crc32c(body) != int(m.group(1)):
        raise IntegrityError(f"{where}: the manifest does not match its own crc32c (damaged or edited)")


# ---------------------------------------------------------------- parsing (never trusts input)


def loads(raw: bytes, where: str = "manifest.json") -> Manifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise MetadataError(f"{where} is {len(raw)} bytes, larger than the {MAX_MANIFEST_BYTES} limit")
    check_seal(raw, where)
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MetadataError(f"{where} is not valid JSON: {e}") from e
    try:
        return parse(doc)
    except MetadataError as e:
        raise type(e)(f"{where}: {e}") from e  # keep the leaf (UnsafeNameError) for callers who catch it
    except RecursionError as e:
        raise MetadataError(f"{where}: nested too deeply") from e


def _reject_constant(name: str) -> Any:
    raise MetadataError(f"non-standard JSON constant {name}")


def parse(doc: Any) -> Manifest:
    d = _obj(doc, "manifest")
    if d.get("format") != FORMAT_NAME:
        raise MetadataError(f"not a ckptd manifest (format={d.get('format')!r})")
    version = _int(d.get("format_version"), "format_version", lo=1)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"checkpoint format version {version} is newer than this ckptd supports "
            f"({FORMAT_VERSION}); upgrade ckptd"
        )
    arrays_doc = _obj(d.get("arrays"), "arrays")
    arrays = {check_array_path(p): _array(p, a) for p, a in arrays_doc.items()}
    for a in arrays.values():
        _check_complete(a)
    mesh_doc = _obj(d.get("mesh", {}), "mesh")
    mesh = {check_segment(k): _int(v, f"mesh.{k}", lo=1) for k, v in mesh_doc.items()}
    state = _obj(d.get("state"), "state")
    return Manifest(
        step=_int(d.get("step"), "step", lo=0),
        checkpoint_id=_str(d.get("checkpoint_id"), "checkpoint_id"),
        created_at=_str(d.get("created_at"), "created_at"),
        world_size=_int(d.get("world_size"), "world_size", lo=1),
        arrays=arrays,
        state=state,
        mesh=mesh,
        metadata=_obj(d.get("metadata", {}), "metadata"),
        format_version=version,
    )


def _check_complete(a: ArrayRecord) -> None:
    """A committed array lists every shard it has: readers and ``verify`` rely on it, and
    without it a reader would return unwritten memory for the gap."""
    if a.kind == "pieces":
        if any(len(p.shards) != 1 for p in a.parts):
            raise MetadataError(f"array {a.path}: every piece has exactly one shard")
        try:
            check_tiling(a.shape, [ShardBox(p.offset, p.shape) for p in a.parts])
        except LayoutError as e:
            raise MetadataError(f"array {a.path}: its pieces do not tile it: {e}") from e
        return
    (part,) = a.parts
    # coordinates are unique and inside the grid (see _part), so the count decides
    ncells = math.prod(-(-s // g) for s, g in zip(part.shape, part.grid, strict=True))
    if len(part.shards) != ncells:
        raise MetadataError(f"array {a.path}: the manifest lists {len(part.shards)} of its {ncells} shards")


def _array(path: str, doc: Any) -> ArrayRecord:
    a = _obj(doc, f"array {path}")
    dtype = logical_dtype(_str(a.get("dtype"), f"{path}.dtype"))
    if a.get("storage_dtype", dtype.storage) != dtype.storage:
        raise MetadataError(
            f"array {path}: storage dtype {a.get('storage_dtype')!r} does not store {dtype.name}"
        )
    shape = _shape(a.get("shape"), f"{path}.shape")
    kind = a.get("kind")
    if kind not in ("regular", "pieces", "scalar"):
        raise MetadataError(f"array {path}: unknown kind {kind!r}")
    if (kind == "scalar") != (len(shape) == 0):
        raise MetadataError(f"array {path}: kind {kind!r} does not fit shape {list(shape)}")
    layout_doc = a.get("layout")
    parts = tuple(_part(path, shape, p) for p in _list(a.get("parts"), f"{path}.parts"))
    if kind != "pieces" and len(parts) != 1:
        raise MetadataError(f"array {path}: a {kind} array has exactly one part, got {len(parts)}")
    for p in parts:
        if kind != "pieces" and (any(p.offset) or p.shape != shape):
            raise MetadataError(
                f"array {path}: part shape {list(p.shape)} disagrees with array shape {list(shape)}"
            )
        if any(o + s > dim for o, s, dim in zip(p.offset, p.shape, shape, strict=True)):
            raise MetadataError(f"array {path}: part at {list(p.offset)} lies outside shape {list(shape)}")
    return ArrayRecord(
        path=path,
        dtype=dtype,
        shape=shape,
        kind=kind,
        codec=CodecSpec.from_json(a.get("codec")),
        layout=None if layout_doc is None else TensorLayout.from_json(layout_doc),
        parts=parts,
    )


def _part(path: str, shape: tuple[int, ...], doc: Any) -> PartRecord:
    p = _obj(doc, f"{path} part")
    offset = _shape(p.get("offset"), f"{path}.offset")
    pshape = _shape(p.get("shape"), f"{path}.part.shape")
    grid = _shape(p.get("grid"), f"{path}.grid", lo=1)
    chunks = _shape(p.get("chunks"), f"{path}.chunks", lo=1)
    if not (len(offset) == len(pshape) == len(grid) == len(chunks) == len(shape)):
        raise MetadataError(
            f"array {path}: offset/shape/grid/chunks disagree in rank with shape {list(shape)}"
        )
    if any(g % c for g, c in zip(grid, chunks, strict=True)):
        raise MetadataError(f"array {path}: inner chunks {list(chunks)} do not divide shards {list(grid)}")
    if math.prod(g // c for g, c in zip(grid, chunks, strict=True)) > 2**24:
        raise MetadataError(f"array {path}: more than 2**24 inner chunks per shard")
    ncells = tuple(-(-s // g) for s, g in zip(pshape, grid, strict=True))
    shards: list[ShardRecord] = []
    seen: set[tuple[int, ...]] = set()
    for s in _list(p.get("shards"), f"{path}.shards"):
        rec = _list(s, f"{path} shard")
        if len(rec) != 4:
            raise MetadataError(f"array {path}: shard record {rec!r} must have 4 fields")
        coords = tuple(_int(c, f"{path} shard coordinate", lo=0) for c in _list(rec[0], f"{path} coords"))
        if len(coords) != len(shape) or any(c >= n for c, n in zip(coords, ncells, strict=True)):
            raise MetadataError(
                f"array {path}: shard coordinates {list(coords)} outside the grid {list(ncells)}"
            )
        if coords in seen:
            raise MetadataError(f"array {path}: shard {list(coords)} listed twice")
        seen.add(coords)
        shards.append(
            ShardRecord(
                coords,
                _int(rec[1], "writer", lo=0),
                _int(rec[2], "nbytes", lo=0),
                _int(rec[3], "index_crc32c", lo=0, hi=2**32 - 1),
            )
        )
    return PartRecord(offset, pshape, grid, chunks, tuple(shards))


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise MetadataError(f"{what} must be a JSON object, got {type(v).__name__}")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise MetadataError(f"{what} must be a JSON list, got {type(v).__name__}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise MetadataError(f"{what} must be a string, got {type(v).__name__}")
    return v


def _int(v: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise MetadataError(f"{what} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MetadataError(f"{what}={v} is out of range")
    return v


def _shape(v: Any, what: str, lo: int = 0) -> tuple[int, ...]:
    dims = tuple(_int(x, what, lo=lo, hi=MAX_ELEMENTS) for x in _list(v, what))
    if len(dims) > MAX_NDIM:
        raise MetadataError(f"{what} has {len(dims)} dimensions (at most {MAX_NDIM})")
    if math.prod(dims) > MAX_ELEMENTS:
        raise MetadataError(f"{what} {list(dims)} has more than 2**52 elements")
    return dims
