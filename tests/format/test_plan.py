"""Unit and property tests for ckptd.format.plan: writer boxes -> the Zarr grid every writer agrees on."""

from __future__ import annotations

import math
import random

import pytest
from fmt_helpers import tilings
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.format import LayoutError, ShardBox, TensorLayout
from ckptd.format.boxes import cell_box, cells_overlapping, split_evenly
from ckptd.format.plan import ArrayPlan, plan_array


def check_plan(
    plan: ArrayPlan, shape: tuple[int, ...], boxes: list[ShardBox], itemsize: int, target: int
) -> None:
    for p in plan.parts:
        # inner chunks divide shards, and are about the target size
        assert all(g % c == 0 for g, c in zip(p.grid, p.chunks, strict=True)), p
        assert math.prod(p.chunks) * itemsize <= max(target, itemsize), p
    if plan.kind == "regular":
        (p,) = plan.parts
        assert p.offset == (0,) * len(shape) and p.shape == shape
        # every writer box is a union of whole shards: each shard has exactly one writer
        owner: dict[tuple[int, ...], int] = {}
        for w, b in enumerate(boxes):
            for c in cells_overlapping(b, p.grid):
                cb = cell_box(c, p.grid, shape)
                assert b.intersect(cb) == cb, (b, c, p.grid)
                assert c not in owner
                owner[c] = w
        all_cells = {c for c in cells_overlapping(ShardBox.whole(shape), p.grid)}
        assert set(owner) == all_cells
    elif plan.kind == "pieces":
        assert sorted((p.offset, p.shape) for p in plan.parts) == sorted((b.offset, b.shape) for b in boxes)
        for b in boxes:
            part = plan.part_for(b)
            assert (part.offset, part.shape) == (b.offset, b.shape)
            assert all(g >= s for g, s in zip(part.grid, part.shape, strict=True))  # one shard per piece


@settings(max_examples=300, deadline=None)
@given(
    t=tilings(max_1d=3000, max_nd=60),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    target=st.sampled_from([1, 10, 100, 4096, 2**22]),
)
def test_plans_are_valid_for_any_tiling(
    t: tuple[tuple[int, ...], list[ShardBox]], itemsize: int, target: int
) -> None:
    shape, boxes = t
    plan = plan_array(shape, itemsize, boxes, target)
    check_plan(plan, shape, boxes, itemsize, target)
    # every writer reaches the same plan independently, whatever order it lists the boxes in
    shuffled = list(boxes)
    random.Random(len(boxes)).shuffle(shuffled)
    assert (
        plan_array(shape, itemsize, [*shuffled, ShardBox((0,) * len(shape), (0,) * len(shape))], target)
        == plan
    )


@settings(max_examples=100, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 8)), min_size=1, max_size=3),
    itemsize=st.sampled_from([2, 4]),
    target=st.sampled_from([64, 1000, 2**20]),
)
def test_ceil_split_layouts_get_regular_grids(
    dims: list[tuple[int, int]], itemsize: int, target: int
) -> None:
    shape = tuple(s for s, _ in dims)
    mesh = {f"ax{d}": n for d, (_, n) in enumerate(dims)}
    layout = TensorLayout(partition=tuple((f"ax{d}",) for d in range(len(dims))))
    boxes = layout.all_boxes(shape, mesh)
    plan = plan_array(shape, itemsize, boxes, target)
    assert plan.kind == "regular"
    (p,) = plan.parts
    for d, (size, n) in enumerate(dims):
        cell = split_evenly(size, n, 0)[1]
        if n > 1 and cell < size:
            assert p.grid[d] == cell  # the shard is the writer's box
    check_plan(plan, shape, boxes, itemsize, target)


def test_pieces_fallback_and_part_lookup() -> None:
    boxes = [ShardBox((0, 0), (1, 3)), ShardBox((1, 0), (4000, 3))]
    plan = plan_array((4001, 3), 8, boxes)
    assert plan.kind == "pieces" and len(plan.parts) == 2
    assert plan.part_for(boxes[1]).index == 1
    with pytest.raises(LayoutError):
        plan.part_for(ShardBox((0, 0), (2, 3)))


def test_scalar_empty_and_single_writer_plans() -> None:
    assert plan_array((), 4, [ShardBox((), ())]).kind == "scalar"
    empty = plan_array((0, 7), 4, [ShardBox((0, 0), (0, 7))])
    assert empty.kind == "regular" and all(g >= 1 for g in empty.parts[0].grid)
    one = plan_array((1000, 1000), 4, [ShardBox.whole((1000, 1000))], 4 * 2**20)
    assert one.kind == "regular" and one.parts[0].grid[1] == 1000
    # a single writer's chunks are rows of about the target size, stacked along dim 0
    assert one.parts[0].chunks[1] == 1000 and math.prod(one.parts[0].chunks) * 4 <= 4 * 2**20
    tall = plan_array((100_000, 1000), 4, [ShardBox.whole((100_000, 1000))], 4 * 2**20)
    rows, cols = tall.parts[0].chunks
    assert cols == 1000 and 2 * 2**20 <= rows * cols * 4 <= 4 * 2**20  # whole rows, about the target
    assert tall.parts[0].grid[0] % rows == 0 and tall.parts[0].grid[0] >= 100_000


def test_boxes_that_do_not_tile_are_refused() -> None:
    with pytest.raises(LayoutError):
        plan_array((10,), 4, [ShardBox((0,), (4,)), ShardBox((5,), (5,))])
    with pytest.raises(LayoutError):
        plan_array((10,), 4, [ShardBox((0,), (6,)), ShardBox((4,), (6,))])
