"""State-dict adapter: the trainer's internal tensors <-> canonical tensors, boxes and layouts.

Internal tensors are fused (``qkv``), padded (vocabulary rows up to a multiple of tp * dp),
tensor-parallel blocks and ZeRO row shards. Canonical tensors are what a checkpoint stores:
unfused ``q``/``k``/``v``, unpadded vocabulary, global shapes. For every canonical tensor a
rank holds part of, the adapter gives a :class:`CanonicalSpec` — canonical shape, dtype,
:class:`TensorLayout`, and this rank's box — and the data of that box.

Canonical paths::

    model/<name>              fp32 master weights (e.g. model/blocks.0.attn.q.weight)
    optim/exp_avg/<name>      Adam first moment
    optim/exp_avg_sq/<name>   Adam second moment
    optim/step                0-d int64, Adam's step count (bias correction)

The inverse, :meth:`GPTStateAdapter.from_canonical`, takes exactly the boxes that
:meth:`specs` asks for (CPU tensors read from a checkpoint of *any* layout) and fills the
internal state of this layout. The trainer initialises through it as well, so every
layout starts from identical canonical values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ckptd.format.boxes import ShardBox
from ckptd.format.layout import FusedSplit, Mesh, TensorLayout
from ckptd.training.config import MODEL_FACTS_KEY, ModelConfig
from ckptd.training.mesh import ParallelContext
from ckptd.training.params import ParamMeta, Piece
from ckptd.training.zero import ParamState, ZeroAdamW

STEP_PATH = "optim/step"
_KINDS = ("model", "optim/exp_avg", "optim/exp_avg_sq")


@dataclass(frozen=True, slots=True, kw_only=True)
class CanonicalSpec:
    """One canonical tensor as seen from one rank."""

    path: str
    shape: tuple[int, ...]
    """Canonical global shape."""
    dtype: torch.dtype
    layout: TensorLayout
    box: ShardBox
    """The part of the canonical tensor this rank holds (possibly empty)."""
    writer: bool
    """This rank writes the box (replicated copies are written once)."""


@dataclass(frozen=True, slots=True)
class CanonicalTensor:
    spec: CanonicalSpec
    data: torch.Tensor
    """The box's values, shape ``spec.box.shape``; a view of live state where possible (may be on GPU)."""


class StateDictAdapter(Protocol):
    """The seam between a training layout and the checkpoint engine."""

    @property
    def mesh(self) -> Mesh: ...

    @property
    def coords(self) -> Mapping[str, int]: ...

    def specs(self) -> dict[str, CanonicalSpec]:
        """Every canonical tensor this rank holds part of, with its box: what it writes and what it reads."""
        ...

    def to_canonical(self) -> dict[str, CanonicalTensor]:
        """The data of every box in :meth:`specs`. Valid until the next optimizer step."""
        ...

    def from_canonical(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load exactly the boxes of :meth:`specs` (path -> tensor of shape ``box.shape``)."""
        ...


class GPTStateAdapter:
    """:class:`StateDictAdapter` for the bundled GPT and its :class:`ZeroAdamW`.

    ``from_canonical`` is collective over the data-parallel group at ZeRO stages 1 and 2 (the
    compute weights are re-gathered from the loaded master shards).
    """

    def __init__(
        self,
        optimizer: ZeroAdamW,
        ctx: ParallelContext,
        *,
        tied_embeddings: bool,
        chunks: tuple[range, ...] | None = None,
        model: ModelConfig | None = None,
    ) -> None:
        """``chunks``: this rank's layer ranges under interleaved 1F1B, recorded in the layouts.
        ``model``: its facts are recorded in the step counter's layout, so that ``ckptd convert``
        can refuse a target mesh the trainer would refuse."""
        self.optimizer, self.ctx, self.tied, self.chunks = optimizer, ctx, tied_embeddings, chunks
        self.model = model

    @property
    def mesh(self) -> Mesh:
        return self.ctx.mesh

    @property
    def coords(self) -> Mapping[str, int]:
        return self.ctx.coords

    def specs(self) -> dict[str, CanonicalSpec]:
        return {spec.path: spec for spec, _st, _i in self._entries()}

    def to_canonical(self) -> dict[str, CanonicalTensor]:
        out: dict[str, CanonicalTensor] = {}
        for spec, st, i in self._entries():
            if st is None:
                data = torch.tensor(self.optimizer.step_count, dtype=torch.int64)
            else:
                data = _state_list(st, spec.path)[i][: spec.box.shape[0]]
            out[spec.path] = CanonicalTensor(spec, data)
        return out

    @torch.no_grad()
    def from_canonical(self, tensors: Mapping[str, torch.Tensor]) -> None:
        entries = self._entries()
        wanted = {spec.path for spec, _st, _i in entries}
        missing, extra = wanted - tensors.keys(), tensors.keys() - wanted
        if missing or extra:
            raise KeyError(
                f"canonical tensors missing: {sorted(missing)[:5]}, unexpected: {sorted(extra)[:5]}"
            )
        for spec, st, i in entries:
            src = tensors[spec.path]
            if tuple(src.shape) != spec.box.shape:
                raise ValueError(f"{spec.path}: got shape {tuple(src.shape)} for box {spec.box.to_json()}")
            if st is None:
                self.optimizer.step_count = int(src)
                continue
            dst = _state_list(st, spec.path)[i]
            dst.zero_()  # rows past the canonical end (vocabulary padding) stay zero
            dst[: src.shape[0]].copy_(src)
        self.optimizer.refresh_params()

    def _entries(self) -> list[tuple[CanonicalSpec, ParamState | None, int]]:
        out: list[tuple[CanonicalSpec, ParamState | None, int]] = []
        for st in self.optimizer.states.values():
            for i, piece in enumerate(st.meta.pieces):
                layout = self._layout(st.meta, i)
                box = self._box(st, i)
                writer = layout.is_writer(self.mesh, self.coords)
                for kind in _KINDS:
                    path = f"{kind}/{piece.name}"
                    spec = CanonicalSpec(
                        path=path,
                        shape=piece.shape,
                        dtype=torch.float32,
                        layout=layout,
                        box=box,
                        writer=writer,
                    )
                    out.append((spec, st, i))
        facts = {MODEL_FACTS_KEY: self.model.facts()} if self.model is not None else {}
        step_layout = TensorLayout(replicated=("dp", "tp", "pp"), extra=facts)
        step = CanonicalSpec(
            path=STEP_PATH,
            shape=(),
            dtype=torch.int64,
            layout=step_layout,
            box=ShardBox((), ()),
            writer=step_layout.is_writer(self.mesh, self.coords),
        )
        out.append((step, None, 0))
        return out

    def _layout(self, meta: ParamMeta, i: int) -> TensorLayout:
        piece = meta.pieces[i]
        zero = self.optimizer.zero_stage
        axes: list[tuple[str, ...]] = [() for _ in piece.shape]
        if piece.tp_dim is not None:
            axes[piece.tp_dim] = ("tp",)
        if zero >= 1:
            axes[0] = (*axes[0], "dp")  # ZeRO splits dim 0 inside each tp block
        replicated: list[str] = []
        if piece.tp_dim is None:
            replicated.append("tp")
        if zero == 0:
            replicated.append("dp")
        if piece.name == "tok_embed.weight" and self.ctx.pp > 1 and self.tied:
            replicated.append("pp")  # first and last stage both hold it; the first stage writes
        fused = None
        if meta.fused:
            sizes = tuple(p.shape[0] for p in meta.pieces)
            fused = FusedSplit(fused=meta.name, dim=0, index=i, sizes=sizes)
        return TensorLayout(
            partition=tuple(axes) if any(axes) else (),
            replicated=tuple(replicated),
            padded=((0, piece.padded_rows),) if piece.padded_rows is not None else (),
            fused=fused,
            extra=self._interleaving(meta.name),
        )

    def _interleaving(self, name: str) -> dict[str, int]:
        """With interleaved 1F1B: ``vpp`` and the model chunk (``pp_rank + j * pp``) using the tensor.

        Informational: the stored tensors are canonical, so any pp/vpp split restores them."""
        if self.chunks is None:
            return {}
        j = 0
        if name.startswith("blocks."):
            layer = int(name.split(".")[1])
            j = next(i for i, r in enumerate(self.chunks) if layer in r)
        elif name.split(".")[0] not in ("embed", "pos"):
            j = len(self.chunks) - 1
        return {"vpp": len(self.chunks), "model_chunk": self.ctx.pp_rank + j * self.ctx.pp}

    def _box(self, st: ParamState, i: int) -> ShardBox:
        """This rank's box: its tp block, then its ZeRO rows inside it, clipped to the unpadded size."""
        piece: Piece = st.meta.pieces[i]
        tp, t = self.ctx.tp, self.ctx.tp_rank
        local = piece.local_shape(tp)
        start, n = st.shards.own(i)
        offset = [0] * len(piece.shape)
        extent = list(local)
        if piece.tp_dim == 0:
            start += t * local[0]
        elif piece.tp_dim is not None:
            offset[piece.tp_dim] = t * local[piece.tp_dim]
        offset[0] = min(start, piece.shape[0])
        extent[0] = max(0, min(piece.shape[0], start + n) - offset[0])
        return ShardBox(tuple(offset), tuple(extent))


def _state_list(st: ParamState, path: str) -> list[torch.Tensor]:
    if path.startswith("optim/exp_avg_sq/"):
        return st.exp_avg_sq
    if path.startswith("optim/exp_avg/"):
        return st.exp_avg
    return st.master


def assemble_canonical(parts: Iterable[Mapping[str, CanonicalTensor]]) -> dict[str, torch.Tensor]:
    """Full canonical tensors (CPU) from the :meth:`to_canonical` results of every rank.

    An in-memory stand-in for "write a checkpoint": used by tests and by tools that reshard
    without storage. Raises if the writers' boxes do not cover a tensor exactly.
    """
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for part in parts:
        for path, ct in part.items():
            if not ct.spec.writer:
                continue
            if path not in full:
                full[path] = torch.zeros(ct.spec.shape, dtype=ct.spec.dtype)
                covered[path] = 0
            full[path][ct.spec.box.slices()] = ct.data.detach().to("cpu", ct.spec.dtype)
            covered[path] += ct.spec.box.numel
    for path, t in full.items():
        if covered[path] != t.numel():
            raise ValueError(f"{path}: writers cover {covered[path]} of {t.numel()} elements")
    return full


def read_boxes(
    full: Mapping[str, torch.Tensor], specs: Mapping[str, CanonicalSpec]
) -> dict[str, torch.Tensor]:
    """The boxes ``specs`` asks for, cut from full canonical tensors (what a checkpoint read returns)."""
    return {path: full[path][spec.box.slices()].clone() for path, spec in specs.items()}
