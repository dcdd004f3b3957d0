"""Snapshots: consistent host copies of the state, taken without stopping training.

A snapshot is taken at a step boundary. Training may go on at once; the only tensors
that must not change before their copy is done are the ones something will modify:

* tensors an optimizer in the state owns (parameters, moments, step counters) are copied
  lazily — on CUDA by chunked ``non_blocking`` copies on a dedicated copy stream ordered
  after the compute stream by an event, on CPU by a background copy thread — and the
  optimizer's pre-step hook waits for exactly the copies of its own tensors (on CUDA the
  wait is ``compute_stream.wait_event``: the GPU waits, the CPU never blocks);
* every other tensor (buffers a forward pass may update, user tensors) is copied before
  ``step()`` returns (CPU) or made a GPU-side dependency of the compute stream at once (CUDA).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckptd.engine.config import ShardSpec
from ckptd.engine.dtensor import local_tensor
from ckptd.engine.pool import HostPool, Slot, arena_bytes
from ckptd.format.errors import StorageError


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of a tensor's memory: state dicts hand out detached aliases of the live tensors.

    A DTensor (FSDP2 / tensor-parallel parameters and their Adam moments) is keyed by its local
    shard, which is what a snapshot copies."""
    t = local_tensor(t)
    return (t.device.type, t.untyped_storage().data_ptr())


class Snapshot:
    """Host copies of one step's tensors (in a pool slot) plus its JSON parts."""

    def __init__(self, *, step: int, skeleton: dict[str, Any], paths: list[str], host: list[torch.Tensor],
                 specs: Mapping[str, ShardSpec], rank_state: dict[str, Any], metrics: dict[str, float],
                 slot: Slot, pool: HostPool) -> None:
        self.step = step
        self.skeleton = skeleton
        self.paths = paths
        self.host = dict(zip(paths, host, strict=True))
        self.specs = specs
        self.rank_state = rank_state
        self.metrics = metrics
        self._slot = slot
        self._pool = pool
        self._cond = threading.Condition()
        self._cpu_pending = 0
        self._error: BaseException | None = None
        self._events: list[torch.cuda.Event] = []
        self.nbytes = sum(t.numel() * t.element_size() for t in host)

    # ---------------------------------------------------------------- lifetime
    def retain(self) -> Snapshot:
        self._pool.retain(self._slot)
        return self

    def release(self) -> None:
        self._pool.release(self._slot)

    # ---------------------------------------------------------------- copy progress
    def _cpu_started(self, n: int) -> None:
        with self._cond:
            self._cpu_pending += n

    def _cpu_done(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._cpu_pending -= 1
            self._error = self._error or error
            self._cond.notify_all()

    def wait_copied(self) -> None:
        """Block until every host copy is complete (used by flush threads, never by training)."""
        with self._cond:
            while self._cpu_pending:
                self._cond.wait()
            if self._error is not None:
                raise StorageError(f"snapshot of step {self.step} failed: {self._error}") from self._error
        for ev in self._events:
            ev.synchronize()

    @property
    def copied(self) -> bool:
        with self._cond:
            if self._cpu_pending:
                return False
        return all(ev.query() for ev in self._events)  # type: ignore[no-untyped-call]


class _CpuJob:
    __slots__ = ("done", "dst", "snapshot", "src")

    def __init__(self, snapshot: Snapshot, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.snapshot, self.src, self.dst = snapshot, src, dst
        self.done = threading.Event()


class Stager:
    """Takes snapshots into a ``HostPool`` and guards optimizers until their tensors are copied."""

    def __init__(self, pool: HostPool, *, lazy: bool = True, chunk_bytes: int = 64 * 2**20) -> None:
        self.pool = pool
        self.lazy = lazy
        self.chunk_bytes = chunk_bytes
        self._jobs: queue.SimpleQueue[_CpuJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # per optimizer (by id): a CPU "done" flag per pending lazy tensor, or a CUDA event
        self._pending_cpu: dict[int, list[tuple[Snapshot, threading.Event]]] = {}
        self._pending_cuda: dict[int, torch.cuda.Event] = {}
        self._owners: dict[tuple[str, int], int] = {}
        self._hooks: list[Any] = []
        self._copy_stream: torch.cuda.Stream | None = None
        self.hook_wait_s = 0.0
        """Total time optimizer hooks spent waiting for copies (the only blocking the lazy path adds)."""

    # ---------------------------------------------------------------- optimizers
    def guard(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Register pre-step hooks; tensors owned by these optimizers become lazily copied."""
        for opt in optimizers:
            key = id(opt)
            for group in opt.param_groups:
                for p in group["params"]:
                    self._owners[storage_key(p)] = key
                    for v in opt.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor):
                            self._owners[storage_key(v)] = key
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))

    def _refresh_owners(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        # Rebuilt at every snapshot: Adam creates its moments at the first step, load_state_dict
        # replaces them, and a freed tensor's address may be reused by a buffer the forward pass
        # updates — a stale entry would copy that buffer lazily, unguarded.
        owners: dict[tuple[str, int], int] = {}
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    owners[storage_key(p)] = id(opt)
                    for v in opt.state.get(p, {}).values():
                        if isinstance(v, torch.Tensor):
                            owners[storage_key(v)] = id(opt)
        self._owners = owners

    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ev = self._pending_cuda.pop(id(opt), None)
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)  # the GPU waits; this thread does not
        pending = self._pending_cpu.pop(id(opt), None)
        if pending:
            t0 = time.perf_counter()
            for _, done in pending:
                done.wait()
            self.hook_wait_s += time.perf_counter() - t0

    def wait_all(self) -> None:
        """Wait for every pending copy (before restoring into the live tensors, or when closing)."""
        for opt_id in list(self._pending_cpu):
            for _, done in self._pending_cpu.pop(opt_id, []):
                done.wait()
        for ev in list(self._pending_cuda.values()):
            ev.synchronize()
        self._pending_cuda.clear()

    # ---------------------------------------------------------------- snapshots
    def stage(self, *, step: int, skeleton: dict[str, Any], tensors: Mapping[str, torch.Tensor],
              specs: Mapping[str, ShardSpec], rank_state: dict[str, Any], metrics: dict[str, float],
              optimizers: Sequence[torch.optim.Optimizer], evict: Any = None) -> Snapshot:
        self._refresh_owners(optimizers)
        paths = list(tensors)
        srcs = [tensors[p] for p in paths]
        layout = [(tuple(t.shape), t.dtype) for t in srcs]
        slot = self.pool.acquire(arena_bytes([t.numel() * t.element_size() for t in srcs]), evict=evict)
        host = slot.carve(layout)
        snap = Snapshot(step=step, skeleton=skeleton, paths=paths, host=host, specs=specs,
                        rank_state=rank_state, metrics=metrics, slot=slot, pool=self.pool)
        lazy_cpu: list[tuple[int | None, torch.Tensor, torch.Tensor]] = []
        cuda_now: list[tuple[torch.Tensor, torch.Tensor]] = []
        cuda_lazy: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for src, dst in zip(srcs, host, strict=True):
                    owner = self._owners.get(storage_key(src)) if self.lazy else None
                    if src.device.type == "cuda":
                        if owner is None:
                            cuda_now.append((src, dst))
                        else:
                            cuda_lazy.append((owner, src, dst))
                    elif owner is None or src.device.type != "cpu":
                        dst.copy_(src)  # something other than an optimizer may change it: copy now
                    else:
                        lazy_cpu.append((owner, src, dst))
                if cuda_now or cuda_lazy:
                    self._stage_cuda(snap, cuda_now, cuda_lazy)
                for owner, src, dst in lazy_cpu:
                    self._stage_cpu(snap, owner, src, dst)
        except BaseException:
            snap.wait_copied() if lazy_cpu else None
            snap.release()
            raise
        return snap

    def _stage_cpu(self, snap: Snapshot, owner: int | None, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._copy_loop, name="ckptd-copy", daemon=True)
            self._thread.start()
        job = _CpuJob(snap, src, dst)
        snap._cpu_started(1)
        if owner is not None:
            pending = self._pending_cpu.setdefault(owner, [])
            # an optimizer that is never stepped must not accumulate finished entries
            pending[:] = [(s, d) for s, d in pending if not d.is_set()]
            pending.append((snap, job.done))
        self._jobs.put(job)

    def _copy_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            error: BaseException | None = None
            try:
                with torch.no_grad():
                    nbytes = job.src.numel() * job.src.element_size()
                    if job.src.is_contiguous() and nbytes > self.chunk_bytes:
                        s, d = job.src.reshape(-1), job.dst.reshape(-1)
                        step = max(1, self.chunk_bytes // max(1, job.src.element_size()))
                        for a in range(0, s.numel(), step):
                            d[a: a + step].copy_(s[a: a + step])
                    else:
                        job.dst.copy_(job.src)
            except BaseException as e:  # a failed copy fails the snapshot, never the copy thread
                error = e
            finally:
                job.snapshot._cpu_done(error)
                job.done.set()

    def _stage_cuda(self, snap: Snapshot, now: list[tuple[torch.Tensor, torch.Tensor]],
                    lazy: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        compute = torch.cuda.current_stream()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        copy = self._copy_stream
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(compute)  # everything computed so far is what the snapshot holds
        with torch.cuda.stream(copy):
            copy.wait_event(ready)
            for src, dst in now:
                self._copy_chunked(src, dst)
            if now:
                ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ev.record(copy)
                snap._events.append(ev)
                compute.wait_event(ev)  # forward may update these buffers: GPU-side dependency now
            last: dict[int, torch.cuda.Event] = {}
            for owner, src, dst in lazy:
                self._copy_chunked(src, dst)
                ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ev.record(copy)
                last[owner] = ev
                snap._events.append(ev)
            self._pending_cuda.update(last)

    def _copy_chunked(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        src.record_stream(torch.cuda.current_stream())  # the allocator must not reuse it mid-copy
        nbytes = src.numel() * src.element_size()
        if not src.is_contiguous() or nbytes <= self.chunk_bytes:
            dst.copy_(src, non_blocking=True)
            return
        s, d = src.reshape(-1), dst.reshape(-1)
        step = max(1, self.chunk_bytes // src.element_size())
        for a in range(0, s.numel(), step):
            d[a: a + step].copy_(s[a: a + step], non_blocking=True)

    def close(self) -> None:
        self.wait_all()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
