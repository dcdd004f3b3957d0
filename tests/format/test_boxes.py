"""Unit and property tests for ckptd.format.boxes: the geometry every layout change reduces to."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fmt_helpers import box_in, tilings
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.format import LayoutError, ShardBox
from ckptd.format.boxes import (
    cell_box,
    cells_overlapping,
    check_tiling,
    common_grid,
    grid_cells,
    split_evenly,
)

shapes = st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple)


def mask(box: ShardBox, shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[box.slices()] = True
    return m


def test_box_validation() -> None:
    with pytest.raises(LayoutError):
        ShardBox((0,), (1, 2))
    with pytest.raises(LayoutError):
        ShardBox((-1,), (2,))
    with pytest.raises(LayoutError):
        ShardBox((0,), (-2,))
    b = ShardBox((1, 2), (3, 4))
    assert b.stop == (4, 6) and b.numel == 12 and b.ndim == 2 and not b.is_empty()
    assert b.fits_in((4, 6)) and not b.fits_in((4, 5)) and not b.fits_in((4,))
    assert ShardBox.whole(()) == ShardBox((), ()) and ShardBox((), ()).numel == 1
    assert ShardBox((0, 0), (0, 3)).is_empty()
    assert b.to_json() == {"offset": [1, 2], "shape": [3, 4]}


def test_zero_d_boxes_intersect() -> None:
    s = ShardBox((), ())
    assert s.intersect(s) == s
    with pytest.raises(LayoutError):
        s.intersect(ShardBox((0,), (1,)))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=shapes.filter(lambda s: len(s) > 0))
def test_intersect_is_set_intersection(data: st.DataObject, shape: tuple[int, ...]) -> None:
    a, b = data.draw(box_in(shape)), data.draw(box_in(shape))
    both = mask(a, shape) & mask(b, shape)
    got = a.intersect(b)
    if not both.any():
        assert got is None or got.is_empty()
    else:
        assert got is not None
        assert (mask(got, shape) == both).all()
        assert got == b.intersect(a)
        # relative_to selects the intersection inside an array holding `a`
        inside_a = np.arange(math.prod(shape)).reshape(shape)[a.slices()]
        assert (
            inside_a[got.relative_to(a)] == np.arange(math.prod(shape)).reshape(shape)[got.slices()]
        ).all()


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 100), parts=st.integers(1, 17))
def test_split_evenly_is_a_ceil_grid(size: int, parts: int) -> None:
    pieces = [split_evenly(size, parts, i) for i in range(parts)]
    cell = -(-size // parts) if size else 0
    pos = 0
    for off, n in pieces:
        assert off == pos and 0 <= n <= cell
        pos += n
    assert pos == size
    # all non-trailing parts are exactly one cell: the boxes form a regular grid
    lengths = [n for _, n in pieces]
    full = [n == cell for n in lengths]
    assert full == sorted(full, reverse=True) or size == 0
    assert all(off % cell == 0 for off, n in pieces if n) or size == 0


def test_split_evenly_rejects_missing_parts() -> None:
    for parts, index in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(LayoutError):
            split_evenly(10, parts, index)
    assert [split_evenly(9, 4, i) for i in range(4)] == [(0, 3), (3, 3), (6, 3), (9, 0)]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=shapes.filter(lambda s: len(s) > 0 and all(s)))
def test_cells_overlapping_are_exactly_the_overlapping_cells(
    data: st.DataObject, shape: tuple[int, ...]
) -> None:
    cell = tuple(data.draw(st.integers(1, s + 2)) for s in shape)
    box = data.draw(box_in(shape))
    got = set(cells_overlapping(box, cell))
    want = {
        c
        for c in grid_cells(shape, cell)
        if (x := cell_box(c, cell, shape).intersect(box)) is not None and not x.is_empty()
    }
    assert got == want
    # the cells tile the array
    check_tiling(shape, [cell_box(c, cell, shape) for c in grid_cells(shape, cell)])


@settings(max_examples=200, deadline=None)
@given(t=tilings())
def test_common_grid_makes_every_box_whole_cells(t: tuple[tuple[int, ...], list[ShardBox]]) -> None:
    shape, boxes = t
    check_tiling(shape, boxes)
    cell = common_grid(shape, boxes)
    if cell is None:
        return
    for b in boxes:
        for d, (o, s) in enumerate(zip(b.offset, b.shape, strict=True)):
            assert o % cell[d] == 0
            assert (o + s) % cell[d] == 0 or o + s == shape[d]
        # so the cells overlapping the box lie wholly inside it
        for c in cells_overlapping(b, cell):
            assert cell_box(c, cell, shape).intersect(b) == cell_box(c, cell, shape)


def test_common_grid_gives_up_on_pathological_layouts() -> None:
    shape = (4001,)
    boxes = [ShardBox((0,), (1,)), ShardBox((1,), (4000,))]
    assert common_grid(shape, boxes) is None
    assert common_grid((64, 96), [ShardBox((0, 0), (32, 96)), ShardBox((32, 0), (32, 96))]) == (32, 96)


def test_check_tiling_rejects_gaps_overlaps_and_outside() -> None:
    with pytest.raises(LayoutError, match="missing"):
        check_tiling((10,), [ShardBox((0,), (4,)), ShardBox((5,), (5,))])
    with pytest.raises(LayoutError):
        check_tiling((10,), [ShardBox((0,), (6,)), ShardBox((4,), (6,))])
    with pytest.raises(LayoutError):
        check_tiling((10,), [ShardBox((0,), (6,)), ShardBox((6,), (5,))])
    with pytest.raises(LayoutError):  # same volume, but overlapping and leaving a gap
        check_tiling((4, 4), [ShardBox((0, 0), (2, 4)), ShardBox((0, 0), (2, 4))])
    check_tiling((10,), [ShardBox((0,), (10,)), ShardBox((3,), (0,))])  # empty boxes are ignored
    check_tiling((), [ShardBox((), ())])
