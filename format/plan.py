"""Storage planning: from an array's shape and its writers' boxes to a Zarr grid.

Every writer of the same array must reach the same plan independently (no
coordination), so everything here is a pure function of the shape, the dtype, the
set of writer boxes and the target chunk size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptd.format.boxes import ShardBox, check_tiling, common_grid
from ckptd.format.errors import LayoutError
from ckptd.format.layout import TensorLayout
from ckptd.format.manifest import ArrayKind

DEFAULT_CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True, slots=True)
class PartPlan:
    """Where one writer's box goes: which stored part, with which grid, and which shards."""

    index: int  # part index (0 unless the array is stored as pieces)
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    grid: tuple[int, ...]
    chunks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ArrayPlan:
    kind: ArrayKind
    parts: tuple[PartPlan, ...]

    def part_for(self, box: ShardBox) -> PartPlan:
        """The part a writer box is stored in."""
        if self.kind != "pieces":
            return self.parts[0]
        for p in self.parts:
            if p.offset == box.offset and p.shape == box.shape:
                return p
        raise LayoutError(f"box {box.to_json()} is not one of the writer boxes of this array")


_CACHE_ENTRIES = 1 << 16
_plans: dict[tuple[Any, ...], tuple[Any, ArrayPlan]] = {}
_plans_lock = threading.Lock()


def cached_plan(
    shape: tuple[int, ...],
    itemsize: int,
    box: ShardBox,
    chunk_bytes: int,
    *,
    boxes: Sequence[ShardBox] | None = None,
    layout: TensorLayout | None = None,
    mesh: Mapping[str, int] | None = None,
) -> ArrayPlan:
    """``plan_array`` for a writer's box, computed once per layout and reused across saves.

    Layouts do not change between saves, and planning checks that the writer boxes tile the
    array, which is costly for thousands of boxes. The key holds the layout object itself
    (compared by identity: a ``TensorLayout`` is immutable) or the explicit box list.
    """
    if boxes is not None:
        key: tuple[Any, ...] = ("boxes", shape, itemsize, chunk_bytes, tuple(boxes))
        anchor: Any = None
    elif layout is not None and mesh is not None:
        key = ("layout", id(layout), shape, itemsize, chunk_bytes, tuple(sorted(mesh.items())))
        anchor = layout
    else:
        key = ("single", shape, itemsize, chunk_bytes, box)
        anchor = None
    with _plans_lock:
        hit = _plans.get(key)
    if hit is not None and hit[0] is anchor:
        return hit[1]
    if boxes is None:
        boxes = layout.all_boxes(shape, mesh) if layout is not None and mesh is not None else [box]
    plan = plan_array(shape, itemsize, boxes, chunk_bytes)
    with _plans_lock:
        if len(_plans) >= _CACHE_ENTRIES:
            _plans.clear()
        _plans[key] = (anchor, plan)
    return plan


def plan_array(
    shape: Sequence[int], itemsize: int, boxes: Sequence[ShardBox], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> ArrayPlan:
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ArrayPlan("scalar", (PartPlan(0, (), (), (), ()),))
    nonempty = sorted({b for b in boxes if not b.is_empty()}, key=lambda b: b.offset)
    check_tiling(shape, nonempty)
    if math.prod(shape) == 0:
        one = tuple(max(1, s) for s in shape)
        return ArrayPlan("regular", (PartPlan(0, (0,) * len(shape), shape, one, one),))
    cell = common_grid(shape, nonempty)
    if cell is not None:
        single = tuple(c >= s for c, s in zip(cell, shape, strict=True))
        grid, chunks = choose_chunks(shape, cell, single, itemsize, chunk_bytes)
        return ArrayPlan("regular", (PartPlan(0, (0,) * len(shape), shape, grid, chunks),))
    parts = []
    for i, b in enumerate(nonempty):
        grid, chunks = choose_chunks(b.shape, b.shape, (True,) * len(shape), itemsize, chunk_bytes)
        parts.append(PartPlan(i, b.offset, b.shape, grid, chunks))
    return ArrayPlan("pieces", tuple(parts))


def choose_chunks(
    shape: Sequence[int], cell: Sequence[int], single: Sequence[bool], itemsize: int, target: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pick the inner chunk shape (about ``target`` bytes) and the final shard shape.

    Inner chunks must divide the shard shape. Along a dimension split between
    writers the shard extent is fixed, so the chunk takes its largest divisor that
    fits; along a dimension with a single shard the shard is rounded up to a multiple
    of the chunk instead (the excess lies beyond the array edge and is never stored).
    Chunks span whole trailing rows where possible, so they are contiguous in memory.
    """
    ndim = len(shape)
    chunk = list(cell)
    for d in range(ndim):
        trailing = itemsize * math.prod(cell[d + 1 :])
        if trailing >= target and d < ndim - 1:
            chunk[d] = 1
            continue
        rows = max(1, target // max(1, trailing))
        if single[d]:
            # Prefer a divisor of the dimension (no padded edge chunk to copy) when one is close.
            div = _largest_divisor_at_most(cell[d], rows)
            chunk[d] = div if 2 * div >= min(rows, cell[d]) else min(rows, cell[d])
        else:
            chunk[d] = _largest_divisor_at_most(cell[d], rows)
        break
    grid = tuple(
        (-(-max(s, 1) // c) * c) if single[d] else cell[d]
        for d, (s, c) in enumerate(zip(shape, chunk, strict=True))
    )
    return grid, tuple(chunk)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    if n <= limit:
        return n
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            if i <= limit:
                best = max(best, i)
            if n // i <= limit:
                best = max(best, n // i)
        i += 1
    return best
