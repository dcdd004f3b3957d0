"""Shard bytes as Zarr's ``sharding_indexed`` codec defines them: chunks in C order, then the index of
``(offset, nbytes)`` little-endian uint64 pairs (``2**64-1`` twice for an absent chunk), then its crc32c.

Fast (numpy only, no zarr, no torch) so that ``make mutate`` over format/shard.py takes seconds a mutant.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ckptd.format.boxes import ShardBox
from ckptd.format.codecs import CodecSpec, crc32c
from ckptd.format.errors import IntegrityError
from ckptd.format.shard import ShardGeometry, chunk_range, decode_index, encode_shard, stream_shard

ABSENT = b"\xff" * 16
ARRAY = np.arange(70, dtype="<f4").reshape(10, 7) * 1.25
# A shard at the array's corner: chunk (0, 1) is cut by the right edge, row 1 of chunks lies beyond it.
GEOM = ShardGeometry(origin=(8, 4), shard=(4, 4), chunk=(2, 2), array_shape=(10, 7))


class Sink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes | memoryview, /) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def shard_bytes(codec: CodecSpec, data: np.ndarray | None = None) -> bytes:
    data = ARRAY[8:10, 4:7] if data is None else data
    enc = encode_shard(data, GEOM, codec)
    raw = b"".join(bytes(b) for b in enc.buffers)
    assert enc.nbytes == len(raw)
    assert enc.index_crc32c == struct.unpack("<I", raw[-4:])[0]
    return raw


def read_back(raw: bytes, geom: ShardGeometry, codec: CodecSpec) -> np.ndarray:
    """What a reader sees: every chunk through the index, the fill value (0) where a chunk is absent."""
    index = decode_index(raw[-geom.index_nbytes:], geom, "shard")
    out = np.zeros(geom.shard, dtype="<f4")
    for local in geom.all_chunks():
        r = chunk_range(index, geom.flat_index(local), len(raw), "shard")
        if r is None:
            continue
        body = codec.decode(raw[r[0]:r[1]], int(np.prod(geom.chunk)) * 4, "shard")
        sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(local, geom.chunk, strict=True))
        out[sl] = np.frombuffer(body, dtype="<f4").reshape(geom.chunk)
    return out


@pytest.mark.parametrize("codec", [CodecSpec(), CodecSpec("zstd", 3)], ids=["raw", "zstd"])
def test_a_shard_reads_back_with_absent_chunks_beyond_the_edge(codec: CodecSpec) -> None:
    raw = shard_bytes(codec)
    want = np.zeros((4, 4), dtype="<f4")
    want[:2, :3] = ARRAY[8:10, 4:7]
    assert np.array_equal(read_back(raw, GEOM, codec), want)
    index = raw[-GEOM.index_nbytes:-4]
    assert index[32:] == ABSENT * 2  # chunks (1, 0) and (1, 1): Zarr's "absent" marker, nothing stored
    assert struct.unpack("<4Q", index[:32])[0] == 0  # chunk (0, 0) first, at offset 0
    off1, n1 = struct.unpack("<2Q", index[16:32])
    assert off1 == struct.unpack("<Q", index[8:16])[0] and off1 + n1 == len(raw) - GEOM.index_nbytes
    assert struct.unpack("<I", raw[-4:])[0] == crc32c(index)


def test_uncompressed_chunks_are_the_values_themselves_with_a_crc() -> None:
    raw = shard_bytes(CodecSpec())
    first = ARRAY[8:10, 4:6].astype("<f4").tobytes()
    assert raw[:16] == first and raw[16:20] == struct.pack("<I", crc32c(first))
    edge = np.zeros((2, 2), dtype="<f4")
    edge[:, :1] = ARRAY[8:10, 6:7]
    assert raw[20:36] == edge.tobytes()  # the edge chunk is padded with zeros to the full chunk shape


def test_a_non_contiguous_box_is_encoded_by_value() -> None:
    box = np.asfortranarray(ARRAY[8:10, 4:7])
    assert not box.flags.c_contiguous
    assert shard_bytes(CodecSpec(), box) == shard_bytes(CodecSpec())


def test_a_full_interior_shard_has_every_chunk() -> None:
    geom = ShardGeometry(origin=(2, 0), shard=(4, 4), chunk=(2, 2), array_shape=(10, 7))
    enc = encode_shard(ARRAY[2:6, 0:4], geom, CodecSpec())
    raw = b"".join(bytes(b) for b in enc.buffers)
    assert ABSENT not in raw[-geom.index_nbytes:]
    assert np.array_equal(read_back(raw, geom, CodecSpec()), ARRAY[2:6, 0:4])
    assert enc.nbytes == 4 * (16 + 4) + 4 * 16 + 4


@pytest.mark.parametrize("codec", [CodecSpec(), CodecSpec("zstd", 3)], ids=["raw", "zstd"])
def test_streaming_a_shard_writes_the_same_bytes_as_encoding_it(codec: CodecSpec) -> None:
    sink = Sink()
    reads: list[ShardBox] = []

    def read(box: ShardBox) -> np.ndarray:
        reads.append(box)
        return np.asfortranarray(ARRAY[box.slices()])

    nbytes, crc = stream_shard(sink, GEOM, codec, 4, read)
    raw = b"".join(sink.parts)
    assert raw == shard_bytes(codec)
    assert nbytes == len(raw) and crc == struct.unpack("<I", raw[-4:])[0]
    assert reads == [ShardBox((8, 4), (2, 2)), ShardBox((8, 6), (2, 1))]  # nothing beyond the edge is read


def test_geometry_of_a_shard() -> None:
    geom = ShardGeometry(origin=(0, 0, 0), shard=(4, 6, 8), chunk=(2, 3, 2), array_shape=(4, 6, 8))
    assert geom.chunks_per_shard == (2, 2, 4)
    assert geom.nchunks == 16 and geom.index_nbytes == 16 * 16 + 4
    corners = [(0, 0, 0), (0, 0, 3), (0, 1, 0), (1, 0, 0), (1, 1, 3)]
    assert [geom.flat_index(c) for c in corners] == [0, 3, 4, 8, 15]
    assert list(geom.all_chunks())[:5] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0)]
    assert GEOM.chunk_box((0, 1)) == ShardBox((8, 6), (2, 1))
    assert GEOM.chunk_box((1, 1)).is_empty() and GEOM.chunk_box((1, 1)).offset == (10, 6)
    assert GEOM.chunk_box((0, 0)) == ShardBox((8, 4), (2, 2))


def test_chunks_overlapping_a_box() -> None:
    assert list(GEOM.chunks_overlapping(ShardBox((9, 5), (1, 2)))) == [(0, 0), (0, 1)]
    assert list(GEOM.chunks_overlapping(ShardBox((0, 0), (8, 7)))) == []  # above the shard
    assert list(GEOM.chunks_overlapping(ShardBox((0, 5), (10, 1)))) == [(0, 0)]
    assert list(GEOM.chunks_overlapping(ShardBox((10, 4), (2, 4)))) == [(1, 0), (1, 1)]


@pytest.mark.parametrize("codec", [CodecSpec("zstd", 1), CodecSpec("blosc-lz4", 1)], ids=["zstd", "blosc"])
def test_max_nbytes_bounds_incompressible_shards(codec: CodecSpec) -> None:
    geom = ShardGeometry(origin=(0,), shard=(4096,), chunk=(1024,), array_shape=(4096,))
    noise = np.random.default_rng(0).integers(0, 2**32, 4096, dtype="<u4")
    nbytes = encode_shard(noise, geom, codec).nbytes
    bound = geom.max_nbytes(4)
    assert nbytes <= bound <= 4 * (4096 + 4096 // 64 + 1028) + geom.index_nbytes


def _index(*entries: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack("<2Q", o, n) for o, n in entries)
    return body + struct.pack("<I", crc32c(body))


def test_decode_index_checks_its_size_and_its_crc() -> None:
    geom = ShardGeometry(origin=(0,), shard=(4,), chunk=(2,), array_shape=(4,))
    good = _index((0, 12), (12, 12))
    assert decode_index(good, geom, "k").tolist() == [[0, 12], [12, 12]]
    with pytest.raises(IntegrityError, match=r"^k: shard index is 35 bytes, expected 36$"):
        decode_index(good[:-1], geom, "k")
    with pytest.raises(IntegrityError, match=r"^k: shard index is 37 bytes, expected 36$"):
        decode_index(good + b"\0", geom, "k")
    for pos in (0, 31, 32, 35):
        bad = bytearray(good)
        bad[pos] ^= 1
        with pytest.raises(IntegrityError, match=r"^k: shard index crc32c mismatch$"):
            decode_index(bytes(bad), geom, "k")


def test_chunk_range_marks_absent_chunks_and_bounds_the_rest() -> None:
    geom = ShardGeometry(origin=(0,), shard=(6,), chunk=(2,), array_shape=(6,))
    empty = 2**64 - 1
    index = decode_index(_index((empty, empty), (0, 4), (4, 8)), geom, "k")
    assert chunk_range(index, 0, 100, "k") is None
    assert chunk_range(index, 1, 100, "k") == (0, 4)  # the smallest chunk: a bare crc32c
    assert chunk_range(index, 2, 12, "k") == (4, 12)  # ends exactly at the shard's end
    with pytest.raises(IntegrityError, match=r"^k: chunk 2 points outside the shard \(4\+8 > 11\)$"):
        chunk_range(index, 2, 11, "k")


@pytest.mark.parametrize("entry", [(2**64 - 1, 8), (0, 2**64 - 1), (0, 3), (2**62 - 7, 8)])
def test_chunk_range_rejects_entries_that_cannot_be_a_chunk(entry: tuple[int, int]) -> None:
    geom = ShardGeometry(origin=(0,), shard=(2,), chunk=(2,), array_shape=(2,))
    index = decode_index(_index(entry), geom, "k")
    with pytest.raises(IntegrityError, match=r"^k: chunk 0 points outside the shard "):
        chunk_range(index, 0, None, "k")


def test_chunk_range_of_a_shard_of_unknown_size_accepts_any_plausible_chunk() -> None:
    geom = ShardGeometry(origin=(0,), shard=(2,), chunk=(2,), array_shape=(2,))
    index = decode_index(_index((2**62 - 8, 8)), geom, "k")
    assert chunk_range(index, 0, None, "k") == (2**62 - 8, 2**62)


def test_verify_size_limit_of_a_shard() -> None:
    """``verify`` reports a shard larger than this as replaced or damaged: every chunk stored, each with
    1/64 + 1 KiB of compressor slack and its crc32c, plus the index."""
    geom = ShardGeometry(origin=(0, 0), shard=(64, 64), chunk=(32, 64), array_shape=(64, 64))
    chunk = 32 * 64 * 2
    assert geom.max_nbytes(2) == 2 * (chunk + chunk // 64 + 1024 + 4) + 2 * 16 + 4 == 10412


@pytest.mark.parametrize("codec", [CodecSpec(), CodecSpec("zstd", 3)], ids=["raw", "zstd"])
def test_chunks_after_one_beyond_the_edge_are_still_stored(codec: CodecSpec) -> None:
    # At the right edge, every other chunk in C order lies beyond the array: (0, 1) and (1, 1).
    geom = ShardGeometry(origin=(0, 4), shard=(4, 4), chunk=(2, 2), array_shape=(4, 5))
    data = np.arange(20, dtype="<f4").reshape(4, 5)[:, 4:]
    raw = b"".join(bytes(b) for b in encode_shard(data, geom, codec).buffers)
    want = np.zeros((4, 4), dtype="<f4")
    want[:, :1] = data
    assert np.array_equal(read_back(raw, geom, codec), want)
    sink = Sink()
    stream_shard(sink, geom, codec, 4, lambda box: np.arange(20, dtype="<f4").reshape(4, 5)[box.slices()])
    assert b"".join(sink.parts) == raw
