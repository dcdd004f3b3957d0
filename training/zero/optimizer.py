"""AdamW with fp32 master weights, sharded over data parallelism (ZeRO stages 0-3).

State per canonical piece of every parameter (see :class:`ParamShards`), always fp32:
``master``, ``exp_avg``, ``exp_avg_sq`` and the reduced gradient ``grad``. What differs by stage:

====== ============================== ================================= ========================
stage  optimizer state                gradients                          compute parameters
====== ============================== ================================= ========================
0      full on every dp rank          all-reduced in the last backward   full on every rank
1      this rank's rows               all-reduced in the last backward   full, all-gathered
2      this rank's rows               reduce-scattered in every backward full, all-gathered
3      this rank's rows               reduce-scattered in every backward this rank's rows only
====== ============================== ================================= ========================

Gradients are reduced in buckets while backward runs (:class:`GradBuckets`): stages 0 and 1
accumulate micro-batches in ``.grad`` and reduce during each chunk's last backward of the step
(the pipeline schedule says which one that is, :meth:`ZeroAdamW.before_backward`); stages 2
and 3 reduce every backward, so full-size gradients never outlive one bucket. Stage 3
gathers weights per module and drops them between forward and backward (see
:mod:`ckptd.training.zero.stage3`); :attr:`ZeroAdamW.meter` counts the parameter bytes held.

Gradient norm for clipping: each rank sums the squares of the gradient rows it owns,
skipping copies (tp-replicated tensors count on tp rank 0, replicated stage-0 state on dp
rank 0, the last stage's tied-embedding copy never), and one all-reduce over the world adds
them up — correct across dp, tp and pp at once.

``ZeroAdamW`` is a ``torch.optim.Optimizer``: its one parameter group holds this rank's fp32
master pieces and ``state[master]`` their Adam moments — exactly the tensors :meth:`step`
modifies. Step pre-hooks therefore run before any of them changes, which is where ckptd's lazy
snapshots wait for their background copies (and nowhere else).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ckptd.training.config import OptimConfig
from ckptd.training.mesh import ParallelContext, all_gather_rows, all_reduce
from ckptd.training.params import ParamMeta
from ckptd.training.zero.buckets import GradBuckets
from ckptd.training.zero.shard import ParamShards
from ckptd.training.zero.stage3 import ParamMeter, ShardedParam, Zero3Runtime, shard_module


@dataclass(slots=True, eq=False)
class ParamState:
    """Optimizer state of one internal parameter: lists hold one tensor per canonical piece."""

    meta: ParamMeta
    shards: ParamShards
    param: nn.Parameter
    """What the model computes with: the full local tensor (stages 0-2) or this rank's shard (3)."""
    master: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    grad: list[torch.Tensor] = field(default_factory=list)

    def add_grad(self, pieces: list[torch.Tensor]) -> None:
        for acc, g in zip(self.grad, pieces, strict=True):
            acc.add_(g)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """Shape of the full local (tp) tensor, whatever the ZeRO stage stores."""
        return (sum(self.shards.rows), *self.shards.rest)

    @property
    def row_numel(self) -> int:
        return math.prod(self.shards.rest)

    @property
    def param_numel(self) -> int:
        return sum(self.shards.rows) * self.row_numel

    @property
    def device(self) -> torch.device:
        return self.master[0].device


class ZeroAdamW(torch.optim.Optimizer):
    """The optimizer of one stage module on one rank."""

    def __init__(
        self,
        module: nn.Module,
        metas: dict[str, ParamMeta],
        ctx: ParallelContext,
        cfg: OptimConfig,
        *,
        zero_stage: int,
        bucket_mb: float = 25.0,
        chunk_of: Callable[[str], int] = lambda name: 0,
        regather: Callable[[str], bool] = lambda module_name: True,
    ) -> None:
        """``chunk_of(param)``: the pipeline chunk using it (buckets never span chunks);
        ``regather(module)``: ZeRO-3 drops that module's gathered weights between forward and backward."""
        self.ctx, self.cfg, self.zero_stage = ctx, cfg, zero_stage
        self.step_count = 0
        parts, index = (ctx.dp, ctx.dp_rank) if zero_stage >= 1 else (1, 0)
        self.states: dict[str, ParamState] = {}
        params = dict(module.named_parameters())
        for name, meta in metas.items():
            shards = ParamShards.of(meta, tp=ctx.tp, parts=parts, index=index)
            zeros = [torch.zeros(s, dtype=torch.float32, device=ctx.device) for s in shards.own_shapes()]
            self.states[name] = ParamState(
                meta=meta,
                shards=shards,
                param=params[name],
                master=zeros,
                exp_avg=[z.clone() for z in zeros],
                exp_avg_sq=[z.clone() for z in zeros],
                grad=[z.clone() for z in zeros],
            )
        masters = [w for st in self.states.values() for w in st.master]
        defaults = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        super().__init__(masters, defaults)
        for st in self.states.values():
            for w, m, v in zip(st.master, st.exp_avg, st.exp_avg_sq, strict=True):
                self.state[w] = {"exp_avg": m, "exp_avg_sq": v}
        n_chunks = 1 + max((chunk_of(name) for name in self.states), default=0)
        by_chunk: list[list[ParamState]] = [[] for _ in range(n_chunks)]
        for name, st in self.states.items():
            by_chunk[chunk_of(name)].append(st)
        self.buckets = GradBuckets(
            by_chunk, ctx.dp_group, scatter=zero_stage >= 2, bucket_bytes=int(bucket_mb * 2**20)
        )
        self._final_backward = True
        """Whether the running backward is its chunk's last of the step (stages 0 and 1 reduce then)."""
        self._handles: list[RemovableHandle] = []
        self.meter = ParamMeter()
        """Bytes held in parameter tensors on this rank (ZeRO-3 also counts gathered weights)."""
        if zero_stage == 3:
            self._zero3 = Zero3Runtime(self.meter)
            sharded, self._handles = shard_module(module, self._make_sharded, self._zero3, regather=regather)
            for name, sp in sharded.items():
                self.states[name].param = sp.shard
        else:
            for st in self.states.values():
                hook = self._grad_hook(st)
                self._handles.append(st.param.register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]
        self.meter.fixed = sum(st.param.numel() * st.param.element_size() for st in self.states.values())
        self.meter.reset_peak()

    def _make_sharded(self, name: str, param: nn.Parameter) -> ShardedParam:
        st = self.states[name]
        return ShardedParam(
            param, st.shards, self.ctx.dp_group, lambda g: self.buckets.add(st, g), self._zero3
        )

    def _grad_hook(self, st: ParamState) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            # Runs once per backward, after this parameter's gradient of the backward is complete.
            if self.zero_stage >= 2 or self._final_backward:
                assert p.grad is not None
                self.buckets.add(st, p.grad)
                p.grad = None

        return hook

    def before_backward(self, chunk: int, final: bool) -> None:
        """Called by the pipeline schedule before each backward (see ``GradReducer``)."""
        self._final_backward = final

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the compute gradients and zero the fp32 gradient pieces (always kept allocated)."""
        self.buckets.reset()
        self._final_backward = True
        for st in self.states.values():
            st.param.grad = None
            for g in st.grad:
                g.zero_()

    def _sum_tied(self) -> None:
        """Both copies of a tied embedding get the sum of their gradients, so they stay identical."""
        if self.ctx.embed_group is None:
            return
        for st in self.states.values():
            if st.meta.pieces[0].name == "tok_embed.weight":
                for g in st.grad:
                    all_reduce(g, self.ctx.embed_group)

    def grad_norm(self) -> float:
        ctx = self.ctx
        total = torch.zeros((), dtype=torch.float32, device=ctx.device)
        for st in self.states.values():
            if st.meta.tied_copy or (st.meta.tp_replicated and ctx.tp_rank != 0):
                continue
            if self.zero_stage == 0 and ctx.dp_rank != 0:
                continue
            for g in st.grad:
                total += g.pow(2).sum()
        return math.sqrt(float(all_reduce(total, ctx.world_group)))

    @torch.no_grad()
    def step(self, closure: None = None) -> float:  # type: ignore[override]
        """Reduce gradients, clip, update the fp32 masters, refresh the compute weights. Returns the norm."""
        self.buckets.finish()
        if self.zero_stage == 3:
            self._zero3.drop_pending()
        self._sum_tied()
        norm = self.grad_norm()
        clip = 1.0
        if self.cfg.grad_clip is not None and norm > self.cfg.grad_clip:
            clip = self.cfg.grad_clip / (norm + 1e-6)
        self.step_count += 1
        t, (b1, b2) = self.step_count, self.cfg.betas
        lr = self.cfg.lr_at(t)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for st in self.states.values():
            for w, m, v, g in zip(st.master, st.exp_avg, st.exp_avg_sq, st.grad, strict=True):
                if clip != 1.0:
                    g.mul_(clip)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if st.meta.decay and self.cfg.weight_decay:
                    w.mul_(1 - lr * self.cfg.weight_decay)
                w.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(self.cfg.eps), value=-lr / bc1)
        self.refresh_params()
        return norm

    @torch.no_grad()
    def refresh_params(self) -> None:
        """Copy the fp32 masters into the (possibly bf16) compute parameters of this layout."""
        for st in self.states.values():
            dtype = st.param.dtype
            if self.zero_stage == 3 or self.zero_stage == 0:
                st.param.data.copy_(torch.cat(st.master) if len(st.master) > 1 else st.master[0])
            else:
                packed = st.shards.pad_own([w.to(dtype) for w in st.master])
                st.param.data.copy_(st.shards.unpack_all(all_gather_rows(packed, self.ctx.dp_group)))
