"""What the ranks vote on, as typed values: the step-boundary vote and the restore vote.

Ranks agree through an element-wise max of int vectors (``Coordinator.agree_max_all``). These
frozen dataclasses are what the engine reasons about; ``encode`` and ``decode`` are the only
places that know the vector layout, so a field is never read from the wrong slot.

Optional steps travel as ``step + 1`` with 0 for "none": only rank 0 proposes a step, the other
ranks send 0, and the max is rank 0's proposal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _encode_step(step: int | None) -> int:
    return 0 if step is None else step + 1


def _decode_step(value: int) -> int | None:
    return value - 1 if value > 0 else None


@dataclass(frozen=True, slots=True)
class BoundaryVote:
    """One rank's view at a step boundary; the agreed vote is the per-field max (logical or)."""

    preempt: bool
    """A preemption signal (SIGTERM, SIGUSR1) was received."""
    terminate: bool
    """The signal asks the process to exit once the checkpoint is durable."""
    rollback_to: int | None
    """The step of the catalog's rollback pointer (rank 0 alone knows it), else None."""
    timed: tuple[bool, ...]
    """Per tier (fastest first): its time-based policy is due."""
    busy: tuple[bool, ...]
    """Per durable tier: its flusher is still persisting."""

    def encode(self) -> list[int]:
        return [int(self.preempt), int(self.terminate), _encode_step(self.rollback_to),
                *map(int, self.timed), *map(int, self.busy)]

    @staticmethod
    def decode(flags: Sequence[int], *, tiers: int, flushers: int) -> BoundaryVote:
        if len(flags) != 3 + tiers + flushers:
            raise RuntimeError(f"a boundary vote for {tiers} tiers and {flushers} flushers has "
                               f"{3 + tiers + flushers} slots, got {len(flags)}")
        return BoundaryVote(preempt=bool(flags[0]), terminate=bool(flags[1]),
                            rollback_to=_decode_step(flags[2]),
                            timed=tuple(map(bool, flags[3 : 3 + tiers])),
                            busy=tuple(map(bool, flags[3 + tiers :])))


@dataclass(frozen=True, slots=True)
class RestoreVote:
    """Rank 0's resolution of ``restore(select=...)``, shared with every rank."""

    step: int | None
    """The step to restore, or None for the newest committed one."""
    failed: bool
    """Rank 0 could not resolve the selection (every rank raises)."""
    from_pointer: bool
    """The step comes from the catalog's rollback pointer (newer checkpoints are discarded)."""

    def encode(self) -> list[int]:
        return [_encode_step(self.step), int(self.failed), int(self.from_pointer)]

    @staticmethod
    def decode(flags: Sequence[int]) -> RestoreVote:
        if len(flags) != 3:
            raise RuntimeError(f"a restore vote has 3 slots, got {len(flags)}")
        return RestoreVote(step=_decode_step(flags[0]), failed=bool(flags[1]), from_pointer=bool(flags[2]))
