"""Pipeline orders replayed with unit costs: the bubble interleaving removes, and no deadlock.

The simulator runs each rank's ops strictly in the order the trainer executes them; an op
waits for its input (previous model chunk's forward, next chunk's backward). Costs are exact
fractions, so bubble fractions are compared exactly: at pp 4 and 8 micro-batches plain 1F1B
idles (p-1)/m = 3/8 of its compute time and interleaved 1F1B with 2 chunks per rank
(p-1)/(v*m) = 3/16.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest

from ckptd.training import trainer as trainer_mod
from ckptd.training.config import ParallelConfig, TrainingConfigError
from ckptd.training.pp import Op, rank_order, simulate
from ckptd.training.pp.order import last_backwards


@pytest.mark.parametrize(("forward", "backward"), [(1, 1), (1, 2)])
def test_interleaving_cuts_the_bubble_by_the_number_of_chunks(forward: int, backward: int) -> None:
    f, b = Fraction(forward), Fraction(backward)
    plain = simulate("1f1b", 4, 8, 1, forward=f, backward=b)
    interleaved = simulate("1f1b", 4, 8, 2, forward=f, backward=b)
    assert plain.bubble_fraction == Fraction(3, 8)
    assert interleaved.bubble_fraction == Fraction(3, 16)
    # Same work per rank; the makespan shrinks by exactly the bubble removed.
    assert plain.busy == interleaved.busy == 8 * (f + b)
    assert plain.makespan - interleaved.makespan == Fraction(3, 16) * 8 * (f + b)


def test_interleaved_orders_of_pp4_m8_v2_follow_megatron() -> None:
    first, last = rank_order("1f1b", 4, 0, 8, 2), rank_order("1f1b", 4, 3, 8, 2)
    # Warm-up forwards: 2 * (p - rank - 1) + (v - 1) * p = 10 and 4; then one forward, one backward.
    assert [op.kind for op in first[:12]] == ["F"] * 10 + ["F", "B"]
    assert [op.kind for op in last[:6]] == ["F"] * 4 + ["F", "B"]
    # Micro-batches go through the chunks in groups of pp: 0-3 on chunk 0, 0-3 on chunk 1, 4-7 ...
    forwards = [(op.chunk, op.micro) for op in first if op.kind == "F"]
    assert forwards[:10] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (0, 4), (0, 5)]
    # The first backward of the last rank is the last model chunk's first micro-batch.
    assert next(op for op in last if op.kind == "B") == Op("B", 1, 0)
    for order in (first, last):
        ops = Counter((op.kind, op.chunk, op.micro) for op in order)
        assert set(ops.values()) == {1} and len(ops) == 2 * 2 * 8  # every (F|B, chunk, micro) once


def test_each_rank_starts_when_its_input_arrives() -> None:
    """Inter-stage dependencies in the timeline: rank r's first forward starts r chunk-forwards in."""
    t = simulate("1f1b", 4, 8, 2, forward=Fraction(1), backward=Fraction(2))
    for r in range(4):
        op, start, _ = t.spans[r][0]
        assert op == Op("F", 0, 0) and start == Fraction(r, 2)
    # Rank 0's chunk 1 (model chunk 4) waits for rank 3's chunk 0 (model chunk 3) on micro-batch 0.
    rank3_done = next(end for op, _, end in t.spans[3] if op == Op("F", 0, 0))
    rank0_start = next(start for op, start, _ in t.spans[0] if op == Op("F", 1, 0))
    assert rank0_start >= rank3_done


@pytest.mark.parametrize(
    ("pp", "m", "v"), [(2, 2, 2), (2, 4, 2), (2, 6, 3), (4, 4, 2), (4, 12, 3), (3, 9, 2)]
)
def test_interleaved_orders_never_deadlock_and_match_the_formula(pp: int, m: int, v: int) -> None:
    assert simulate("1f1b", pp, m, v).bubble_fraction == Fraction(pp - 1, v * m)


def test_gpipe_and_1f1b_have_the_same_bubble() -> None:
    assert simulate("gpipe", 4, 8).bubble_fraction == simulate("1f1b", 4, 8).bubble_fraction == Fraction(3, 8)


def test_last_backward_of_each_chunk_marks_when_its_gradients_are_complete() -> None:
    order = rank_order("1f1b", 2, 0, 4, 2)
    finals = last_backwards(order)
    assert finals == {Op("B", 0, 3), Op("B", 1, 3)}
    for final in finals:  # nothing of that chunk runs backward after it
        after = order[order.index(final) + 1 :]
        assert not any(op.kind == "B" and op.chunk == final.chunk for op in after)


def test_interleaving_needs_micro_batches_in_groups_of_pp() -> None:
    with pytest.raises(ValueError, match="multiple of pp"):
        rank_order("1f1b", 4, 0, 6, 2)
    with pytest.raises(TrainingConfigError, match="multiple of --pp 4"):
        ParallelConfig(pp=4, vpp=2).check_micro_batches(6)
    with pytest.raises(TrainingConfigError, match="needs --pp 2 or more"):
        ParallelConfig(pp=1, vpp=2)


def test_interleaved_chunks_are_non_contiguous() -> None:
    cfg = ParallelConfig(pp=2, vpp=2)
    assert cfg.rank_chunks(8, 0) == (range(0, 2), range(4, 6))
    assert cfg.rank_chunks(8, 1) == (range(2, 4), range(6, 8))
    assert ParallelConfig(pp=2).rank_chunks(4, 1) == (range(2, 4),)


def test_trainer_refuses_more_chunks_than_layers(capsys: pytest.CaptureFixture[str]) -> None:
    assert trainer_mod.main(["--pp", "2", "--vpp", "3", "--layers", "4"]) == 2
    err = capsys.readouterr().err
    assert "asks for 6 model chunks but the model has 4 layers: use --vpp 2 or fewer" in err
