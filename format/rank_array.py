"""Rank state as one Zarr v3 array: ``<attempt>.meta/ranks/`` (SPEC §8.3).

Row ``r`` of the ``uint8`` array ``[R, ROW_BYTES]`` (one chunk per row, key ``c/<r>/0``) is the
sealed JSON document of rank ``r`` (``{"format": "ckptd-rank", ...}``) followed by zero bytes.
So each rank's state is a shard object of a real array: zarr-python opens it, a save costs no
PUT beyond shard objects and one ``zarr.json``, and a restoring rank reads only its own chunk
(one GET; it never needs ``zarr.json``, whose content SPEC fixes). JSON never holds a NUL byte,
which is why trailing zeros can be stripped; a missing chunk is the fill value: no state.
"""

from __future__ import annotations

import json
from typing import Any

from ckptd.format.codecs import CRC_BYTES, CodecSpec
from ckptd.format.commit_record import meta_key
from ckptd.format.errors import IntegrityError, MetadataError
from ckptd.format.manifest import FORMAT_NAME
from ckptd.format.store import Store
from ckptd.format.strict_json import dumps_sealed, loads_sealed, obj

ROW_BYTES = 1 * 2**20
"""L: the rank-state limit. A real RNG state is ~20 KB as JSON; 1 MiB of mostly zeros costs
about a millisecond to inflate, so every restoring rank pays little for the headroom."""
ROW_CODEC = CodecSpec("zstd", 1)
MAX_CHUNK_BYTES = ROW_BYTES + ROW_BYTES // 128 + 1024 + CRC_BYTES
"""Above zstd's worst case for one row: a bigger object is refused before it is read whole."""
RANKS_NAME = "ranks"


def rank_array_key(attempt: str, name: str) -> str:
    return meta_key(attempt, f"{RANKS_NAME}/{name}")


def rank_chunk_key(attempt: str, rank: int) -> str:
    return rank_array_key(attempt, f"c/{rank}/0")


def rank_array_document(world_size: int) -> bytes:
    """The array's ``zarr.json`` (written once, by rank 0): one row per rank of the job."""
    doc = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [world_size, ROW_BYTES],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, ROW_BYTES]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": ROW_CODEC.zarr_codecs(1),
        "attributes": {"ckptd": {"kind": "rank_state", "format": f"{FORMAT_NAME}-rank"}},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_rank_chunk(attempt: str, rank: int, state: dict[str, Any]) -> list[bytes | memoryview]:
    """Rank ``rank``'s chunk: its sealed document, zero padded to a row, through the codec chain."""
    doc = dumps_sealed({"format": f"{FORMAT_NAME}-rank", "attempt": attempt, "rank": rank, "state": state})
    if len(doc) > ROW_BYTES:
        raise MetadataError(f"rank {rank}'s state would be {len(doc)} bytes (limit {ROW_BYTES})")
    row = bytearray(ROW_BYTES)
    row[: len(doc)] = doc
    return ROW_CODEC.encode(memoryview(row), 1)


def load_rank_chunk(store: Store, attempt: str, rank: int, world_size: int,
                    where: str) -> dict[str, Any] | None:
    """Rank ``rank``'s own state from its chunk (None when it saved none); every fault is an
    :class:`IntegrityError` or :class:`MetadataError` naming the chunk's key."""
    if not 0 <= rank < world_size:
        raise MetadataError(f"{where}: rank {rank} is outside the saved world of {world_size}")
    key = rank_chunk_key(attempt, rank)
    at = f"{where}/{key}"
    try:
        (raw,) = store.read_ranges(key, [(0, MAX_CHUNK_BYTES + 1)])
    except FileNotFoundError:
        return None
    if len(raw) > MAX_CHUNK_BYTES:
        raise IntegrityError(f"{at}: {len(raw)}+ bytes, more than any encoded rank-state row")
    # bounded: the output buffer is one row, so a frame inflating past it is refused, not allocated
    row = bytes(ROW_CODEC.decode(raw, ROW_BYTES, at, bounded=True))
    # Trailing zeros stripped: a sealed document ends with "}", so the padding is what follows the
    # last "}" (bytes.rstrip walks a MiB of zeros 100x slower than rfind's memrchr).
    end = row.rfind(b"}") + 1
    if row[end:] != bytes(ROW_BYTES - end):
        raise MetadataError(f"{at}: the row does not end in a sealed document and zero padding")
    if end == 0:
        return None  # an all-zero row is the fill value: no state, as if the chunk were absent
    doc = loads_sealed(row[:end], at, limit=ROW_BYTES)
    if doc.get("format") != f"{FORMAT_NAME}-rank" or doc.get("attempt") != attempt or doc.get("rank") != rank:
        raise IntegrityError(f"{at} belongs to another attempt or rank")
    return obj(doc.get("state"), f"{at} state")


__all__ = ["ROW_BYTES", "encode_rank_chunk", "load_rank_chunk", "rank_array_document", "rank_chunk_key"]
