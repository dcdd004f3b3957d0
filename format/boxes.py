"""Boxes: axis-aligned hyper-rectangles of an array in its canonical global shape.

A box is what one writer owns and what one reader needs. Everything that moves
data between parallel layouts reduces to box intersection.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ckptd.format.errors import LayoutError


@dataclass(frozen=True, slots=True)
class ShardBox:
    """``offset`` and ``shape`` in global coordinates; a 0-d array has the empty box ``((), ())``."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offset) != len(self.shape):
            raise LayoutError(f"box offset {self.offset} and shape {self.shape} differ in rank")
        if any(o < 0 for o in self.offset) or any(s < 0 for s in self.shape):
            raise LayoutError(f"box {self.offset}+{self.shape} has negative coordinates")

    @staticmethod
    def whole(shape: Sequence[int]) -> ShardBox:
        return ShardBox((0,) * len(shape), tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape, strict=True))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.shape)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape, strict=True))

    def fits_in(self, shape: Sequence[int]) -> bool:
        return len(shape) == self.ndim and all(st <= dim for st, dim in zip(self.stop, shape, strict=True))

    def intersect(self, other: ShardBox) -> ShardBox | None:
        """The common part of two boxes, or None when they do not overlap (or either is empty)."""
        if other.ndim != self.ndim:
            raise LayoutError(f"cannot intersect a {self.ndim}-d box with a {other.ndim}-d box")
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset, strict=True))
        hi = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(h <= l_ for l_, h in zip(lo, hi, strict=True)) and self.ndim > 0:
            return None
        return ShardBox(lo, tuple(h - l_ for l_, h in zip(lo, hi, strict=True)))

    def relative_to(self, outer: ShardBox) -> tuple[slice, ...]:
        """Slices selecting this box inside an array that holds ``outer``."""
        return tuple(
            slice(o - oo, o - oo + s) for o, oo, s in zip(self.offset, outer.offset, self.shape, strict=True)
        )

    def to_json(self) -> dict[str, list[int]]:
        return {"offset": list(self.offset), "shape": list(self.shape)}


def split_evenly(size: int, parts: int, index: int) -> tuple[int, int]:
    """(offset, length) of part ``index`` when ``size`` is split into ``parts`` with ceil division.

    Every part but the trailing ones has the same length, so the parts form a regular
    grid whose cell is ``ceil(size / parts)`` — the property that lets a writer's box be
    a Zarr shard. Trailing parts may be short or empty.
    """
    if parts <= 0 or not 0 <= index < parts:
        raise LayoutError(f"part {index} of {parts} does not exist")
    cell = -(-size // parts) if size else 0
    start = min(size, index * cell)
    stop = min(size, start + cell)
    return start, stop - start


def grid_cells(shape: Sequence[int], cell: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of every cell of a regular grid over ``shape`` (C order)."""
    counts = [(-(-s // c) if c else 0) for s, c in zip(shape, cell, strict=True)]
    return itertools.product(*(range(n) for n in counts))


def cell_box(coords: Sequence[int], cell: Sequence[int], shape: Sequence[int]) -> ShardBox:
    """The part of grid cell ``coords`` that lies inside an array of ``shape`` (edge cells are clipped)."""
    offset = tuple(i * c for i, c in zip(coords, cell, strict=True))
    return ShardBox(offset, tuple(max(0, min(c, s - o)) for o, c, s in zip(offset, cell, shape, strict=True)))


def cells_overlapping(box: ShardBox, cell: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of the cells of a regular grid that overlap ``box``."""
    if box.is_empty():
        return iter(())
    ranges = [
        range(o // c, (o + s - 1) // c + 1) for o, s, c in zip(box.offset, box.shape, cell, strict=True)
    ]
    return itertools.product(*ranges)


def common_grid(shape: Sequence[int], boxes: Sequence[ShardBox]) -> tuple[int, ...] | None:
    """The coarsest regular grid cell such that every box is a union of whole (edge-clipped) cells.

    Returns None when some dimension would need a cell of size 1 although the dimension
    is long: such layouts are stored as explicit pieces instead (see SPEC.md).
    """
    cell: list[int] = []
    for d, size in enumerate(shape):
        g = 0
        for b in boxes:
            if b.is_empty():
                continue
            for edge in (b.offset[d], b.offset[d] + b.shape[d]):
                if edge != size:
                    g = math.gcd(g, edge)
        g = g or max(size, 1)
        cell.append(g)
    ncells = math.prod(-(-s // c) for s, c in zip(shape, cell, strict=True)) if shape else 1
    nonempty = max(1, sum(1 for b in boxes if not b.is_empty()))
    if ncells > 64 * nonempty and ncells > 1024:
        return None
    return tuple(cell)


def check_tiling(shape: Sequence[int], boxes: Sequence[ShardBox]) -> None:
    """Raise :class:`LayoutError` unless ``boxes`` exactly tile an array of ``shape``.

    Exactly: no gaps and no overlaps. Equal volume plus pairwise disjointness implies a tiling;
    disjointness is checked without comparing every pair (a hostile manifest may list thousands
    of pieces): on the grid the box edges induce when it is small (every layout ckptd writes),
    else by a sweep along the most finely split dimension.
    """
    total = math.prod(shape)
    covered = 0
    nonempty = [b for b in boxes if not b.is_empty()]
    for b in nonempty:
        if not b.fits_in(shape):
            raise LayoutError(f"box {b.offset}+{b.shape} lies outside the array shape {tuple(shape)}")
        covered += b.numel
    if covered != total:
        raise LayoutError(
            f"boxes cover {covered} of {total} elements of shape {tuple(shape)}: a writer is missing"
            if covered < total
            else f"boxes overlap: they cover {covered} elements of an array of {total}"
        )
    if len(nonempty) < 2 or not shape:
        return
    edges = [sorted({0, *(b.offset[d] for b in nonempty), *(b.stop[d] for b in nonempty)})
             for d in range(len(shape))]
    if math.prod(len(e) - 1 for e in edges) <= 8 * len(nonempty) + 4096:
        _check_on_induced_grid(nonempty, edges)
    else:
        _check_by_sweep(nonempty, edges)


def _check_on_induced_grid(boxes: Sequence[ShardBox], edges: Sequence[Sequence[int]]) -> None:
    """Every cell of the grid the box edges induce is covered at most once (numpy, O(cells + B log B))."""
    import numpy as np

    at = [{e: i for i, e in enumerate(es)} for es in edges]
    count = np.zeros(tuple(len(e) - 1 for e in edges), dtype=np.int32)
    for b in boxes:
        region = tuple(
            slice(at[d][o], at[d][o + s]) for d, (o, s) in enumerate(zip(b.offset, b.shape, strict=True))
        )
        view = count[region]
        if view.any():
            raise LayoutError(f"box {b.to_json()} overlaps another box")
        view += 1


def _check_by_sweep(boxes: Sequence[ShardBox], edges: Sequence[Sequence[int]]) -> None:
    """Sweep along the most finely split dimension, comparing a box only with boxes still open there."""
    axis = max(range(len(edges)), key=lambda d: len(edges[d]))
    order = sorted(boxes, key=lambda b: b.offset[axis])
    active: list[ShardBox] = []
    for b in order:
        start = b.offset[axis]
        active = [a for a in active if a.stop[axis] > start]
        for a in active:
            if a.intersect(b) is not None:
                raise LayoutError(f"boxes {a.to_json()} and {b.to_json()} overlap")
        active.append(b)
