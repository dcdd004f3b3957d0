"""The order in which each pipeline rank runs its forwards and backwards: GPipe, 1F1B, interleaved.

An :class:`Op` is one forward or backward of one micro-batch through one of the rank's model
chunks. With ``vpp`` chunks per rank the model has ``pp * vpp`` chunks; model chunk ``c`` lives
on rank ``c % pp`` as its local chunk ``c // pp``.

* **GPipe**: every forward, then every backward.
* **1F1B** (PipeDream-flush): ``pp - rank - 1`` warm-up forwards, then one forward and one
  backward alternately, then the remaining backwards: at most ``pp - rank`` micro-batches in flight.
* **Interleaved 1F1B** (Narayanan et al., 2021; Megatron-LM's
  ``forward_backward_pipelining_with_interleaving``): micro-batches go through the chunks in
  groups of ``pp``: forward step ``k`` runs local chunk ``(k // pp) % vpp`` on micro-batch
  ``(k // (pp * vpp)) * pp + k % pp``; backward step ``k`` the same micro-batch on the chunks in
  reverse. Warm-up is ``2 * (pp - rank - 1) + (vpp - 1) * pp`` forward steps. Each chunk is
  ``1 / vpp`` of a stage, so the pipeline fills and drains ``vpp`` times faster: the bubble
  shrinks from ``(pp - 1) / m`` to ``(pp - 1) / (vpp * m)`` at the cost of ``vpp`` times the
  point-to-point messages.

:mod:`ckptd.training.pp.simulate` replays these orders with unit costs to check the bubble.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B"]


@dataclass(frozen=True, slots=True)
class Op:
    kind: Kind
    chunk: int
    """Local chunk index on the rank (0 without interleaving)."""
    micro: int


def gpipe_order(n_micro: int) -> list[Op]:
    return [Op("F", 0, i) for i in range(n_micro)] + [Op("B", 0, i) for i in range(n_micro)]


def one_f_one_b_order(pp: int, rank: int, n_micro: int) -> list[Op]:
    warmup = min(pp - rank - 1, n_micro)
    ops = [Op("F", 0, i) for i in range(warmup)]
    for i in range(n_micro - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    ops += [Op("B", 0, i) for i in range(n_micro - warmup, n_micro)]
    return ops


def interleaved_order(pp: int, rank: int, n_micro: int, vpp: int) -> list[Op]:
    """Megatron-LM's interleaved 1F1B order for one rank (``n_micro`` a multiple of ``pp``)."""
    if n_micro % pp:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({n_micro}) to be a multiple of pp ({pp})")
    total = n_micro * vpp

    def at(k: int, forward: bool) -> Op:
        in_group = k % (pp * vpp)
        chunk = in_group // pp
        micro = (k // (pp * vpp)) * pp + k % pp
        return Op("F", chunk, micro) if forward else Op("B", vpp - 1 - chunk, micro)

    # Megatron: with a single group of pp micro-batches every forward runs first.
    warmup = total if n_micro == pp else min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    ops = [at(k, True) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [at(warmup + i, True), at(i, False)]
    ops += [at(k, False) for k in range(total - warmup, total)]
    return ops


def rank_order(kind: str, pp: int, rank: int, n_micro: int, vpp: int = 1) -> list[Op]:
    """The op sequence of pipeline rank ``rank`` for schedule ``kind`` ("gpipe" or "1f1b")."""
    if kind == "gpipe":
        if vpp != 1:
            raise ValueError("GPipe has no interleaved form here: use 1f1b with vpp > 1")
        return gpipe_order(n_micro)
    if vpp == 1:
        return one_f_one_b_order(pp, rank, n_micro)
    return interleaved_order(pp, rank, n_micro, vpp)


def last_backwards(order: list[Op]) -> set[Op]:
    """The final backward of each chunk: after it that chunk's gradients are complete for the step."""
    last: dict[int, Op] = {}
    for op in order:
        if op.kind == "B":
            last[op.chunk] = op
    return set(last.values())
