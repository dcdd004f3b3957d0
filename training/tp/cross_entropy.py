"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full logits.

Each tp rank holds the logits of its block of the padded vocabulary. Max, sum of exponentials
and the target logit are reduced over tp (three small all-reduces of (tokens,) vectors).
Padded vocabulary columns are masked to -inf so they never receive probability mass, never
get a gradient, and the loss equals that of the unpadded model.
"""

from __future__ import annotations

from typing import Any

import torch

from ckptd.training.mesh import Group, all_reduce


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, start: int, vocab: int, group: Group
    ) -> torch.Tensor:
        ctx.in_dtype = logits.dtype
        logits = logits.float()
        n_local = logits.shape[-1]
        cols = torch.arange(start, start + n_local, device=logits.device)
        logits = logits.masked_fill(cols >= vocab, float("-inf"))
        lmax = logits.max(dim=-1).values
        all_reduce(lmax, group, torch.distributed.ReduceOp.MAX)
        shifted = logits - lmax.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        local_t = target - start
        mine = (local_t >= 0) & (local_t < n_local)
        idx = local_t.clamp(0, n_local - 1)
        tgt = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        all_reduce(tgt, group)
        loss = sum_exp.log() - tgt
        ctx.save_for_backward(exp, sum_exp, idx, mine)
        return loss.mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        exp, sum_exp, idx, mine = ctx.saved_tensors
        soft = exp / sum_exp.unsqueeze(-1)
        onehot = torch.zeros_like(soft).scatter_(-1, idx.unsqueeze(-1), mine.unsqueeze(-1).to(soft.dtype))
        n = soft.numel() // soft.shape[-1]
        return ((soft - onehot) * (grad / n)).to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, start: int, vocab: int, group: Group
) -> torch.Tensor:
    """Mean token loss. ``logits``: (..., local padded vocab) of the columns [start, start + local)."""
    out: torch.Tensor = _VocabParallelCE.apply(logits, target, start, vocab, group)  # type: ignore[no-untyped-call]
    return out
