"""Row sharding of one internal parameter over data-parallel ranks.

Each canonical piece of the parameter (see :mod:`ckptd.training.params`) is split along dim 0
with ceil division: rank ``d`` owns rows ``[d * cell, (d + 1) * cell)`` of the piece, clipped,
so trailing ranks may own fewer rows or none. Collectives need equal sizes, so the
communication buffers pad every piece's shard to ``cell`` rows ("packed" layout: rank-major,
then piece, then padded rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptd.training.params import ParamMeta, shard_cell, shard_rows


@dataclass(frozen=True, slots=True)
class ParamShards:
    """Where rank ``index`` of ``parts`` finds its rows of every piece of one local parameter."""

    rows: tuple[int, ...]
    """Local (tp) rows of each piece."""
    rest: tuple[int, ...]
    """Trailing local dims, shared by all pieces."""
    parts: int
    index: int

    @staticmethod
    def of(meta: ParamMeta, *, tp: int, parts: int, index: int) -> ParamShards:
        shape = meta.local_shape(tp)
        return ParamShards(meta.local_rows(tp), tuple(shape[1:]), parts, index)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for r in self.rows:
            out.append(acc)
            acc += r
        return tuple(out)

    @property
    def cells(self) -> tuple[int, ...]:
        return tuple(shard_cell(r, self.parts) for r in self.rows)

    def own(self, piece: int, index: int | None = None) -> tuple[int, int]:
        """(start, length) of a rank's rows inside piece ``piece`` (default: this rank)."""
        return shard_rows(self.rows[piece], self.parts, self.index if index is None else index)

    def own_shapes(self) -> list[tuple[int, ...]]:
        return [(self.own(i)[1], *self.rest) for i in range(len(self.rows))]

    def take(self, full: torch.Tensor) -> list[torch.Tensor]:
        """This rank's rows of every piece, as views of a full local tensor."""
        out = []
        for i, off in enumerate(self.offsets):
            start, n = self.own(i)
            out.append(full[off + start : off + start + n])
        return out

    def pad_own(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """This rank's pieces, each zero-padded to its cell: ``(sum(cells), *rest)``."""
        ref = pieces[0]
        buf = torch.zeros((sum(self.cells), *self.rest), dtype=ref.dtype, device=ref.device)
        at = 0
        for piece, cell in zip(pieces, self.cells, strict=True):
            buf[at : at + piece.shape[0]].copy_(piece)
            at += cell
        return buf

    def unpad_own(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`pad_own`."""
        out, at = [], 0
        for i, cell in enumerate(self.cells):
            out.append(packed[at : at + self.own(i)[1]])
            at += cell
        return out

    def pack_all(self, full: torch.Tensor) -> torch.Tensor:
        """A full local tensor in packed layout ``(parts * sum(cells), *rest)``, for reduce-scatter."""
        width = sum(self.cells)
        buf = torch.zeros((self.parts * width, *self.rest), dtype=full.dtype, device=full.device)
        for r in range(self.parts):
            at = r * width
            for i, (off, cell) in enumerate(zip(self.offsets, self.cells, strict=True)):
                start, n = self.own(i, r)
                buf[at : at + n].copy_(full[off + start : off + start + n])
                at += cell
        return buf

    def unpack_all(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack_all`: the full local tensor from the gathered packed shards."""
        width = sum(self.cells)
        blocks = packed.view(self.parts, width, *self.rest)
        pieces = []
        at = 0
        for rows, cell in zip(self.rows, self.cells, strict=True):
            pieces.append(blocks[:, at : at + cell].reshape(self.parts * cell, *self.rest)[:rows])
            at += cell
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()
