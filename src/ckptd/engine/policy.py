"""When to save (per tier) and which committed checkpoints to keep (per tier).

Both are pure functions of steps, clocks and metrics so they can be tested without any
I/O, and so that every rank reaches the same decision for step-based policies without
talking to the others (time-based decisions are agreed by the checkpointer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ckptd.engine.config import Retention, TierConfig


class SavePolicy:
    """Decides whether a tier wants a snapshot at a step boundary."""

    def __init__(self, tier: TierConfig, *, now: float) -> None:
        self.every = tier.every
        self.every_seconds = tier.every_seconds
        self._last_time = now
        self._last_step: int | None = None

    def due_by_step(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0 and step != self._last_step

    def due_by_time(self, now: float) -> bool:
        return self.every_seconds is not None and now - self._last_time >= self.every_seconds

    def saved(self, step: int, now: float) -> None:
        """Record that this tier took a snapshot (the time clock restarts)."""
        self._last_step = step
        self._last_time = now


def to_delete(
    steps: Sequence[int],
    rule: Retention,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
) -> list[int]:
    """Committed ``steps`` that ``rule`` lets go, ascending. The newest step is never among them.

    Checkpoints without the metric never count as "best" (and are kept or dropped by
    the other rules), so a crash-time checkpoint without metrics cannot evict a good one.
    """
    ordered = sorted(set(steps))
    if not ordered or rule.keeps_everything:
        return []
    keep = {ordered[-1]}
    if rule.keep_last is not None:
        keep.update(ordered[-rule.keep_last:])
    if rule.keep_every is not None:
        keep.update(s for s in ordered if s % rule.keep_every == 0)
    if rule.keep_best is not None and rule.metric is not None:
        scored: list[tuple[float, int]] = []
        for s in ordered:
            value = (metrics or {}).get(s, {}).get(rule.metric)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                # ties go to the newer step (it has trained longer)
                scored.append((value if rule.mode == "min" else -value, -s))
        scored.sort()
        keep.update(-neg_step for _, neg_step in scored[: rule.keep_best])
    return [s for s in ordered if s not in keep]
