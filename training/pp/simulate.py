"""Replay a pipeline schedule with fixed costs: makespan, bubble fraction, deadlock check.

Each rank runs its ops (see :mod:`ckptd.training.pp.order`) strictly in order; an op starts
when its rank is free and its input exists: a forward of model chunk ``c`` needs the forward
of chunk ``c - 1`` on the same micro-batch, a backward needs the backward of chunk ``c + 1``
(the last chunk's backward needs its own forward). Messages take no time. Costs are exact
fractions, so the results are exact: with a forward costing ``f`` and a backward ``b`` per
*stage* (a chunk costs ``1 / vpp`` of that), plain 1F1B has a bubble of ``(pp - 1) / m`` of
the ideal time ``m * (f + b)`` and interleaved 1F1B ``(pp - 1) / (vpp * m)``.

The trainer logs :func:`bubble_fraction` of its configuration at start; the tests replay
the orders to show the bubble and that no order can deadlock (a rank waiting for an input
that is only produced after its own next op).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ckptd.training.pp.order import Op, rank_order


class ScheduleDeadlock(RuntimeError):
    """Every rank waits for an input that no rank can produce next."""


@dataclass(frozen=True, slots=True)
class Timeline:
    makespan: Fraction
    busy: Fraction
    """Compute time of one rank (the same on every rank)."""
    spans: dict[int, list[tuple[Op, Fraction, Fraction]]]
    """Per rank, every op with its start and end, in execution order."""

    @property
    def bubble_fraction(self) -> Fraction:
        """Idle time of a rank relative to its compute time: ``(makespan - busy) / busy``."""
        return (self.makespan - self.busy) / self.busy


def simulate(
    kind: str, pp: int, n_micro: int, vpp: int = 1, *, forward: Fraction = Fraction(1),
    backward: Fraction = Fraction(2),
) -> Timeline:  # fmt: skip
    """Run every rank's order as soon as dependencies allow; ``forward``/``backward`` are per stage."""
    orders = {r: rank_order(kind, pp, r, n_micro, vpp) for r in range(pp)}
    last = pp * vpp - 1
    cost = {"F": Fraction(forward) / vpp, "B": Fraction(backward) / vpp}
    done: dict[tuple[str, int, int], Fraction] = {}
    """(kind, model chunk, micro-batch) -> finish time."""
    free = dict.fromkeys(range(pp), Fraction(0))
    nxt = dict.fromkeys(range(pp), 0)
    spans: dict[int, list[tuple[Op, Fraction, Fraction]]] = {r: [] for r in range(pp)}
    remaining = sum(len(o) for o in orders.values())
    while remaining:
        progressed = False
        for r in range(pp):
            while nxt[r] < len(orders[r]):
                op = orders[r][nxt[r]]
                c = op.chunk * pp + r
                if op.kind == "F":
                    dep = ("F", c - 1, op.micro) if c > 0 else None
                else:
                    dep = ("F", c, op.micro) if c == last else ("B", c + 1, op.micro)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] if dep is not None else Fraction(0))
                end = start + cost[op.kind]
                done[(op.kind, c, op.micro)] = end
                spans[r].append((op, start, end))
                free[r], nxt[r] = end, nxt[r] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][nxt[r]] for r in range(pp) if nxt[r] < len(orders[r])}
            raise ScheduleDeadlock(f"{kind} pp={pp} vpp={vpp} m={n_micro}: ranks wait on {stuck}")
    busy = n_micro * (Fraction(forward) + Fraction(backward))
    return Timeline(makespan=max(free.values()), busy=busy, spans=spans)


def bubble_fraction(kind: str, pp: int, n_micro: int, vpp: int = 1) -> float:
    """The schedule's idle fraction with backward = 2 x forward (a transformer's usual ratio)."""
    if pp == 1:
        return 0.0
    return float(simulate(kind, pp, n_micro, vpp).bubble_fraction)
