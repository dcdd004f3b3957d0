"""The GPT, built as the pipeline stage one rank runs, with tensor-parallel layers.

A stage holds the token and position embeddings (first stage), its range of transformer
blocks (named by *global* layer index, so names do not depend on the split) — or, with
interleaved 1F1B, several non-contiguous ranges ("chunks", run one at a time) — and the final
norm and output head (last stage). With tied embeddings and more than one
stage, the last stage holds a copy of the token embedding (Megatron-style) whose gradient
is summed with the first stage's before the optimizer step.

Parameters are created empty; :func:`canonical_init` defines the initial values of the
canonical tensors, and the state-dict adapter loads them, so every layout starts equal.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ckptd.training.config import ModelConfig
from ckptd.training.mesh import ParallelContext
from ckptd.training.params import ParamMeta, Piece
from ckptd.training.tp import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)


class LayerNorm(nn.Module):
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads; the tp rank holds whole heads."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads // ctx.tp
        self.n_kv = cfg.kv_heads // ctx.tp
        self.head_dim = cfg.head_dim
        hd, dev = cfg.head_dim, ctx.device
        # Fused q|k|v: one matmul; the adapter unfuses it into canonical q, k and v.
        self.qkv = ColumnParallelLinear(
            cfg.d_model, (self.n_heads + 2 * self.n_kv) * hd, group=ctx.tp_group, dtype=dtype, device=dev
        )
        self.out = RowParallelLinear(
            self.n_heads * hd, cfg.d_model, group=ctx.tp_group, dtype=dtype, device=dev
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv, hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv, hd).transpose(1, 2)
        if self.n_kv != self.n_heads:
            # Local query head i uses local kv head i // group: tp splits whole kv groups.
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * hd))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        local = cfg.ffn // ctx.tp
        self.fc1 = ColumnParallelLinear(
            cfg.d_model, local, group=ctx.tp_group, dtype=dtype, device=ctx.device
        )
        self.fc2 = RowParallelLinear(local, cfg.d_model, group=ctx.tp_group, dtype=dtype, device=ctx.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(cfg.d_model, dtype=dtype, device=ctx.device)
        self.attn = Attention(cfg, ctx, dtype)
        self.mlp_norm = LayerNorm(cfg.d_model, dtype=dtype, device=ctx.device)
        self.mlp = MLP(cfg, ctx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        out: torch.Tensor = x + self.mlp(self.mlp_norm(x))
        return out


class PositionEmbedding(nn.Module):
    weight: torch.Tensor

    def __init__(self, max_len: int, dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, dim, dtype=dtype, device=device))

    def forward(self, seq_len: int) -> torch.Tensor:
        return self.weight[:seq_len]


class GPTStage(nn.Module):
    """The layers of one pipeline stage on one tp rank."""

    def __init__(
        self,
        cfg: ModelConfig,
        ctx: ParallelContext,
        *,
        layers: range | tuple[range, ...],
        dtype: torch.dtype,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.ctx, self.recompute = cfg, ctx, recompute
        self.chunks: tuple[range, ...] = (layers,) if isinstance(layers, range) else tuple(layers)
        """Layer ranges of this rank's model chunks (several with interleaved 1F1B)."""
        self.padded_vocab = cfg.padded_vocab(ctx.tp, ctx.dp)
        self.local_vocab = self.padded_vocab // ctx.tp
        self.vocab_start = ctx.tp_rank * self.local_vocab
        dev = ctx.device
        self.embed: VocabParallelEmbedding | None = None
        self.pos: PositionEmbedding | None = None
        if ctx.is_first_stage:
            self.embed = VocabParallelEmbedding(
                self.local_vocab,
                cfg.d_model,
                tp_rank=ctx.tp_rank,
                group=ctx.tp_group,
                dtype=dtype,
                device=dev,
            )
            self.pos = PositionEmbedding(cfg.max_seq_len, cfg.d_model, dtype=dtype, device=dev)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, ctx, dtype) for r in self.chunks for i in r})
        self.final_norm: LayerNorm | None = None
        self.head: ColumnParallelLinear | None = None
        if ctx.is_last_stage:
            self.final_norm = LayerNorm(cfg.d_model, dtype=dtype, device=dev)
            self.head = ColumnParallelLinear(
                cfg.d_model, self.local_vocab, group=ctx.tp_group, dtype=dtype, device=dev
            )
            if cfg.tie_embeddings and self.embed is not None:
                self.head.weight = self.embed.weight  # one Parameter, registered in both modules

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Token ids (first chunk of the model) or hidden states in; hidden states or vocab-parallel
        logits (last chunk of the model) out."""
        if chunk == 0 and self.embed is not None and self.pos is not None:
            x = self.embed(x) + self.pos(x.shape[1])
        for i in self.chunks[chunk]:
            block = self.blocks[str(i)]
            if self.recompute and torch.is_grad_enabled():
                # Keep only the block's input; its activations are recomputed in backward. The
                # reentrant form recomputes *and* back-propagates the block inside one backward
                # call, so the recomputed graph (ZeRO-3's gathered weights included) is freed
                # right after; the non-reentrant form keeps it reachable until a GC cycle runs.
                x = checkpoint(block, x, use_reentrant=True)
            else:
                x = block(x)
        if chunk == len(self.chunks) - 1 and self.final_norm is not None and self.head is not None:
            x = self.head(self.final_norm(x))
        return x

    def chunk_of(self, name: str) -> int:
        """Which of this rank's chunks uses parameter ``name`` (gradients are ready per chunk)."""
        if name.startswith("blocks."):
            layer = int(name.split(".")[1])
            return next(c for c, r in enumerate(self.chunks) if layer in r)
        return 0 if name.split(".")[0] in ("embed", "pos") else len(self.chunks) - 1

    def recomputed(self, module_name: str) -> bool:
        """Whether the module runs inside a recomputed block (its saved tensors are not kept)."""
        return self.recompute and module_name.startswith("blocks.")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(
            logits, targets, start=self.vocab_start, vocab=self.cfg.vocab_size, group=self.ctx.tp_group
        )

    def param_metas(self) -> dict[str, ParamMeta]:
        """Every (deduplicated) parameter of this stage, in ``named_parameters`` order."""
        return {name: self._meta(name) for name, _ in self.named_parameters()}

    def _meta(self, name: str) -> ParamMeta:
        cfg = self.cfg
        d, vocab = cfg.d_model, cfg.vocab_size
        if name in ("embed.weight", "head.weight"):
            tied = cfg.tie_embeddings
            canonical = "tok_embed.weight" if tied or name == "embed.weight" else "lm_head.weight"
            piece = Piece(name=canonical, shape=(vocab, d), tp_dim=0, padded_rows=self.padded_vocab)
            return ParamMeta(name=name, pieces=(piece,), tied_copy=tied and name == "head.weight")
        if name == "pos.weight":
            return ParamMeta(
                name=name, pieces=(Piece(name="pos_embed.weight", shape=(cfg.max_seq_len, d), tp_dim=None),)
            )
        if name.endswith("norm.weight") or name.endswith("norm.bias"):
            return ParamMeta(name=name, pieces=(Piece(name=name, shape=(d,), tp_dim=None),), decay=False)
        if name.endswith("attn.qkv.weight"):
            prefix = name.removesuffix("qkv.weight")
            hd = cfg.head_dim
            rows = {"q": cfg.n_heads * hd, "k": cfg.kv_heads * hd, "v": cfg.kv_heads * hd}
            pieces = tuple(Piece(name=f"{prefix}{p}.weight", shape=(n, d), tp_dim=0) for p, n in rows.items())
            return ParamMeta(name=name, pieces=pieces, fused=True)
        if name.endswith("attn.out.weight"):
            return ParamMeta(
                name=name, pieces=(Piece(name=name, shape=(d, cfg.n_heads * cfg.head_dim), tp_dim=1),)
            )
        if name.endswith("mlp.fc1.weight"):
            return ParamMeta(name=name, pieces=(Piece(name=name, shape=(cfg.ffn, d), tp_dim=0),))
        if name.endswith("mlp.fc2.weight"):
            return ParamMeta(name=name, pieces=(Piece(name=name, shape=(d, cfg.ffn), tp_dim=1),))
        raise KeyError(f"no canonical mapping for parameter {name!r}")


def canonical_init(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial value of canonical tensor ``name`` (fp32, CPU): a function of (seed, name) only."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("norm.bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = 0.02
    if name.endswith("attn.out.weight") or name.endswith("mlp.fc2.weight"):
        std /= math.sqrt(2 * cfg.n_layers)  # GPT-2: residual projections scaled by depth
    return torch.randn(shape, generator=gen) * std
