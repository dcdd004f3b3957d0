"""Micro-batch schedules of one pipeline stage: GPipe and 1F1B.

GPipe runs every forward, then every backward: simple, but activations of all micro-batches
are alive at once. 1F1B runs ``pp - stage - 1`` warm-up forwards, then alternates one forward
and one backward, then drains: at most ``pp - stage`` micro-batches are in flight per stage.
Both compute exactly the same gradients; only memory and bubble timing differ.

Activations and their gradients move between neighbouring stages with point-to-point
messages. Sends are asynchronous (their handles are waited for at the end of the step) and
receives block; since every message a stage waits for is sent by a peer that is not itself
blocked on a send, neither schedule can deadlock. Messages between a pair flow in one
direction per kind (activations forward, gradients backward), so FIFO order matches them up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from ckptd.training.mesh import ParallelContext
from ckptd.training.model import GPTStage


@dataclass(slots=True)
class _InFlight:
    inp: torch.Tensor
    out: torch.Tensor
    """Activation sent downstream, or the scaled loss on the last stage."""


class PipelineSchedule:
    """Runs forward and backward of every micro-batch of one step on this stage."""

    def __init__(
        self,
        stage: GPTStage,
        ctx: ParallelContext,
        *,
        kind: str,
        act_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.stage, self.ctx, self.kind = stage, ctx, kind
        self.act_shape, self.dtype = act_shape, dtype
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._flight: dict[int, _InFlight] = {}
        self._losses: list[torch.Tensor] = []

    def order(self, n: int) -> list[tuple[str, int]]:
        """The sequence of ("F"|"B", micro-batch) this stage executes."""
        if self.kind == "gpipe":
            return [("F", i) for i in range(n)] + [("B", i) for i in range(n)]
        warmup = min(self.ctx.pp - self.ctx.pp_rank - 1, n)
        ops = [("F", i) for i in range(warmup)]
        for i in range(n - warmup):
            ops += [("F", warmup + i), ("B", i)]
        ops += [("B", i) for i in range(n - warmup, n)]
        return ops

    def run(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor | None:
        """One step's forward and backward. Returns the mean loss on the last stage, else None."""
        n = len(inputs)
        self._losses = []
        try:
            for op, i in self.order(n):
                if op == "F":
                    self._forward(i, inputs[i], targets[i], n)
                else:
                    self._backward(i)
        finally:
            for work, _buf in self._sends:
                work.wait()
            self._sends.clear()
            self._flight.clear()
        return torch.stack(self._losses).mean() if self._losses else None

    def _forward(self, i: int, tokens: torch.Tensor, targets: torch.Tensor, n: int) -> None:
        ctx = self.ctx
        if ctx.prev_rank is None:
            inp = tokens
        else:
            inp = torch.empty(self.act_shape, dtype=self.dtype, device=ctx.device)
            dist.recv(inp, src=ctx.prev_rank)
            inp.requires_grad_(True)
        out = self.stage(inp)
        if ctx.next_rank is None:
            loss = self.stage.loss(out, targets)
            self._losses.append(loss.detach())
            out = loss / n  # the step loss is the mean over micro-batches
        else:
            self._send(out.detach(), ctx.next_rank)
        self._flight[i] = _InFlight(inp, out)

    def _backward(self, i: int) -> None:
        ctx = self.ctx
        f = self._flight.pop(i)
        if ctx.next_rank is None:
            torch.autograd.backward([f.out])
        else:
            grad = torch.empty(self.act_shape, dtype=self.dtype, device=ctx.device)
            dist.recv(grad, src=ctx.next_rank)
            torch.autograd.backward([f.out], [grad])
        if ctx.prev_rank is not None:
            assert f.inp.grad is not None, "a stage input must receive a gradient"
            self._send(f.inp.grad, ctx.prev_rank)

    def _send(self, t: torch.Tensor, dst: int) -> None:
        buf = t.contiguous()
        work = dist.isend(buf, dst=dst)
        if work is not None:
            self._sends.append((work, buf))  # the buffer must outlive the asynchronous send
