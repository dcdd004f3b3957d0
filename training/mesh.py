"""The device mesh of one rank: its coordinates and the process groups along each axis.

There is no global process-group singleton: a :class:`ParallelContext` is built once and
passed to every component that communicates. Ranks are laid out ``pp`` outermost, then
``dp``, then ``tp`` innermost, so tensor-parallel peers are neighbours (same host, fastest
links) — the usual Megatron order.

A group of size one is ``None`` and every collective on it is skipped, so the
single-process reference runs the very same code without ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ckptd.format.layout import mesh_coords

MESH_ORDER = ("pp", "dp", "tp")

Group = dist.ProcessGroup | None


@dataclass(kw_only=True, slots=True)
class ParallelContext:
    """One rank's view of the dp x tp x pp mesh."""

    rank: int = 0
    world_size: int = 1
    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Group = None
    dp_group: Group = None
    world_group: Group = None
    embed_group: Group = None
    """First and last pipeline stage at the same (dp, tp): they hold the two copies of tied embeddings."""
    prev_rank: int | None = None
    """Global rank of the previous pipeline stage (None on the first stage)."""
    next_rank: int | None = None

    @property
    def mesh(self) -> dict[str, int]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp}

    @property
    def coords(self) -> dict[str, int]:
        return {"dp": self.dp_rank, "tp": self.tp_rank, "pp": self.pp_rank}

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def rank_of(self, *, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    @staticmethod
    def build(
        *, tp: int, pp: int, device: torch.device | None = None, tied_embeddings: bool = True
    ) -> ParallelContext:
        """Create the groups of every axis. Collective: every rank of the default group must call it.

        ``torch.distributed`` must be initialised (or the world must be a single process).
        """
        dev = device if device is not None else torch.device("cpu")
        if not dist.is_available() or not dist.is_initialized():
            if tp * pp != 1:
                raise RuntimeError("tensor or pipeline parallelism needs torch.distributed to be initialised")
            return ParallelContext(device=dev)
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp * pp = {tp * pp}")
        dp = world // (tp * pp)
        mesh = {"pp": pp, "dp": dp, "tp": tp}
        c = mesh_coords(mesh, rank, MESH_ORDER)
        ctx = ParallelContext(
            rank=rank,
            world_size=world,
            dp=dp,
            tp=tp,
            pp=pp,
            dp_rank=c["dp"],
            tp_rank=c["tp"],
            pp_rank=c["pp"],
            device=dev,
            world_group=dist.group.WORLD if world > 1 else None,
        )
        # new_group is collective over the default group: every rank creates every group, in the
        # same order, and keeps the one it belongs to.
        for s in range(pp):
            for d in range(dp):
                ctx.tp_group = _maybe(ctx, [ctx.rank_of(pp=s, dp=d, tp=t) for t in range(tp)], ctx.tp_group)
        for s in range(pp):
            for t in range(tp):
                ctx.dp_group = _maybe(ctx, [ctx.rank_of(pp=s, dp=d, tp=t) for d in range(dp)], ctx.dp_group)
        if pp > 1 and tied_embeddings:
            for d in range(dp):
                for t in range(tp):
                    ends = [ctx.rank_of(pp=0, dp=d, tp=t), ctx.rank_of(pp=pp - 1, dp=d, tp=t)]
                    ctx.embed_group = _maybe(ctx, ends, ctx.embed_group)
        if ctx.pp_rank > 0:
            ctx.prev_rank = ctx.rank_of(pp=ctx.pp_rank - 1, dp=ctx.dp_rank, tp=ctx.tp_rank)
        if ctx.pp_rank < pp - 1:
            ctx.next_rank = ctx.rank_of(pp=ctx.pp_rank + 1, dp=ctx.dp_rank, tp=ctx.tp_rank)
        return ctx


def _maybe(ctx: ParallelContext, ranks: list[int], current: Group) -> Group:
    """Create the group (collectively) and return it if this rank belongs to it and it has peers."""
    if len(ranks) == 1:
        return current
    group = dist.new_group(ranks)
    return group if ctx.rank in ranks else current


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(
    t: torch.Tensor, group: Group, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce; a no-op on a group of one."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_rows(t: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every group rank along dim 0 (in group-rank order)."""
    if group is None:
        return t
    n = dist.get_world_size(group)
    out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def reduce_scatter_rows(t: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over the group, then keep this rank's equal block of dim 0."""
    if group is None:
        return t
    n = dist.get_world_size(group)
    block = t.shape[0] // n
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce-scatter; all-reduce a copy and keep our block (same result, more traffic).
        full = t.clone()
        dist.all_reduce(full, group=group)
        r = dist.get_rank(group)
        return full[r * block : (r + 1) * block].clone()
    out = torch.empty((block, *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.reduce_scatter_tensor(out, t.contiguous(), group=group)
    return out
