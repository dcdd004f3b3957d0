"""The host staging pool: snapshot slots allocated once and reused for the whole run.

Allocating pinned memory is slow (4 GiB took 1.7 s on an H200 host) and pageable copies
are 40x slower than pinned ones, so the pool allocates each slot the first time it is
needed and then hands the same memory out again and again. A slot is one flat byte arena;
a snapshot carves aligned tensor views out of it. Slots are reference counted: the memory
tier, a pending flush and a running flush may all hold the same snapshot, and the slot
returns to the pool when the last of them lets go.

Memory is pinned only when CUDA is available: on CPU-only machines pinning buys nothing
and plain host memory is used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from ckptd.format.errors import ConfigError, StorageError

ALIGN = 64  # bytes: every carved view starts on a cache line (and satisfies any dtype's alignment)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def arena_bytes(sizes: Sequence[int]) -> int:
    return sum(aligned(n) for n in sizes)


class Slot:
    """One arena of host memory and the number of holders of the snapshot in it."""

    __slots__ = ("arena", "index", "refs")

    def __init__(self, index: int, arena: torch.Tensor) -> None:
        self.index = index
        self.arena = arena
        self.refs = 0

    @property
    def capacity(self) -> int:
        return int(self.arena.numel())

    def carve(self, specs: Sequence[tuple[torch.Size | tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
        """Contiguous views, one per ``(shape, dtype)``, laid out back to back."""
        views: list[torch.Tensor] = []
        offset = 0
        for shape, dtype in specs:
            numel = 1
            for s in shape:
                numel *= int(s)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            flat = self.arena[offset: offset + nbytes]
            views.append(flat.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype))
            offset += aligned(nbytes)
        return views


class HostPool:
    """A bounded set of reusable snapshot slots.

    ``acquire`` hands out a free slot (growing it when the state grew, which happens once
    when lazily created optimizer state appears), allocates a new one while under the slot
    and byte budgets, asks ``evict`` to free one (the memory tier drops its oldest
    snapshot), and otherwise waits for a flush to finish: bounded memory, never an error.
    """

    def __init__(self, *, max_slots: int, budget_bytes: int | None = None, pin: bool | None = None) -> None:
        if max_slots < 1:
            raise RuntimeError(f"the host pool needs at least one slot, got {max_slots}")  # a ckptd bug
        self.max_slots = max_slots
        self.budget_bytes = budget_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._slots: list[Slot] = []
        self._free: list[Slot] = []
        self._cond = threading.Condition()
        self.allocations = 0
        """How many arenas were ever allocated (tests pin reuse with it)."""

    @property
    def allocated_bytes(self) -> int:
        return sum(s.capacity for s in self._slots)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        # Round up so a state that grows a little (a new scalar) does not force a new arena.
        size = aligned(nbytes + nbytes // 64 + ALIGN)
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def acquire(self, nbytes: int, *, evict: Callable[[], bool] | None = None,
                timeout: float | None = None) -> Slot:
        """A slot of at least ``nbytes`` with one reference, for the caller's new snapshot."""
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise ConfigError(
                f"one snapshot needs {nbytes} bytes of host memory; host_budget_bytes is {self.budget_bytes}")
        with self._cond:
            while True:
                fitting = [s for s in self._free if s.capacity >= nbytes]
                if fitting:
                    slot = fitting[0]
                    self._free.remove(slot)
                    break
                if self._free and self._fits_budget(nbytes - self._free[0].capacity):
                    slot = self._free.pop(0)
                    slot.arena = torch.empty(0, dtype=torch.uint8)  # release before reallocating
                    slot.arena = self._allocate(nbytes)
                    break
                if len(self._slots) < self.max_slots and self._fits_budget(nbytes):
                    slot = Slot(len(self._slots), self._allocate(nbytes))
                    self._slots.append(slot)
                    break
                if evict is not None:
                    self._cond.release()
                    try:  # eviction releases a slot, which takes the lock
                        evicted = evict()
                    finally:
                        self._cond.acquire()
                    if evicted:
                        continue
                if not self._cond.wait(timeout):
                    raise StorageError("timed out waiting for a free host snapshot slot (a flush to "
                                       "storage is still running)")
            slot.refs = 1
            return slot

    def _fits_budget(self, extra: int) -> bool:
        return self.budget_bytes is None or self.allocated_bytes + extra <= self.budget_bytes

    def retain(self, slot: Slot) -> None:
        with self._cond:
            if slot.refs <= 0:
                raise RuntimeError("retaining a released snapshot slot")  # a ckptd bug
            slot.refs += 1

    def release(self, slot: Slot) -> None:
        with self._cond:
            if slot.refs <= 0:
                raise RuntimeError("releasing a snapshot slot twice")  # a ckptd bug
            slot.refs -= 1
            if slot.refs == 0:
                self._free.append(slot)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._free.clear()
            self._slots.clear()
