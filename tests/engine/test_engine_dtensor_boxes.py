"""What DTensor placements mean as boxes, writers and layouts (pure: no process group)."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ckptd import LayoutError, ShardBox, TensorLayout
from ckptd.engine.dtensor import placement_boxes


def test_fsdp_over_tp_on_dim_0_is_tp_blocks_split_by_dp() -> None:
    # fully_shard after ColwiseParallel on a 2x2 (dp, tp) mesh: rows of 22 split by tp, then dp
    plan = placement_boxes((22, 6), (2, 2), (_StridedShard(0, split_factor=2), Shard(0)), ("dp", "tp"))
    assert plan.boxes == {
        (0, 0): ShardBox((0, 0), (6, 6)),
        (0, 1): ShardBox((11, 0), (6, 6)),
        (1, 0): ShardBox((6, 0), (5, 6)),
        (1, 1): ShardBox((17, 0), (5, 6)),
    }
    assert sorted(b.offset for b in plan.writers) == [(0, 0), (6, 0), (11, 0), (17, 0)]
    assert plan.layout == TensorLayout(partition=(("tp", "dp"), ()))


def test_rowwise_tp_with_fsdp_splits_two_dims() -> None:
    plan = placement_boxes((6, 22), (2, 2), (Shard(0), Shard(1)), ("dp", "tp"))
    assert plan.boxes[(1, 1)] == ShardBox((3, 11), (3, 11))
    assert plan.layout == TensorLayout(partition=(("dp",), ("tp",)))


def test_a_replicated_box_has_exactly_one_writer() -> None:
    plan = placement_boxes((6,), (2, 2), (Shard(0), Replicate()), ("dp", "tp"))
    assert plan.boxes[(0, 0)] == plan.boxes[(0, 1)] == ShardBox((0,), (3,))
    assert plan.writers == (ShardBox((0,), (3,)), ShardBox((3,), (3,)))  # tp coordinate 0 only
    assert plan.layout == TensorLayout(partition=(("dp",),), replicated=("tp",))


def test_uneven_fsdp_leaves_trailing_ranks_empty() -> None:
    plan = placement_boxes((6,), (4,), (Shard(0),), ("dp",))
    assert [plan.boxes[(r,)].shape for r in range(4)] == [(2,), (2,), (2,), (0,)]
    assert plan.layout == TensorLayout(partition=(("dp",),))


def test_partial_is_refused_with_a_layout_error() -> None:
    with pytest.raises(LayoutError, match=r"Partial.*reduce it first"):
        placement_boxes((4, 4), (2,), (Partial(),))


def test_interleaved_strided_rows_are_refused() -> None:
    # torch's own example: S(0), SS(0, sf=2) gives rank (0, 0) rows [0, 2] — no single box holds them
    with pytest.raises(LayoutError, match="one contiguous box"):
        placement_boxes((8,), (2, 2), (Shard(0), _StridedShard(0, split_factor=2)))
