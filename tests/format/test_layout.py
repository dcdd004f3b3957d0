"""Unit and property tests for ckptd.format.layout: which box each rank of a mesh owns."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.format import LayoutError, MetadataError, ShardBox, TensorLayout, mesh_coords
from ckptd.format.boxes import check_tiling
from ckptd.format.layout import FusedSplit


@st.composite
def layouts(draw: st.DrawFn) -> tuple[TensorLayout, tuple[int, ...], dict[str, int]]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 70), min_size=ndim, max_size=ndim)))
    axes = ["tp", "dp", "cp", "ep"]
    mesh = {a: draw(st.integers(1, 5)) for a in axes}
    partition: list[tuple[str, ...]] = [() for _ in range(ndim)]
    for a in axes[:3]:  # ep stays replicated
        d = draw(st.integers(-1, ndim - 1))
        if d >= 0:
            partition[d] = (*partition[d], a)
    padded = tuple((d, s + draw(st.integers(0, 9))) for d, s in enumerate(shape) if draw(st.booleans()))
    return TensorLayout(partition=tuple(partition), replicated=("ep",), padded=padded), shape, mesh


@settings(max_examples=300, deadline=None)
@given(spec=layouts())
def test_boxes_of_all_ranks_tile_the_array(
    spec: tuple[TensorLayout, tuple[int, ...], dict[str, int]],
) -> None:
    layout, shape, mesh = spec
    boxes = layout.all_boxes(shape, mesh)
    split_axes = [a for axes in layout.partition for a in axes]
    assert len(boxes) == math.prod(mesh[a] for a in split_axes)
    check_tiling(shape, boxes)
    for b in boxes:
        assert b.fits_in(shape)
    # every rank's box is one of them, and replicas agree on it
    for rank in range(math.prod(mesh.values())):
        coords = mesh_coords(mesh, rank)
        box = layout.box_for(shape, mesh, coords)
        assert box in boxes
        assert layout.box_for(shape, mesh, {**coords, "ep": 0}) == box
        assert layout.is_writer(mesh, coords) == (coords["ep"] == 0)


def test_tensor_parallel_vocabulary_padding() -> None:
    layout = TensorLayout(partition=(("tp",), ()), padded=((0, 50304),))
    boxes = [layout.box_for((50257, 768), {"tp": 8}, {"tp": r}) for r in range(8)]
    assert [b.offset[0] for b in boxes] == [r * 6288 for r in range(8)]
    assert [b.shape[0] for b in boxes] == [6288] * 7 + [50257 - 7 * 6288]
    assert all(b.shape[1] == 768 for b in boxes)
    check_tiling((50257, 768), boxes)


def test_padding_can_leave_trailing_ranks_empty() -> None:
    layout = TensorLayout(partition=(("tp",),), padded=((0, 16),))
    boxes = layout.all_boxes((9,), {"tp": 4})
    assert boxes == [ShardBox((0,), (4,)), ShardBox((4,), (4,)), ShardBox((8,), (1,)), ShardBox((9,), (0,))]


def test_zero_flat_shards_and_tp_then_dp() -> None:
    zero = TensorLayout(partition=(("dp",),))
    assert zero.all_boxes((9,), {"dp": 4}) == [
        ShardBox((0,), (3,)),
        ShardBox((3,), (3,)),
        ShardBox((6,), (3,)),
        ShardBox((9,), (0,)),
    ]
    nested = TensorLayout(partition=(("tp", "dp"), ()))
    mesh = {"tp": 2, "dp": 2}
    boxes = nested.all_boxes((12, 3), mesh)
    # outer axis first: tp halves, each split in two by dp
    assert [b.offset[0] for b in boxes] == [0, 3, 6, 9]
    assert nested.box_for((12, 3), mesh, {"tp": 1, "dp": 0}) == ShardBox((6, 0), (3, 3))
    check_tiling((12, 3), boxes)


def test_layout_errors() -> None:
    with pytest.raises(LayoutError):
        TensorLayout(partition=(("tp",), ("tp",)))
    with pytest.raises(LayoutError):
        TensorLayout(partition=(("tp",),), replicated=("tp",))
    with pytest.raises(MetadataError):
        TensorLayout(partition=(("a/b",),))
    with pytest.raises(MetadataError):
        TensorLayout(alias_of="../x")
    layout = TensorLayout(partition=(("tp",), ()))
    with pytest.raises(LayoutError):
        layout.box_for((4, 4), {"dp": 2}, {"dp": 0})
    with pytest.raises(LayoutError):
        layout.box_for((4, 4), {"tp": 2}, {"tp": 2})
    with pytest.raises(LayoutError):
        layout.box_for((4, 4, 4), {"tp": 2}, {"tp": 0})
    with pytest.raises(LayoutError):
        TensorLayout(partition=(("tp",),), padded=((0, 3),)).box_for((4,), {"tp": 2}, {"tp": 0})


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_mesh_coords_is_row_major(sizes: list[int]) -> None:
    mesh = {f"a{i}": n for i, n in enumerate(sizes)}
    seen = set()
    for rank in range(math.prod(sizes)):
        coords = mesh_coords(mesh, rank)
        flat = 0
        for a in mesh:
            flat = flat * mesh[a] + coords[a]
        assert flat == rank
        seen.add(tuple(coords.values()))
    assert len(seen) == math.prod(sizes)
    with pytest.raises(LayoutError):
        mesh_coords(mesh, math.prod(sizes))


def test_json_round_trip() -> None:
    layout = TensorLayout(
        partition=(("tp", "dp"), ()),
        replicated=("pp",),
        padded=((0, 64),),
        fused=FusedSplit(fused="qkv", dim=0, index=1, sizes=(32, 8, 8)),
        alias_of="model/embed",
        extra={"note": "x"},
    )
    assert TensorLayout.from_json(layout.to_json()) == layout
    for bad in (
        "tp",
        {"partition": "tp"},
        {"partition": [["tp"]], "padded": [[0]]},
        {"partition": [], "fused": {"fused": "qkv"}},
    ):
        with pytest.raises(MetadataError):
            TensorLayout.from_json(bad)
