"""DTensors (FSDP2, tensor parallel, any DeviceMesh) as local tensors plus ``ShardSpec``s.

A DTensor is a global tensor cut over a ``DeviceMesh`` by its placements. The format stores
every tensor in its global shape and each rank writes the box it holds, so all ckptd needs
from a DTensor is:

* the global shape and this rank's box — from torch's own placement arithmetic, which also
  resolves ``_StridedShard`` (FSDP2 sharding a dim that tensor parallelism already split);
* write ownership — a box held by several ranks (``Replicate()`` mesh dims, or a DTensor on
  a sub-mesh such as FSDP-only parameters of an FSDPxTP model, copied over the other dims)
  is written once: by coordinate 0 of every ``Replicate`` dim, in the sub-mesh copy that
  holds the root mesh's first rank;
* every writer's box — the storage plan needs the whole set; it depends only on (shape,
  mesh, placements) and is computed once and cached;
* layout metadata — the mesh dim names and sizes, and a ``TensorLayout`` when the boxes
  are nested splits (FSDPxTP on dim 0 is ``partition=(("tp", "dp"), ...)``); otherwise
  the explicit boxes are the layout.

``Partial`` placements (pending reductions) have no box of their own and are refused with
a ``LayoutError``. Nothing here issues a collective.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.engine.config import ShardSpec
from ckptd.format.boxes import ShardBox, check_tiling
from ckptd.format.errors import LayoutError
from ckptd.format.layout import TensorLayout

MAX_TILING_CHECK = 1024
"""Above this many writer boxes the (pairwise) exact-tiling check is reduced to a volume check."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_dtensor(value: Any) -> bool:
    return _DTENSOR is not None and isinstance(value, _DTENSOR)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory holds this rank's data: a DTensor's local shard, else ``t``."""
    if is_dtensor(t):
        local = t._local_tensor  # type: ignore[attr-defined]
        assert isinstance(local, torch.Tensor)
        return local
    return t


def shard_spec(t: torch.Tensor) -> ShardSpec:
    """The ``ShardSpec`` of a DTensor on this rank (cached per shape, mesh and placements)."""
    if not is_dtensor(t):
        raise LayoutError(f"expected a DTensor, got a {type(t).__name__}")
    mesh = t.device_mesh  # type: ignore[attr-defined]
    spec = _spec(tuple(int(s) for s in t.shape), mesh, tuple(t.placements))  # type: ignore[attr-defined]
    local = local_tensor(t)
    if tuple(local.shape) != spec.box.shape:
        raise LayoutError(
            f"a DTensor's local shard has shape {tuple(local.shape)} but its placements "
            f"{_describe(t.placements)} give this rank the box {spec.box.to_json()}"  # type: ignore[attr-defined]
        )
    return spec


@dataclass(frozen=True, slots=True)
class PlacementBoxes:
    """What a (global shape, mesh shape, placements) triple means for the format."""

    boxes: dict[tuple[int, ...], ShardBox]
    """Every mesh coordinate's box."""
    writers: tuple[ShardBox, ...]
    """One box per writer: the coordinates with 0 on every ``Replicate`` mesh dim."""
    layout: TensorLayout | None
    """Nested splits that reproduce every box, when there are such (else None)."""


def placement_boxes(shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any],
                    names: Sequence[str] | None = None) -> PlacementBoxes:
    """Boxes, writers and layout of a DTensor layout; pure (no mesh, no process group)."""
    shape, mesh_shape, placements = tuple(shape), tuple(int(n) for n in mesh_shape), tuple(placements)
    dim_names = tuple(names) if names is not None else tuple(f"mesh{i}" for i in range(len(mesh_shape)))
    boxes = _all_boxes(shape, mesh_shape, placements)
    replicate = [i for i, p in enumerate(placements) if p.is_replicate()]
    writers = tuple(b for c, b in boxes.items() if all(c[i] == 0 for i in replicate))
    _check_tiles(shape, writers, placements)
    layout = _nested_layout(shape, mesh_shape, dim_names, placements, boxes)
    if layout is not None:
        layout = TensorLayout(partition=layout.partition, replicated=tuple(dim_names[i] for i in replicate))
    return PlacementBoxes(boxes, writers, layout)


@functools.lru_cache(maxsize=4096)
def _spec(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> ShardSpec:
    coord = mesh.get_coordinate()
    if coord is None:
        raise LayoutError(f"this rank is not part of the DeviceMesh {mesh}")
    names = _dim_names(mesh)
    plan = placement_boxes(shape, mesh.shape, placements, names)
    extra = _other_root_dims(mesh, names)
    layout = plan.layout
    if layout is not None and extra:  # replicated over the root mesh dims this sub-mesh lacks
        layout = TensorLayout(partition=layout.partition, replicated=(*layout.replicated, *extra))
    owner = (all(c == 0 for c, p in zip(coord, placements, strict=True) if p.is_replicate())
             and _canonical_copy(mesh))
    return ShardSpec(shape=shape, box=plan.boxes[tuple(int(c) for c in coord)], layout=layout,
                     mesh={**dict(zip(names, (int(n) for n in mesh.shape), strict=True)), **extra},
                     write=owner, boxes=plan.writers)


def _split_dim(placement: Any) -> int | None:
    """The tensor dim a ``Shard`` or ``_StridedShard`` placement splits (None for others)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return int(placement.dim) if isinstance(placement, Shard | _StridedShard) else None


def _describe(placements: Sequence[Any]) -> str:
    return "(" + ", ".join(str(p) for p in placements) + ")"


def _dim_names(mesh: Any) -> tuple[str, ...]:
    names = mesh.mesh_dim_names
    if names:
        return tuple(str(n) for n in names)
    return tuple(f"mesh{i}" for i in range(mesh.ndim))


def _all_boxes(shape: tuple[int, ...], mesh_shape: tuple[int, ...],
               placements: tuple[Any, ...]) -> dict[tuple[int, ...], ShardBox]:
    """Every mesh coordinate's box, from torch's placement arithmetic (``_StridedShard`` included)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    if len(placements) != len(mesh_shape):
        raise LayoutError(f"{len(placements)} placements for a {len(mesh_shape)}-d mesh")
    for i, p in enumerate(placements):
        if p.is_partial():
            raise LayoutError(
                f"placement {p} on mesh dim {i} is a pending reduction (Partial): it has no box of its "
                "own to checkpoint; reduce it first (redistribute to Replicate() or Shard(d))"
            )
        if not (p.is_replicate() or _split_dim(p) is not None):
            raise LayoutError(f"placement {p} on mesh dim {i} is not supported (Shard, Replicate, "
                              "_StridedShard are)")
    boxes: dict[tuple[int, ...], ShardBox] = {}
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        # an empty shard (a short trailing FSDP shard) may report its offset past the end
        offset = tuple(min(int(o), s) for o, s in zip(offset, shape, strict=True))
        boxes[coord] = ShardBox(offset, tuple(int(n) for n in local))
    return boxes


def _check_tiles(shape: tuple[int, ...], boxes: Sequence[ShardBox], placements: Sequence[Any]) -> None:
    """Writer boxes must tile the tensor: a ``_StridedShard`` whose rows interleave gives a rank
    rows that no single box holds (torch reports only the first offset), caught here."""
    try:
        if len(boxes) <= MAX_TILING_CHECK:
            check_tiling(shape, boxes)
        elif sum(b.numel for b in boxes) != math.prod(shape):
            raise LayoutError("the writer boxes do not cover the tensor exactly")
    except LayoutError as e:
        raise LayoutError(
            f"placements {_describe(placements)} of a tensor of shape {list(shape)} do not give every "
            f"rank one contiguous box ({e}); ckptd stores each rank's shard as one box"
        ) from None


def _nested_layout(shape: tuple[int, ...], mesh_shape: tuple[int, ...], names: tuple[str, ...],
                   placements: tuple[Any, ...],
                   boxes: dict[tuple[int, ...], ShardBox]) -> TensorLayout | None:
    """A ``TensorLayout`` of nested splits that reproduces every box, if there is one."""
    per_dim: list[list[str]] = [[] for _ in shape]
    for i, p in enumerate(placements):
        d = _split_dim(p)
        if d is not None:
            per_dim[d].append(names[i])
    if any(len(axes) > 3 for axes in per_dim):
        return None
    sizes = dict(zip(names, mesh_shape, strict=True))
    # The split order along a dim is mesh order for plain Shard, reversed where _StridedShard
    # says a later mesh dim split first (TP before FSDP): try the few orders, keep one that fits.
    for orders in itertools.product(*(list(itertools.permutations(a)) for a in per_dim)):
        layout = TensorLayout(partition=tuple(tuple(o) for o in orders))
        if all(layout.box_for(shape, sizes, dict(zip(names, c, strict=True))) == b for c, b in boxes.items()):
            return layout
    return None


def _root(mesh: Any) -> Any:
    get_root = getattr(mesh, "_get_root_mesh", None)
    return get_root() if get_root is not None else mesh


def _canonical_copy(mesh: Any) -> bool:
    """A sub-mesh (``mesh["dp"]`` of a dpxtp mesh) exists once per coordinate of the other root
    dims; those copies hold the same boxes. The copy holding the root mesh's first rank writes."""
    root = _root(mesh)
    if root is mesh or root.mesh.numel() == mesh.mesh.numel():
        return True
    first = int(root.mesh.reshape(-1)[0])
    return bool((mesh.mesh == first).any())


def _other_root_dims(mesh: Any, names: tuple[str, ...]) -> dict[str, int]:
    """Root mesh dims a sub-mesh does not span (the tensor is replicated over them), by name."""
    root = _root(mesh)
    root_names = root.mesh_dim_names
    if root is mesh or not root_names or not set(names) <= set(root_names):
        return {}
    return {str(n): int(s) for n, s in zip(root_names, root.shape, strict=True) if n not in names}
