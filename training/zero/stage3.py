"""ZeRO stage 3: parameters live sharded; each module gathers its weights just before its forward.

The module's ``nn.Parameter`` is replaced by this rank's shard (rows of every piece, see
:class:`ParamShards`). A forward pre-hook all-gathers the full local tensor through an
autograd function and sets it as a plain attribute; a forward hook drops the attribute
again. The function's backward reduce-scatters the gradient over dp and adds this rank's
part, in fp32, to the optimizer's gradient buffer — so full-size gradients never outlive
one module's backward.

Limitation (documented, not hidden): autograd keeps the gathered weights that a module saved
for backward alive until that micro-batch's backward; weights are not re-gathered in backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ckptd.training.mesh import Group, all_gather_rows, reduce_scatter_rows
from ckptd.training.zero.shard import ParamShards
from torch import nn
from torch.utils.hooks import RemovableHandle

GradSink = Callable[[list[torch.Tensor]], None]


class _GatherParam(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, shard: torch.Tensor, shards: ParamShards, group: Group, sink: GradSink
    ) -> torch.Tensor:
        ctx.shards, ctx.group, ctx.sink = shards, group, sink
        pieces, at = [], 0
        for rows, *_ in shards.own_shapes():
            pieces.append(shard[at : at + rows])
            at += rows
        return shards.unpack_all(all_gather_rows(shards.pad_own(pieces), group))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        shards: ParamShards = ctx.shards
        mine = reduce_scatter_rows(shards.pack_all(grad.float()), ctx.group)
        ctx.sink([p / shards.parts for p in shards.unpad_own(mine)])
        # The fp32 gradient went to the optimizer's buffer; the low-precision shard gets none.
        return None, None, None, None


class ShardedParam:
    """One sharded parameter: the shard, how to gather it, and where its gradient goes."""

    def __init__(self, full: nn.Parameter, shards: ParamShards, group: Group, sink: GradSink) -> None:
        self.shards, self.group, self.sink = shards, group, sink
        with torch.no_grad():
            own = shards.take(full.detach())
            data = torch.cat(own) if len(own) > 1 else own[0].clone()
        self.shard = nn.Parameter(data, requires_grad=True)

    def gather(self) -> torch.Tensor:
        out: torch.Tensor = _GatherParam.apply(self.shard, self.shards, self.group, self.sink)  # type: ignore[no-untyped-call]
        return out


def shard_module(
    root: nn.Module, make: Callable[[str, nn.Parameter], ShardedParam]
) -> tuple[dict[str, ShardedParam], list[RemovableHandle]]:
    """Replace every parameter of ``root`` by a gathered-on-demand shard.

    ``make(name, param)`` builds the sharded form of each distinct parameter (shared ones, like a
    tied embedding used by two modules, are sharded once and gathered by each user). Returns the
    sharded parameters by their first name, and the hook handles.
    """
    by_id: dict[int, ShardedParam] = {}
    named: dict[str, ShardedParam] = {}
    handles: list[RemovableHandle] = []
    for mod_name, module in root.named_modules():
        local = list(module._parameters.items())
        if not local:
            continue
        owned: list[tuple[str, ShardedParam]] = []
        for pname, param in local:
            if param is None:
                continue
            full_name = f"{mod_name}.{pname}" if mod_name else pname
            if id(param) not in by_id:
                by_id[id(param)] = make(full_name, param)
                named[full_name] = by_id[id(param)]
            owned.append((pname, by_id[id(param)]))
            del module._parameters[pname]
            setattr(module, pname, None)
        handles.append(module.register_forward_pre_hook(_pre_hook(owned)))
        handles.append(module.register_forward_hook(_post_hook(owned)))
    return named, handles


def _pre_hook(owned: list[tuple[str, ShardedParam]]) -> Callable[[nn.Module, Any], None]:
    def hook(module: nn.Module, args: Any) -> None:
        for pname, sp in owned:
            setattr(module, pname, sp.gather())

    return hook


def _post_hook(owned: list[tuple[str, ShardedParam]]) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        for pname, _ in owned:
            setattr(module, pname, None)

    return hook
