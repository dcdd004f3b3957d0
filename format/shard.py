"""Zarr v3 ``sharding_indexed`` shards: encode a writer's box, decode any part of it.

A shard is the concatenation of its encoded inner chunks followed by the index:
for every inner chunk in C order, ``(offset, nbytes)`` as little-endian uint64
(``2**64-1`` twice for an absent chunk), then the crc32c of the index (4 bytes).
This is exactly what zarr-python writes with ``index_location="end"`` and index
codecs ``[bytes(little), crc32c]``, so zarr-python and tensorstore read our shards.

We encode shards ourselves instead of going through zarr-python's array writer
because the hot path must (a) hand the caller's memory to ``writev`` without copies,
(b) fsync, and (c) report the index checksum for the manifest; zarr-python does none
of those. Reading is ours too so that a reader fetches only the chunks it needs and
verifies each one.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ckptd.format.boxes import ShardBox, cells_overlapping
from ckptd.format.codecs import CodecSpec, crc32c
from ckptd.format.errors import IntegrityError
from ckptd.format.store import StreamWriter

EMPTY = 2**64 - 1
INDEX_ENTRY = 16


@dataclass(frozen=True, slots=True)
class ShardGeometry:
    """A shard of shape ``shard`` at global ``origin``, cut into inner chunks of shape ``chunk``."""

    origin: tuple[int, ...]
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    array_shape: tuple[int, ...]  # the (part) array this shard belongs to, for edge clipping

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))

    @property
    def nchunks(self) -> int:
        return math.prod(self.chunks_per_shard)

    @property
    def index_nbytes(self) -> int:
        return self.nchunks * INDEX_ENTRY + 4

    def max_nbytes(self, itemsize: int) -> int:
        """The most bytes a shard of this geometry can take: every chunk stored, compressors
        allowed to expand a little (zstd/blosc bound their output below 1.01x + 1 KiB)."""
        chunk = math.prod(self.chunk) * itemsize
        return self.nchunks * (chunk + chunk // 64 + 1024 + 4) + self.index_nbytes

    def chunk_box(self, local: Sequence[int]) -> ShardBox:
        """Global box of inner chunk ``local`` clipped to the array (may be empty beyond the edge)."""
        off = tuple(o + i * c for o, i, c in zip(self.origin, local, self.chunk, strict=True))
        shape = tuple(
            max(0, min(c, s - o)) for o, c, s in zip(off, self.chunk, self.array_shape, strict=True)
        )
        return ShardBox(off, shape)

    def flat_index(self, local: Sequence[int]) -> int:
        idx = 0
        for i, n in zip(local, self.chunks_per_shard, strict=True):
            idx = idx * n + i
        return idx

    def chunks_overlapping(self, box: ShardBox) -> Iterator[tuple[int, ...]]:
        rel = box.intersect(ShardBox(self.origin, self.shard))
        if rel is None:
            return iter(())
        local = ShardBox(tuple(o - so for o, so in zip(rel.offset, self.origin, strict=True)), rel.shape)
        return cells_overlapping(local, self.chunk)

    def all_chunks(self) -> Iterator[tuple[int, ...]]:
        return cells_overlapping(ShardBox((0,) * len(self.shard), self.shard), self.chunk)


@dataclass(frozen=True, slots=True)
class EncodedShard:
    buffers: list[bytes | memoryview]
    nbytes: int
    index_crc32c: int


def encode_shard(data: np.ndarray, geom: ShardGeometry, codec: CodecSpec) -> EncodedShard:
    """Encode ``data`` (the shard's box clipped to the array, storage dtype) into shard buffers."""
    itemsize = data.dtype.itemsize
    buffers: list[bytes | memoryview] = []
    index = np.full((geom.nchunks, 2), EMPTY, dtype="<u8")
    pos = 0
    for local in geom.all_chunks():
        box = geom.chunk_box(local)
        if box.is_empty():
            continue  # wholly beyond the array edge: stays absent, readers use the fill value
        rel = box.relative_to(ShardBox(geom.origin, data.shape))
        piece = data[rel]
        if box.shape != geom.chunk:
            padded = np.zeros(geom.chunk, dtype=data.dtype)
            padded[tuple(slice(0, s) for s in box.shape)] = piece
            piece = padded
        elif not piece.flags.c_contiguous:
            piece = np.ascontiguousarray(piece)
        parts = codec.encode(_bytes_view(piece), itemsize)
        n = sum(len(p) for p in parts)
        index[geom.flat_index(local)] = (pos, n)
        buffers.extend(parts)
        pos += n
    index_bytes = index.tobytes()
    index_crc = crc32c(index_bytes)
    buffers.append(index_bytes)
    buffers.append(struct.pack("<I", index_crc))
    return EncodedShard(buffers, pos + len(index_bytes) + 4, index_crc)


def decode_index(raw: bytes | memoryview, geom: ShardGeometry, where: str) -> np.ndarray:
    """Parse and verify a shard index; returns an ``(nchunks, 2)`` uint64 array of (offset, nbytes)."""
    if len(raw) != geom.index_nbytes:
        raise IntegrityError(f"{where}: shard index is {len(raw)} bytes, expected {geom.index_nbytes}")
    body, stored = bytes(raw[:-4]), struct.unpack("<I", bytes(raw[-4:]))[0]
    if crc32c(body) != stored:
        raise IntegrityError(f"{where}: shard index crc32c mismatch")
    return np.frombuffer(body, dtype="<u8").reshape(geom.nchunks, 2)


def chunk_range(index: np.ndarray, flat: int, data_nbytes: int | None, where: str) -> tuple[int, int] | None:
    """``(start, stop)`` of an inner chunk in the shard, None when absent; bounds-checked.

    ``data_nbytes`` None: the shard's size is not known (format v2 reads the index from the end of
    the object); a range beyond the object then comes back short and is reported as truncation.
    """
    off, n = int(index[flat, 0]), int(index[flat, 1])
    if off == EMPTY and n == EMPTY:
        return None
    if n < 4 or off + n > (data_nbytes if data_nbytes is not None else 2**62):
        raise IntegrityError(f"{where}: chunk {flat} points outside the shard ({off}+{n} > {data_nbytes})")
    return off, off + n


def stream_shard(
    out: StreamWriter,
    geom: ShardGeometry,
    codec: CodecSpec,
    itemsize: int,
    read: Callable[[ShardBox], np.ndarray],
) -> tuple[int, int]:
    """Encode a shard chunk by chunk into ``out`` with memory bounded by one chunk.

    ``read(box)`` returns the array's data for a global box (storage dtype). Chunks are
    produced in C order, so the index (at the end) is known only when the data is
    written — which is why Zarr puts it there. Returns ``(nbytes, index_crc32c)``.
    """
    index = np.full((geom.nchunks, 2), EMPTY, dtype="<u8")
    pos = 0
    for local in geom.all_chunks():
        box = geom.chunk_box(local)
        if box.is_empty():
            continue
        piece = read(box)
        if box.shape != geom.chunk:
            padded = np.zeros(geom.chunk, dtype=piece.dtype)
            padded[tuple(slice(0, s) for s in box.shape)] = piece
            piece = padded
        piece = np.ascontiguousarray(piece)
        parts = codec.encode(_bytes_view(piece), itemsize)
        n = 0
        for p in parts:
            n += len(p)
            out.write(p)
        index[geom.flat_index(local)] = (pos, n)
        pos += n
    index_bytes = index.tobytes()
    crc = crc32c(index_bytes)
    out.write(index_bytes)
    out.write(struct.pack("<I", crc))
    return pos + len(index_bytes) + 4, crc


def _bytes_view(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying."""
    return memoryview(a.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
