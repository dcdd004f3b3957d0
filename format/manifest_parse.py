"""The strict parser of manifests: format v1 documents and the array records both versions share.

Never trusts its input: every member is type-checked (``strict_json``), every name validated, every
shape and box checked against the array before a record exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from ckptd.format.boxes import ShardBox, check_tiling
from ckptd.format.codecs import CodecSpec
from ckptd.format.dtypes import logical_dtype
from ckptd.format.errors import LayoutError, MetadataError, UnsupportedFormatError
from ckptd.format.layout import TensorLayout
from ckptd.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    ArrayRecord,
    Manifest,
    PartRecord,
    ShardRecord,
)
from ckptd.format.names import check_array_path, check_segment
from ckptd.format.strict_json import integer, loads_sealed, lst, obj, string
from ckptd.format.strict_json import shape as shape_of

T = TypeVar("T")


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
