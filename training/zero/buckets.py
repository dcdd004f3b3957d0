"""Gradient reduction over data parallelism in buckets, launched while backward still runs.

Parameters are grouped into buckets of about ``bucket_mb`` (fp32 bytes of their full local
gradients), per pipeline chunk and in reverse registration order — roughly the order backward
finishes them. When every member of a bucket has reported its gradient, one asynchronous
collective over the dp group starts on the bucket's flat buffer:

* ZeRO 0 and 1: an all-reduce; each rank then keeps the rows it owns (all of them at stage 0);
* ZeRO 2 and 3: a reduce-scatter of the members' packed shards, so each rank receives only its
  own rows (gloo has no reduce-scatter: there it is an all-reduce of the same buffer, then a slice).

Results are added, divided by dp, to the optimizer's fp32 gradient pieces when the work is
waited for: when more than ``max_inflight`` buckets are outstanding (bounding the buffers held)
and at :meth:`finish`, before the optimizer step. Every dp rank runs the same backward, so
buckets complete — and collectives start — in the same order on every rank.

A member reporting twice before its bucket launches (a tied weight used twice, or micro-batches
of two interleaved chunks) accumulates: by linearity the reduced sum is unchanged. At
:meth:`finish`, partly filled buckets are sent with zeros for the silent members.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ckptd.training.mesh import Group, group_rank, group_size

if TYPE_CHECKING:
    from ckptd.training.zero.optimizer import ParamState


@dataclass(slots=True, eq=False)
class _Bucket:
    members: list[ParamState]
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    """Member index -> its fp32 full local gradient, until the bucket launches."""


@dataclass(slots=True, eq=False)
class _Launched:
    bucket: _Bucket
    flat: torch.Tensor
    work: dist.Work | None
    out: torch.Tensor | None = None
    """NCCL reduce-scatter output (this rank's block)."""


class GradBuckets:
    """One rank's bucketed reduction of its stage's gradients."""

    def __init__(
        self,
        chunks: list[list[ParamState]],
        group: Group,
        *,
        scatter: bool,
        bucket_bytes: int,
        max_inflight: int = 2,
    ) -> None:
        self.group, self.scatter, self.max_inflight = group, scatter, max_inflight
        self.dp, self.dp_rank = group_size(group), group_rank(group)
        self.buckets: list[_Bucket] = []
        self._where: dict[int, tuple[_Bucket, int]] = {}
        for states in chunks:
            current: list[ParamState] = []
            size = 0
            for st in reversed(states):  # backward reaches the last-registered parameters first
                current.append(st)
                size += st.param_numel * 4
                if size >= bucket_bytes:
                    self._close(current)
                    current, size = [], 0
            if current:
                self._close(current)
        self._launched: deque[_Launched] = deque()

    def _close(self, members: list[ParamState]) -> None:
        bucket = _Bucket(list(members))
        self.buckets.append(bucket)
        for i, st in enumerate(members):
            self._where[id(st)] = (bucket, i)

    def add(self, st: ParamState, grad: torch.Tensor) -> None:
        """``st``'s full local gradient of one backward is complete."""
        bucket, i = self._where[id(st)]
        g = grad.detach().float()
        bucket.grads[i] = g if i not in bucket.grads else bucket.grads[i] + g
        if len(bucket.grads) == len(bucket.members):
            self._launch(bucket)

    def finish(self) -> None:
        """Launch partly filled buckets, wait for every reduction, fill the optimizer's gradients."""
        for bucket in self.buckets:
            if bucket.grads:
                for i, st in enumerate(bucket.members):
                    if i not in bucket.grads:
                        bucket.grads[i] = torch.zeros(st.full_shape, dtype=torch.float32, device=st.device)
                self._launch(bucket)
        while self._launched:
            self._complete(self._launched.popleft())

    def reset(self) -> None:
        """Forget unreduced gradients (zero_grad of an abandoned step); outstanding work is waited for."""
        while self._launched:
            launched = self._launched.popleft()
            if launched.work is not None:
                launched.work.wait()
        for bucket in self.buckets:
            bucket.grads.clear()

    # ------------------------------------------------------------ collectives
    def _launch(self, bucket: _Bucket) -> None:
        grads = [bucket.grads.pop(i) for i in range(len(bucket.members))]
        if self.scatter:
            # Packed layout per member: (dp, its width); side by side, rank r's block is row r.
            rows = [
                st.shards.pack_all(g).reshape(self.dp, -1)
                for st, g in zip(bucket.members, grads, strict=True)
            ]
            flat = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0].contiguous()
        else:
            flat = torch.cat([g.reshape(-1) for g in grads])
        launched = _Launched(bucket, flat, None)
        if self.group is not None:
            if self.scatter and dist.get_backend(self.group) != "gloo":
                launched.out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
                launched.work = dist.reduce_scatter_tensor(
                    launched.out, flat.reshape(-1), group=self.group, async_op=True
                )
            else:
                launched.work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._launched.append(launched)
        while len(self._launched) > self.max_inflight:
            self._complete(self._launched.popleft())

    def _complete(self, launched: _Launched) -> None:
        if launched.work is not None:
            launched.work.wait()
        members = launched.bucket.members
        if self.scatter:
            own = launched.out if launched.out is not None else launched.flat[self.dp_rank]
            at = 0
            for st in members:
                width = sum(st.shards.cells) * st.row_numel
                packed = own[at : at + width].reshape(sum(st.shards.cells), *st.shards.rest)
                st.add_grad([g / self.dp for g in st.shards.unpad_own(packed)])
                at += width
        else:
            at = 0
            for st in members:
                full = launched.flat[at : at + st.param_numel].reshape(st.full_shape) / self.dp
                st.add_grad(st.shards.take(full))
                at += st.param_numel
