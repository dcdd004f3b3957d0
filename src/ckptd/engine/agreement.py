"""Step-boundary decisions that need every rank's view, agreed without blocking a step.

Time-based policies, preemption signals, the catalog's rollback pointer and whether each
tier's flusher is free are known per rank; the job must act on them at the same step on every
rank. Agreeing synchronously at every step would put a blocking all-reduce in ``step()`` —
hundreds of milliseconds per step at thousands of ranks. Instead, at boundary ``b`` each rank
starts an asynchronous all-reduce (max) of its flags on the engine's gloo group and reads the
one it started at boundary ``b - 1``: by then the training step in between has synchronised
the ranks, so it has completed and reading it does not wait. Every rank reads the same sample
at the same boundary, so decisions stay identical.

With ``every = k`` an agreement starts only at every k-th boundary and is read at the next one.
The bound this gives: a flag raised on any rank is acted on by every rank within ``2k`` step
boundaries (k = 1: at the second boundary after it is raised); at world size 1 no agreement is
needed and flags act at the next boundary.
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
    def __init__(self, coordinator: Coordinator, every: int = 1) -> None:
        self.coordinator = coordinator
        self.every = every
        self.boundary = 0
        self._pending: tuple[int, Callable[[], list[int]]] | None = None

    @property
    def bound(self) -> int:
        """At most this many step boundaries between raising a flag and acting on it everywhere."""
        return 1 if self.coordinator.world_size == 1 else 2 * self.every

    def exchange(self, flags: list[int]) -> Sample | None:
        """Called once per step boundary on every rank: offers this rank's ``flags`` and returns the
        agreed sample of an earlier boundary (this one at world size 1), or None at the first."""
        self.boundary += 1
        if self.coordinator.world_size == 1:
            return Sample(self.boundary, list(flags))
        if self.boundary % self.every:
            return None
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
