"""The snapshot stager on CPU at its edges: chunked lazy copies of odd sizes and strided tensors
hold the boundary values, optimizer-owned tensors are copied in the background and waited for by
the optimizer, other tensors before ``stage`` returns, a failed copy fails its snapshot (not the
copy thread), ``close`` stops the copy thread for good, the defaults copy optimizer state lazily,
finished copies do not keep old snapshots alive, and the hooks' wait time adds up."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest
import torch

from ckptd.engine.pool import HostPool
from ckptd.engine.snapshot import Snapshot, Stager
from ckptd.format.errors import StorageError

COPY_CHUNK_BYTES = 24  # 6 floats: odd sizes leave a short last chunk


def _copied(snap: Snapshot, within_s: float = 20.0) -> bool:
    """Whether the snapshot reports its copies complete within ``within_s`` (never hangs)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if snap.copied is True:
            return True
        time.sleep(0.002)
    return False


def _stage(stager: Stager, step: int, tensors: dict[str, torch.Tensor], opt: Any) -> Snapshot:
    return stager.stage(step=step, skeleton={"s": step}, tensors=tensors, specs={}, rank_state={"r": step},
                        metrics={"m": float(step)}, optimizers=[opt] if opt is not None else [])


def _copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ckptd-copy"]


def test_lazy_copies_hold_the_boundary_values_of_every_shape() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(24_001, generator=g).requires_grad_()  # 4001 chunk copies, a short last one
    strided = torch.randn(37, 41, generator=g).t().requires_grad_()  # not contiguous: one copy
    exact = torch.randn(6, generator=g).requires_grad_()  # exactly one chunk
    opt = torch.optim.SGD([big, strided, exact], lr=1.0)
    buf = torch.arange(1001, dtype=torch.float64)  # no optimizer owns it
    scalar = torch.tensor(5, dtype=torch.int64)
    tensors = {"big": big, "strided": strided, "exact": exact, "buf": buf, "scalar": scalar}
    want = {k: v.detach().clone() for k, v in tensors.items()}
    pool = HostPool(max_slots=2)
    stager = Stager(pool, lazy=True, chunk_bytes=COPY_CHUNK_BYTES)
    stager.guard([opt])
    snap = _stage(stager, 7, tensors, opt)
    assert snap.copied is False  # the optimizer-owned tensors are still being copied
    buf.mul_(-1.0)  # not optimizer-owned: already copied when stage returned
    for p in (big, strided, exact):
        p.grad = torch.ones_like(p)
    opt.step()  # the pre-step hook waits for this optimizer's copies
    assert 0.0 < stager.hook_wait_s < 60.0
    assert _copied(snap)
    snap.wait_copied()
    assert snap.step == 7 and snap.paths == list(tensors) and snap.skeleton == {"s": 7}
    assert snap.rank_state == {"r": 7} and snap.metrics == {"m": 7.0} and snap.specs == {}
    for k, v in want.items():
        got = snap.host[k]
        assert got.shape == v.shape and got.dtype == v.dtype and torch.equal(got, v), k
    assert snap.nbytes == sum(v.numel() * v.element_size() for v in want.values())
    assert not torch.equal(big.detach(), want["big"])  # the step really changed the live tensor
    snap.release()
    stager.close()


def test_eager_mode_copies_everything_before_stage_returns() -> None:
    p = torch.randn(30_000).requires_grad_()
    opt = torch.optim.SGD([p], lr=1.0)
    stager = Stager(HostPool(max_slots=1), lazy=False, chunk_bytes=COPY_CHUNK_BYTES)
    stager.guard([opt])
    want = p.detach().clone()
    snap = _stage(stager, 1, {"p": p}, opt)
    assert snap.copied is True
    snap.wait_copied()  # nothing failed: returns without an error
    with torch.no_grad():
        p.mul_(3.0)  # unguarded change right after stage: the copy is already complete
    assert torch.equal(snap.host["p"], want) and stager.hook_wait_s == 0.0
    stager.close()


class _FailingCopy(torch.Tensor):
    """A parameter whose copy out raises, as a failing device or a freed buffer would."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.copy_:
            raise RuntimeError("device lost")
        return super().__torch_function__(func, types, args, kwargs or {})  # type: ignore[no-untyped-call]


def test_a_failed_lazy_copy_fails_its_snapshot_and_the_next_one_works() -> None:
    bad = torch.zeros(10).as_subclass(_FailingCopy).requires_grad_()
    good = torch.arange(12.0).requires_grad_()
    opt = torch.optim.SGD([bad, good], lr=1.0)
    pool = HostPool(max_slots=2)
    stager = Stager(pool, lazy=True, chunk_bytes=COPY_CHUNK_BYTES)
    snap = _stage(stager, 3, {"good": good, "bad": bad}, opt)
    assert _copied(snap)
    with pytest.raises(StorageError, match=r"^snapshot of step 3 failed: device lost$"):
        snap.wait_copied()
    snap.release()
    # the copy thread survived: a later snapshot of healthy tensors completes and is exact
    opt2 = torch.optim.SGD([good], lr=1.0)
    snap2 = _stage(stager, 4, {"good": good}, opt2)
    assert _copied(snap2)
    snap2.wait_copied()
    assert torch.equal(snap2.host["good"], torch.arange(12.0))
    snap2.release()
    stager.close()


def test_a_failed_eager_copy_raises_from_stage_and_frees_its_slot() -> None:
    pool = HostPool(max_slots=1)
    stager = Stager(pool, lazy=True, chunk_bytes=COPY_CHUNK_BYTES)
    with pytest.raises(RuntimeError, match="device lost"):
        _stage(stager, 1, {"x": torch.zeros(4).as_subclass(_FailingCopy)}, None)
    # the only slot was given back: the next snapshot gets it at once
    snap = _stage(stager, 2, {"x": torch.ones(4)}, None)
    assert torch.equal(snap.host["x"], torch.ones(4))
    snap.release()
    stager.close()


def test_close_stops_the_copy_thread_and_a_reused_stager_starts_a_new_one() -> None:
    before = len(_copy_threads())
    p = torch.randn(1000).requires_grad_()
    opt = torch.optim.SGD([p], lr=1.0)
    stager = Stager(HostPool(max_slots=2), lazy=True, chunk_bytes=COPY_CHUNK_BYTES)
    stager.guard([opt])
    snap = _stage(stager, 1, {"p": p}, opt)
    started = _copy_threads()
    assert len(started) == before + 1 and all(t.daemon for t in started)
    stager.close()
    assert snap.copied is True and torch.equal(snap.host["p"], p.detach())
    assert len(_copy_threads()) == before
    snap.release()
    snap2 = _stage(stager, 2, {"p": p}, opt)  # used again after close: copies still happen
    assert _copied(snap2) and torch.equal(snap2.host["p"], p.detach())
    snap2.release()
    stager.close()
    assert len(_copy_threads()) == before


def test_a_default_stager_copies_optimizer_state_in_the_background() -> None:
    # The defaults are lazy, and an optimizer's state (a momentum buffer here) is its own like its
    # parameters: a failing copy of it fails the snapshot later, never ``stage`` itself.
    p = torch.arange(8.0).requires_grad_()
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    opt.state[p]["momentum_buffer"] = torch.zeros(8).as_subclass(_FailingCopy)
    stager = Stager(HostPool(max_slots=1))
    snap = _stage(stager, 2, {"p": p, "momentum": opt.state[p]["momentum_buffer"]}, opt)
    with pytest.raises(StorageError, match=r"^snapshot of step 2 failed: device lost$"):
        snap.wait_copied()
    snap.release()
    stager.close()


def test_a_never_stepped_optimizer_does_not_keep_old_snapshots_alive() -> None:
    p = torch.randn(100).requires_grad_()
    opt = torch.optim.SGD([p], lr=1.0)
    stager = Stager(HostPool(max_slots=2), lazy=True, chunk_bytes=COPY_CHUNK_BYTES)
    stager.guard([opt])
    first = _stage(stager, 1, {"p": p}, opt)
    first.wait_copied()
    first.release()
    gone = weakref.ref(first)
    del first
    second = _stage(stager, 2, {"p": p}, opt)
    second.wait_copied()  # the copy thread runs in order: the first copy is finished for good now
    second.release()
    third = _stage(stager, 3, {"p": p}, opt)
    gc.collect()
    assert gone() is None  # its host memory is not held by the optimizer's finished entries
    third.wait_copied()
    third.release()
    stager.close()


class _GatedCopy(torch.Tensor):
    """A tensor whose copy out waits for ``gate``: holds the copy thread until the test opens it."""

    gate = threading.Event()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.copy_:
            cls.gate.wait(60.0)
        return super().__torch_function__(func, types, args, kwargs or {})  # type: ignore[no-untyped-call]


def test_hook_wait_time_adds_up_over_steps() -> None:
    _GatedCopy.gate.clear()
    held = torch.zeros(4).as_subclass(_GatedCopy).requires_grad_()
    p = torch.randn(50).requires_grad_()
    other, opt = torch.optim.SGD([held], lr=1.0), torch.optim.SGD([p], lr=1.0)
    stager = Stager(HostPool(max_slots=2), lazy=True, chunk_bytes=COPY_CHUNK_BYTES)
    stager.guard([opt])
    # p's copy is queued behind the held one, so the first step's hook waits until the gate opens
    snap = stager.stage(step=1, skeleton={}, tensors={"held": held, "p": p}, specs={}, rank_state={},
                        metrics={}, optimizers=[other, opt])
    opener = threading.Timer(0.2, _GatedCopy.gate.set)
    opener.start()
    p.grad = torch.ones_like(p)
    opt.step()
    opener.join()
    first_wait = stager.hook_wait_s
    snap.release()
    snap2 = _stage(stager, 2, {"p": p}, opt)
    snap2.wait_copied()
    opt.step()  # a second (short) wait is added to the total, not put in its place
    assert stager.hook_wait_s > first_wait > 0.0
    snap2.release()
    stager.close()
