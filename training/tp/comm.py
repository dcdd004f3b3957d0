"""The two conjugate communication operators of tensor parallelism, as autograd functions.

``copy_to_tp`` sits where a replicated activation enters column-parallel compute: identity
forward, all-reduce of the gradient backward (every tp rank contributed a partial gradient).
``reduce_from_tp`` sits where row-parallel partial sums leave: all-reduce forward, identity
backward. On a group of one both are the identity, so the reference model is the same code.
"""

from __future__ import annotations

from typing import Any

import torch

from ckptd.training.mesh import Group, all_reduce


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group is None:
        return x
    out: torch.Tensor = _CopyToTP.apply(x, group)  # type: ignore[no-untyped-call]
    return out


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group is None:
        return x
    out: torch.Tensor = _ReduceFromTP.apply(x, group)  # type: ignore[no-untyped-call]
    return out
