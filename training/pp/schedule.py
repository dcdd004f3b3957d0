"""Runs one step's micro-batches through this rank's pipeline chunks, in the order of
:mod:`ckptd.training.pp.order` (GPipe, 1F1B or interleaved 1F1B); all compute the same gradients.

Activations and their gradients move between the ranks of neighbouring model chunks with
point-to-point messages: model chunk ``c`` sends its output to chunk ``c + 1`` (on rank
``(c + 1) % pp``; the last rank's chunk wraps to rank 0 with interleaving) and its input
gradient back to chunk ``c - 1``. Sends are asynchronous (their handles are waited for at the
end of the step) and receives block, so a rank waits only for real data dependencies; the
orders have no cycle among those (:mod:`ckptd.training.pp.simulate` checks it), hence no
deadlock. Every message carries a tag naming (kind, model chunk, micro-batch): with
interleaving two ranks exchange activations *and* gradients in the same direction, in
orders that differ, and gloo matches a receive to the send of the same tag. NCCL ignores
tags and matches in order; that is still right from pp 3 on, where every ordered rank pair
carries one kind of message, in the same order on both sides — so the trainer refuses
interleaving at pp 2 on GPUs. (Interleaving on NCCL has not run yet: no GPU so far.)

Before each backward the schedule tells the gradient reducer which chunk runs and whether
this is the chunk's last backward of the step, so reduction can start while later chunks
still compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from ckptd.training.mesh import ParallelContext
from ckptd.training.model import GPTStage
from ckptd.training.pp.order import Op, last_backwards, rank_order


class GradReducer(Protocol):
    def before_backward(self, chunk: int, final: bool) -> None:
        """The next backward runs local chunk ``chunk``; ``final``: its last one this step."""


@dataclass(slots=True)
class _InFlight:
    inp: torch.Tensor
    out: torch.Tensor
    """Activation sent downstream, or the scaled loss on the last chunk."""


class PipelineSchedule:
    """Runs forward and backward of every micro-batch of one step on this rank's chunks."""

    def __init__(
        self,
        stage: GPTStage,
        ctx: ParallelContext,
        *,
        kind: str,
        act_shape: tuple[int, ...],
        dtype: torch.dtype,
        reducer: GradReducer | None = None,
    ) -> None:
        self.stage, self.ctx, self.kind = stage, ctx, kind
        self.act_shape, self.dtype, self.reducer = act_shape, dtype, reducer
        self.vpp = len(stage.chunks)
        self.n_chunks = ctx.pp * self.vpp
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._flight: dict[tuple[int, int], _InFlight] = {}
        self._losses: list[torch.Tensor] = []

    def order(self, n: int) -> list[Op]:
        """The sequence of ops this rank executes for ``n`` micro-batches."""
        return rank_order(self.kind, self.ctx.pp, self.ctx.pp_rank, n, self.vpp)

    def run(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor | None:
        """One step's forward and backward. Returns the mean loss on the last rank, else None."""
        n = len(inputs)
        self._losses = []
        order = self.order(n)
        finals = last_backwards(order)
        try:
            for op in order:
                if op.kind == "F":
                    self._forward(op, inputs[op.micro], targets[op.micro], n)
                else:
                    if self.reducer is not None:
                        self.reducer.before_backward(op.chunk, op in finals)
                    self._backward(op, n)
        finally:
            for work, _buf in self._sends:
                work.wait()
            self._sends.clear()
            self._flight.clear()
        return torch.stack(self._losses).mean() if self._losses else None

    # ------------------------------------------------------------ model chunks and their peers
    def _model_chunk(self, op: Op) -> int:
        return op.chunk * self.ctx.pp + self.ctx.pp_rank

    def _rank_of_chunk(self, c: int) -> int:
        ctx = self.ctx
        return ctx.rank_of(pp=c % ctx.pp, dp=ctx.dp_rank, tp=ctx.tp_rank)

    def _tag(self, kind: int, c: int, micro: int, n: int) -> int:
        """Tag of the activation (kind 0) into, or the gradient (kind 1) out of, model chunk ``c``."""
        return (kind * self.n_chunks + c) * n + micro

    # ------------------------------------------------------------ forward and backward
    def _forward(self, op: Op, tokens: torch.Tensor, targets: torch.Tensor, n: int) -> None:
        c = self._model_chunk(op)
        if c == 0:
            inp = tokens
        else:
            inp = torch.empty(self.act_shape, dtype=self.dtype, device=self.ctx.device)
            dist.recv(inp, src=self._rank_of_chunk(c - 1), tag=self._tag(0, c, op.micro, n))
            inp.requires_grad_(True)
        out = self.stage(inp, op.chunk)
        if c == self.n_chunks - 1:
            loss = self.stage.loss(out, targets)
            self._losses.append(loss.detach())
            out = loss / n  # the step loss is the mean over micro-batches
        else:
            self._send(out.detach(), self._rank_of_chunk(c + 1), self._tag(0, c + 1, op.micro, n))
        self._flight[(op.chunk, op.micro)] = _InFlight(inp, out)

    def _backward(self, op: Op, n: int) -> None:
        c = self._model_chunk(op)
        f = self._flight.pop((op.chunk, op.micro))
        if c == self.n_chunks - 1:
            torch.autograd.backward([f.out])
        else:
            grad = torch.empty(self.act_shape, dtype=self.dtype, device=self.ctx.device)
            dist.recv(grad, src=self._rank_of_chunk(c + 1), tag=self._tag(1, c, op.micro, n))
            torch.autograd.backward([f.out], [grad])
        if c > 0:
            assert f.inp.grad is not None, "a chunk's input must receive a gradient"
            self._send(f.inp.grad, self._rank_of_chunk(c - 1), self._tag(1, c - 1, op.micro, n))

    def _send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        buf = t.contiguous()
        work = dist.isend(buf, dst=dst, tag=tag)
        if work is not None:
            self._sends.append((work, buf))  # the buffer must outlive the asynchronous send
