"""ZeRO stage 3: parameters live sharded; each module holds its full weights only while it computes.

The module's ``nn.Parameter`` is replaced by this rank's shard (rows of every piece, see
:class:`ParamShards`). A forward pre-hook all-gathers the full local tensor through an
autograd function and sets it as a plain attribute; the forward hook drops it again. Three
things keep the gathered weights from piling up:

* **Re-gather for backward.** While the module runs forward, a saved-tensor hook replaces any
  tensor that autograd saves *from a gathered weight* (the weight itself or a view, e.g. the
  transpose a linear layer saves) by a small handle; backward unpacks the handle by
  all-gathering the shards again. So a gathered weight lives from its module's pre-hook to its
  forward hook, and again only during that module's backward. Modules inside a recomputed
  block skip this: recomputation already keeps nothing and re-runs the pre-hook in backward.
* **Prefetch.** The pre-hook starts an asynchronous all-gather of the *next* module (in
  registration order, which is the GPT's execution order) so it overlaps this module's compute.
  At most one prefetch is outstanding; one that is not consumed next is waited for and dropped.
* **Gradients leave at once.** The autograd function's backward hands the full gradient to the
  gradient reducer (bucketed reduce-scatter, :mod:`ckptd.training.zero.buckets`).

Every dp rank runs the same modules in the same order, so the collectives match up.
:class:`ParamMeter` counts the bytes held in parameter tensors (shards plus live gathered
weights) and their peak — what "ZeRO-3 saves memory" means, measurable on CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ckptd.training.mesh import Group
from ckptd.training.zero.shard import ParamShards

GradSink = Callable[[torch.Tensor], None]


class ParamMeter:
    """Bytes held in parameter tensors on this rank: a fixed part plus tracked gathered tensors."""

    def __init__(self, fixed: int = 0) -> None:
        self.fixed, self.live, self.peak = fixed, 0, fixed

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t`` until it is freed (its storage, views included, dies with the tensor object)."""
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.fixed + self.live)
        weakref.finalize(t, self._release, n)
        return t

    def _release(self, n: int) -> None:
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.fixed + self.live


class _GatherParam(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, sp: ShardedParam) -> torch.Tensor:
        ctx.sp = sp
        return sp.gather_full()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        ctx.sp.sink(grad)
        # The gradient went to the reducer; the low-precision shard gets none.
        return None, None


class ShardedParam:
    """One sharded parameter: the shard, how to gather it, and where its gradient goes."""

    def __init__(
        self, full: nn.Parameter, shards: ParamShards, group: Group, sink: GradSink, runtime: Zero3Runtime
    ) -> None:
        self.shards, self.group, self.sink, self.runtime = shards, group, sink, runtime
        with torch.no_grad():
            own = shards.take(full.detach())
            data = torch.cat(own) if len(own) > 1 else own[0].clone()
        self.shard = nn.Parameter(data, requires_grad=True)
        self._prefetch: tuple[dist.Work | None, torch.Tensor] | None = None
        self._regathered: weakref.ref[torch.Tensor] | None = None

    def _packed_own(self) -> torch.Tensor:
        pieces, at = [], 0
        for rows, *_ in self.shards.own_shapes():
            pieces.append(self.shard.detach()[at : at + rows])
            at += rows
        return self.shards.pad_own(pieces)

    def start_gather(self) -> None:
        """Launch the all-gather asynchronously; :meth:`gather_full` picks the result up."""
        own = self._packed_own()
        out = torch.empty(
            (self.shards.parts * own.shape[0], *own.shape[1:]), dtype=own.dtype, device=own.device
        )
        work = None
        if self.group is None:
            out.copy_(own)
        else:
            work = dist.all_gather_into_tensor(out, own, group=self.group, async_op=True)
        self._prefetch = (work, self.runtime.meter.track(out))

    def drop_prefetch(self) -> None:
        if self._prefetch is not None:
            work, _ = self._prefetch
            if work is not None:
                work.wait()
            self._prefetch = None

    def gather_full(self) -> torch.Tensor:
        """The full local tensor (no autograd): the prefetched gather if one is pending."""
        if self._prefetch is None:
            self.start_gather()
        assert self._prefetch is not None
        work, packed = self._prefetch
        self._prefetch = None
        if work is not None:
            work.wait()
        return self.runtime.meter.track(self.shards.unpack_all(packed))

    def gather(self) -> torch.Tensor:
        out: torch.Tensor = _GatherParam.apply(self.shard, self)  # type: ignore[no-untyped-call]
        return out

    def regather(self) -> torch.Tensor:
        """For backward: the full tensor again (shared by every saved view of one backward)."""
        cached = self._regathered() if self._regathered is not None else None
        if cached is not None:
            return cached
        with torch.no_grad():
            full = self.gather_full()
        self._regathered = weakref.ref(full)
        return full


class Zero3Runtime:
    """The hooks of every sharded module of one stage: gathering, prefetch, saved-tensor handles."""

    def __init__(self, meter: ParamMeter) -> None:
        self.meter = meter
        self.order: list[list[ShardedParam]] = []
        """Sharded parameters of each hooked module, in registration (execution) order."""
        self._pending: list[ShardedParam] = []

    def prefetch(self, index: int) -> None:
        """Start gathering module ``index`` (dropping an unconsumed earlier prefetch)."""
        for sp in self._pending:
            sp.drop_prefetch()
        self._pending = []
        if index < len(self.order):
            for sp in self.order[index]:
                sp.start_gather()
            self._pending = list(self.order[index])

    def drop_pending(self) -> None:
        """Before the weights change (optimizer step): a prefetch made now would be stale."""
        self.prefetch(len(self.order))

    def consumed(self, sps: list[ShardedParam]) -> None:
        self._pending = [sp for sp in self._pending if sp not in sps]


def shard_module(
    root: nn.Module,
    make: Callable[[str, nn.Parameter], ShardedParam],
    runtime: Zero3Runtime,
    *,
    regather: Callable[[str], bool],
) -> tuple[dict[str, ShardedParam], list[RemovableHandle]]:
    """Replace every parameter of ``root`` by a gathered-on-demand shard.

    ``make(name, param)`` builds the sharded form of each distinct parameter (shared ones, like a
    tied embedding used by two modules, are sharded once and gathered by each user).
    ``regather(module_name)``: whether that module's saved weights are dropped and re-gathered.
    Returns the sharded parameters by their first name, and the hook handles.
    """
    by_id: dict[int, ShardedParam] = {}
    named: dict[str, ShardedParam] = {}
    handles: list[RemovableHandle] = []
    for mod_name, module in root.named_modules():
        owned: list[tuple[str, ShardedParam]] = []
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full_name = f"{mod_name}.{pname}" if mod_name else pname
            if id(param) not in by_id:
                by_id[id(param)] = make(full_name, param)
                named[full_name] = by_id[id(param)]
            owned.append((pname, by_id[id(param)]))
            del module._parameters[pname]
            setattr(module, pname, None)
        if not owned:
            continue
        hooks = _ModuleHooks(runtime, owned, len(runtime.order), regather(mod_name))
        runtime.order.append([sp for _, sp in owned])
        handles.append(module.register_forward_pre_hook(hooks.pre))
        handles.append(module.register_forward_hook(hooks.post))
    return named, handles


class _ModuleHooks:
    def __init__(
        self, runtime: Zero3Runtime, owned: list[tuple[str, ShardedParam]], index: int, regather: bool
    ) -> None:
        self.runtime, self.owned, self.index, self.regather = runtime, owned, index, regather
        self._saving: list[Any] = []
        self._gathered: dict[int, ShardedParam] = {}

    def pre(self, module: nn.Module, args: Any) -> None:
        sps = [sp for _, sp in self.owned]
        self.runtime.consumed(sps)
        for pname, sp in self.owned:
            full = sp.gather()
            self._gathered[full.untyped_storage().data_ptr()] = sp
            setattr(module, pname, full)
        self.runtime.prefetch(self.index + 1)
        if self.regather and torch.is_grad_enabled():
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            hooks.__enter__()
            self._saving.append(hooks)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        for pname, _ in self.owned:
            setattr(module, pname, None)
        self._gathered.clear()
        if self._saving:
            self._saving.pop().__exit__(None, None, None)

    def _pack(self, t: torch.Tensor) -> Any:
        sp = self._gathered.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if sp is None:
            return t
        return (sp, tuple(t.shape), t.stride(), t.storage_offset())


def _unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, torch.Tensor):
        return saved
    sp, shape, stride, offset = saved
    full: torch.Tensor = sp.regather()
    return full.as_strided(shape, stride, offset)
