"""What each internal parameter is in canonical terms.

A trainer parameter is a TP-local tensor. Along dim 0 it is a concatenation of *pieces*,
each one block of one canonical tensor: the fused ``qkv`` weight holds a block of ``q``,
one of ``k`` and one of ``v``; an ordinary weight is a single piece. ZeRO shards every
piece separately along dim 0 with ceil division, so the rows a rank owns of every
canonical tensor form a regular grid — the property that lets a writer's box be a shard.

The model declares these facts once (:class:`ParamMeta`); the ZeRO optimizer and the
state-dict adapter both derive everything from them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Piece:
    """One canonical tensor's block inside an internal parameter."""

    name: str
    """Canonical name, e.g. ``blocks.0.attn.q.weight``."""
    shape: tuple[int, ...]
    """Canonical global shape (unpadded)."""
    tp_dim: int | None
    """Dimension split over tensor parallelism, or None when replicated over tp."""
    padded_rows: int | None = None
    """Global dim-0 size in the training layout when it is padded (vocabulary)."""

    def local_shape(self, tp: int) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.padded_rows is not None:
            shape[0] = self.padded_rows
        if self.tp_dim is not None:
            if shape[self.tp_dim] % tp:
                raise ValueError(
                    f"{self.name}: dim {self.tp_dim} of {tuple(shape)} does not split into tp={tp}"
                )
            shape[self.tp_dim] //= tp
        return tuple(shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamMeta:
    """An internal parameter and the canonical pieces it concatenates along dim 0."""

    name: str
    """Internal name in the stage module (``blocks.0.attn.qkv.weight``)."""
    pieces: tuple[Piece, ...]
    fused: bool = False
    tied_copy: bool = False
    """The last pipeline stage's copy of a tied embedding: same data as the first stage's; its
    gradient is summed with the original's, it is not counted twice in the gradient norm and it
    is not written to checkpoints."""
    decay: bool = True
    """Weight decay applies (matrices yes, norms no)."""

    def local_rows(self, tp: int) -> tuple[int, ...]:
        return tuple(p.local_shape(tp)[0] for p in self.pieces)

    def local_shape(self, tp: int) -> tuple[int, ...]:
        first = self.pieces[0].local_shape(tp)
        return (sum(self.local_rows(tp)), *first[1:])

    @property
    def tp_replicated(self) -> bool:
        return self.pieces[0].tp_dim is None


def shard_rows(rows: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of ZeRO shard ``index`` of ``rows`` rows, by ceil division."""
    cell = -(-rows // parts) if rows else 0
    start = min(rows, index * cell)
    return start, min(rows, start + cell) - start


def shard_cell(rows: int, parts: int) -> int:
    return -(-rows // parts) if rows else 0
