"""The records of a committed checkpoint (their strict parser is ``manifest_parse``).

A checkpoint exists exactly when ``manifest.json`` exists. In format v1 the manifest lists
every array, part and shard object with its writer, size and index checksum. In format v2
(``commit_record.py``) it is a small commit record: array records live in separately stored
tables and shard objects are derived from each part's grid, so nothing a reader fetches grows
with the number of ranks that wrote the checkpoint. Both parse into the same records below,
and readers never trust a storage key they did not derive from validated names and integers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ckptd.format.boxes import grid_cells
from ckptd.format.codecs import CodecSpec
from ckptd.format.dtypes import LogicalDType
from ckptd.format.layout import TensorLayout
from ckptd.format.strict_json import (
    dumps_sealed,
)

FORMAT_NAME = "ckptd"
FORMAT_VERSION = 2
"""The version ckptd writes; it reads every version up to this one."""
MANIFEST_KEY = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20
ArrayKind = Literal["regular", "pieces", "scalar"]
RankState = bool | Literal["array"]
"""How a format v2 checkpoint keeps per-rank state: False none, "array" the rank-state array,
True the JSON objects of older v2 checkpoints (SPEC §8.3)."""
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
    rank_state: RankState = False
    """Format v2: ranks saved state of their own: ``"array"`` the rank-state array (``ranks/``
    of the attempt's metadata), True the ``ranks/r-NNNNNNN.json`` objects of older v2 checkpoints."""

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


_PARSERS = frozenset(
    {"loads_document", "loads", "with_context", "parse", "parse_mesh", "check_listed_complete",
     "parse_array", "parse_part"}
)


def __getattr__(name: str) -> Any:
    """The parser moved to ``manifest_parse``; older imports of it from here keep working."""
    if name in _PARSERS:
        from ckptd.format import manifest_parse

        return getattr(manifest_parse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
