"""Step-boundary decisions that need every rank's view, agreed without blocking a step.

Time-based policies, preemption signals, the catalog's rollback pointer and whether each
tier's flusher is free are known per rank; the job must act on them at the same step on every
rank. Agreeing synchronously at every step would put a blocking all-reduce in ``step()`` —
hundreds of milliseconds per step at thousands of ranks. Instead, at boundary ``b`` each rank
starts an asynchronous all-reduce (max) of its flags on the engine's gloo group and reads the
one it started at boundary ``b - 1``: by then the training step in between has synchronised
the ranks, so it has completed and reading it does not wait. Every rank reads the same sample
at the same boundary, so decisions stay identical.

The bound this gives: a flag raised on any rank between boundaries ``b - 1`` and ``b`` is acted
on by every rank at boundary ``b + 1`` — a preemption signal is honoured at the second step
boundary after it arrives (the first one at world size 1, where no agreement is needed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckptd.engine.coordination import Coordinator


@dataclass(frozen=True, slots=True)
class Sample:
    """Flags agreed by every rank (element-wise max) and the boundary they were taken at."""

    boundary: int
    flags: list[int]


class StepAgreement:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.boundary = 0
        self._pending: tuple[int, Callable[[], list[int]]] | None = None

    @property
    def lag(self) -> int:
        """Step boundaries between raising a flag and acting on it everywhere."""
        return 0 if self.coordinator.world_size == 1 else 1

    def exchange(self, flags: list[int]) -> Sample | None:
        """Called once per step boundary on every rank: offers this rank's ``flags`` and returns the
        agreed sample of an earlier boundary (this one at world size 1), or None at the first."""
        self.boundary += 1
        if self.coordinator.world_size == 1:
            return Sample(self.boundary, list(flags))
        done: Sample | None = None
        if self._pending is not None:
            taken, result = self._pending
            done = Sample(taken, result())
        self._pending = (self.boundary, self.coordinator.start_max_all(flags))
        return done

    def now(self, flags: list[int]) -> Sample:
        """Agree synchronously (explicit calls: ``save()``, ``wait()``): every rank blocks here."""
        return Sample(self.boundary, self.coordinator.agree_max_all(flags))

    def drain(self) -> None:
        """Consume the outstanding all-reduce (collective order must match on every rank at close)."""
        if self._pending is not None:
            _, result = self._pending
            self._pending = None
            result()
