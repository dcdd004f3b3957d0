"""Parallel layout metadata: how a canonical tensor was split across a device mesh.

The format stores every tensor in its canonical global shape. ``TensorLayout`` says
how a *particular* parallel layout partitions it, so that

* a writer knows which box it owns (``box_for``),
* a reader in another layout computes the box it needs with the same function and
  its own mesh, and
* the catalog can produce a restore plan for any target mesh without touching data.

Mesh axes are named (``dp``, ``tp``, ``pp``, ``ep``, ...). A dimension split by several
axes lists them outermost first: ``partition=(("tp", "dp"), ())`` splits dim 0 into
``tp`` blocks, each of them into ``dp`` blocks (tensor parallel, then ZeRO).
Each split uses ceil division, so boxes form a regular grid whenever the inner sizes
divide evenly (the usual case: the last blocks may be short or empty) — the property
that makes a writer's box a Zarr shard. Otherwise the storage plan refines the grid
or stores explicit pieces (SPEC.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptd.format.boxes import ShardBox, split_evenly
from ckptd.format.errors import LayoutError, MetadataError
from ckptd.format.names import check_array_path, check_segment

Mesh = Mapping[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class FusedSplit:
    """This canonical tensor is one part of a fused tensor in the training layout.

    Example: ``q`` is part 0 of ``qkv`` along dim 0 with sizes (q, k, v). Converters and
    state-dict adapters use it to fuse and unfuse; readers of canonical data ignore it.
    """

    fused: str
    """Name of the fused tensor in the training code (informational)."""
    dim: int
    index: int
    sizes: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"fused": self.fused, "dim": self.dim, "index": self.index, "sizes": list(self.sizes)}


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorLayout:
    """How one canonical tensor is partitioned over a named mesh."""

    partition: tuple[tuple[str, ...], ...] = ()
    """Per dimension, the mesh axes that split it (outermost first); empty when unsplit."""
    replicated: tuple[str, ...] = ()
    """Mesh axes over which identical copies exist (written once, by the lowest rank)."""
    padded: tuple[tuple[int, int], ...] = ()
    """``(dim, padded_size)``: the training layout pads this dim (vocabulary padding). Splits are
    computed on the padded size and clipped to the canonical size."""
    fused: FusedSplit | None = None
    alias_of: str | None = None
    """Tied weights: this tensor is the same data as another array path (stored once)."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for axes in self.partition:
            for a in axes:
                check_segment(a)
                if a in seen:
                    raise LayoutError(f"mesh axis {a!r} splits more than one dimension")
                seen.add(a)
        for a in self.replicated:
            check_segment(a)
            if a in seen:
                raise LayoutError(f"mesh axis {a!r} both splits and replicates the tensor")
        if self.alias_of is not None:
            check_array_path(self.alias_of)

    def padded_size(self, dim: int, size: int) -> int:
        for d, p in self.padded:
            if d == dim:
                if p < size:
                    raise LayoutError(f"padded size {p} of dim {dim} is smaller than its size {size}")
                return p
        return size

    def box_for(self, shape: Sequence[int], mesh: Mesh, coords: Mapping[str, int]) -> ShardBox:
        """The box of the canonical tensor held by the rank at ``coords`` of ``mesh``."""
        if len(self.partition) not in (0, len(shape)):
            raise LayoutError(f"layout partitions {len(self.partition)} dims of a {len(shape)}-d tensor")
        offset: list[int] = []
        extent: list[int] = []
        for d, size in enumerate(shape):
            axes = self.partition[d] if self.partition else ()
            # Nested splits, outermost axis first: tp blocks, then each block into dp parts
            # (what Megatron-style TP followed by ZeRO sharding does).
            start, length = 0, self.padded_size(d, size)
            for a in axes:
                if a not in mesh or a not in coords:
                    raise LayoutError(f"mesh axis {a!r} is not part of the mesh {dict(mesh)}")
                n = int(mesh[a])
                if not 0 <= coords[a] < n:
                    raise LayoutError(f"coordinate {a}={coords[a]} outside mesh size {n}")
                sub_start, length = split_evenly(length, n, int(coords[a]))
                start += sub_start
            stop = min(size, start + length)
            start = min(start, size)
            offset.append(start)
            extent.append(max(0, stop - start))
        return ShardBox(tuple(offset), tuple(extent))

    def is_writer(self, mesh: Mesh, coords: Mapping[str, int]) -> bool:
        """Replicated copies are written once: by the rank with coordinate 0 on every replicated axis."""
        return all(coords.get(a, 0) == 0 for a in self.replicated)

    def all_boxes(self, shape: Sequence[int], mesh: Mesh) -> list[ShardBox]:
        """The distinct boxes of every rank (one per writer), in mesh order."""
        axes = [a for dims in self.partition for a in dims]
        boxes: list[ShardBox] = []
        for flat in range(math.prod(int(mesh[a]) for a in axes) if axes else 1):
            coords: dict[str, int] = {}
            rem = flat
            for a in reversed(axes):
                coords[a] = rem % int(mesh[a])
                rem //= int(mesh[a])
            boxes.append(self.box_for(shape, mesh, coords))
        return boxes

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"partition": [list(a) for a in self.partition]}
        if self.replicated:
            doc["replicated"] = list(self.replicated)
        if self.padded:
            doc["padded"] = [list(p) for p in self.padded]
        if self.fused is not None:
            doc["fused"] = self.fused.to_json()
        if self.alias_of is not None:
            doc["alias_of"] = self.alias_of
        if self.extra:
            doc["extra"] = dict(self.extra)
        return doc

    @staticmethod
    def from_json(doc: Any) -> TensorLayout:
        if not isinstance(doc, dict):
            raise MetadataError(f"layout must be a JSON object, got {type(doc).__name__}")
        try:
            fused = doc.get("fused")
            return TensorLayout(
                partition=tuple(
                    tuple(str(a) for a in _list(axes)) for axes in _list(doc.get("partition", []))
                ),
                replicated=tuple(str(a) for a in _list(doc.get("replicated", []))),
                padded=tuple((int(p[0]), int(p[1])) for p in _list(doc.get("padded", []))),
                fused=None
                if fused is None
                else FusedSplit(
                    fused=str(fused["fused"]),
                    dim=int(fused["dim"]),
                    index=int(fused["index"]),
                    sizes=tuple(int(s) for s in _list(fused["sizes"])),
                ),
                alias_of=None if doc.get("alias_of") is None else str(doc["alias_of"]),
                extra=dict(doc.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            if isinstance(e, MetadataError):
                raise
            raise MetadataError(f"malformed layout {doc!r}: {e}") from e


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise MetadataError(f"expected a JSON list, got {value!r}")
    return value


def mesh_coords(mesh: Mesh, rank: int, order: Sequence[str] | None = None) -> dict[str, int]:
    """Coordinates of ``rank`` in a row-major mesh (``order`` outermost first; default: mesh order)."""
    axes = list(order if order is not None else mesh.keys())
    size = math.prod(int(mesh[a]) for a in axes)
    if not 0 <= rank < size:
        raise LayoutError(f"rank {rank} is outside a mesh of {size} ranks {dict(mesh)}")
    coords: dict[str, int] = {}
    for a in reversed(axes):
        coords[a] = rank % int(mesh[a])
        rank //= int(mesh[a])
    return coords
