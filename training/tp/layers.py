"""Tensor-parallel layers. Each holds only its tp-local block of the weight.

Weights are created empty: values always come from canonical tensors through the
state-dict adapter (initialisation included), so every layout starts from the same numbers.
Linears have no bias (a row-parallel bias would need its own replication rule for no gain here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ckptd.training.mesh import Group
from ckptd.training.tp.comm import copy_to_tp, reduce_from_tp


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W split along its output dim: each rank computes its slice of y."""

    weight: torch.Tensor

    def __init__(
        self, in_features: int, local_out: int, *, group: Group, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W split along its input dim: partial sums are all-reduced over tp."""

    weight: torch.Tensor

    def __init__(
        self, local_in: int, out_features: int, *, group: Group, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, local_in, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over tp; other ranks' tokens give zeros."""

    weight: torch.Tensor

    def __init__(
        self,
        local_vocab: int,
        dim: int,
        *,
        tp_rank: int,
        group: Group,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.group = group
        self.start = tp_rank * local_vocab
        self.local_vocab = local_vocab
        self.weight = nn.Parameter(torch.empty(local_vocab, dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)
