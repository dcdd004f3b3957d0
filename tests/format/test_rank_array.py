"""The rank-state array (SPEC §8.3), on real files: zarr-python reads it as the spec says, ckptd reads
each rank's row alone, and every damaged chunk is refused with one line naming its key while the
previous step still loads."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import torch
import zarr

from ckptd.format import CheckpointError, IntegrityError, MetadataError
from ckptd.format.codecs import crc32c
from ckptd.format.commit import new_attempt
from ckptd.format.rank_array import (
    ROW_BYTES,
    ROW_CODEC,
    encode_rank_chunk,
    rank_chunk_key,
)
from ckptd.format.run import Run, step_dir
from ckptd.format.tree import TAG
from ckptd.format.writer import CheckpointWriter
from ckptd.storage import LocalStore

WORLD = 3
SAVERS = (0, 1)  # rank 2 saves nothing of its own


def rng_of(step: int, rank: int) -> dict[str, Any]:
    return {"rng": {"torch": f"{step}-{rank}-" + "q" * 400, "seed": step * 10 + rank}}


def save(root: Path, step: int) -> str:
    """A committed format v2 checkpoint of a job of WORLD ranks, written as the engine does."""
    run = Run(LocalStore(root))
    attempt = new_attempt()
    data = run.prepare(step, attempt=attempt)
    writer = CheckpointWriter(data, rank=0)
    writer.add("w", torch.arange(6, dtype=torch.float32) + step)
    report = writer.finish()
    step_store = run.checkpoint_store(step)
    for rank in SAVERS:
        step_store.write(rank_chunk_key(attempt, rank), encode_rank_chunk(attempt, rank, rng_of(step, rank)))
    step_store.flush()
    run.commit(step, [report], state={"w": {TAG: "tensor", "path": "w"}}, world_size=WORLD, attempt=attempt,
               rank_state="array")
    return attempt


def chunk_path(root: Path, step: int, attempt: str, rank: int) -> Path:
    return root / step_dir(step) / rank_chunk_key(attempt, rank)


def test_zarr_python_opens_the_rank_state_array_and_rows_are_the_documents(tmp_path: Path) -> None:
    attempt = save(tmp_path, 5)
    arr = zarr.open_array(str(tmp_path / step_dir(5) / f"{attempt}.meta" / "ranks"), mode="r")
    assert (arr.shape, arr.dtype, arr.chunks) == ((WORLD, ROW_BYTES), np.dtype("uint8"), (1, ROW_BYTES))
    for rank in SAVERS:
        doc = json.loads(np.asarray(arr[rank]).tobytes().rstrip(b"\0"))
        assert (doc["format"], doc["attempt"], doc["rank"]) == ("ckptd-rank", attempt, rank)
        assert doc["state"] == rng_of(5, rank)
    assert not np.any(arr[2])  # no chunk: the fill value, "no state"
    run = Run(LocalStore(tmp_path))
    m = run.manifest(5)
    assert m.rank_state == "array"
    assert [run.rank_state(5, r, m) for r in range(WORLD)] == [rng_of(5, 0), rng_of(5, 1), None]
    with pytest.raises(MetadataError, match="rank 3 is outside the saved world of 3"):
        run.rank_state(5, 3, m)


def flip(raw: bytes) -> bytes:
    return raw[:40] + bytes([raw[40] ^ 0x10]) + raw[41:]


def zstd_bomb(declared_size: bool) -> Callable[[bytes], bytes]:
    """A well-formed chunk (valid crc32c) whose frame inflates to 64 MiB: with its size declared in
    the frame header, or without (a streaming frame: the size shows only while inflating)."""

    def make(_: bytes) -> bytes:
        frame = bytes(numcodecs.Zstd(level=1).encode(np.zeros(64 * 2**20, np.uint8)))
        if not declared_size:
            fhd = frame[4]
            fcs_len = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
            header = 1 + (0 if fhd & 0x20 else 1) + fcs_len
            frame = frame[:4] + bytes([0x00, 0x88]) + frame[4 + header:]  # window 2^27, no size
        return frame + struct.pack("<I", crc32c(frame))

    return make


DAMAGE: list[tuple[str, Callable[[bytes], bytes], type[CheckpointError], str]] = [
    ("flipped byte", flip, IntegrityError, "crc32c mismatch"),
    ("truncated", lambda raw: raw[: len(raw) // 2], IntegrityError, "crc32c mismatch"),
    ("three bytes", lambda raw: raw[:3], IntegrityError, "chunk is truncated"),
    ("zstd bomb, size declared", zstd_bomb(True), IntegrityError, "does not decompress"),
    ("zstd bomb, streaming frame", zstd_bomb(False), IntegrityError, "does not decompress"),
    ("oversize object", lambda raw: raw + b"\0" * 2 * ROW_BYTES, IntegrityError, "more than any"),
]


@pytest.mark.parametrize(("name", "damage", "error", "message"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_chunk_is_one_line_naming_its_key_and_the_previous_step_loads(
        tmp_path: Path, name: str, damage: Callable[[bytes], bytes], error: type[CheckpointError],
        message: str) -> None:
    save(tmp_path, 1)
    attempt = save(tmp_path, 2)
    path = chunk_path(tmp_path, 2, attempt, 1)
    path.write_bytes(damage(path.read_bytes()))
    run = Run(LocalStore(tmp_path))
    with pytest.raises(error) as e:
        run.rank_state(2, 1, run.manifest(2))
    text = str(e.value)
    assert message in text and rank_chunk_key(attempt, 1) in text and "\n" not in text, text
    assert run.rank_state(2, 0, run.manifest(2)) == rng_of(2, 0)  # the other rows are untouched
    assert run.rank_state(1, 1, run.manifest(1)) == rng_of(1, 1)


def test_a_chunk_of_another_rank_or_attempt_copied_in_place_is_refused(tmp_path: Path) -> None:
    other = save(tmp_path, 1)
    attempt = save(tmp_path, 2)
    run = Run(LocalStore(tmp_path))
    m = run.manifest(2)
    for source in (chunk_path(tmp_path, 2, attempt, 0), chunk_path(tmp_path, 1, other, 1)):
        chunk_path(tmp_path, 2, attempt, 1).write_bytes(source.read_bytes())
        with pytest.raises(IntegrityError) as e:
            run.rank_state(2, 1, m)
        assert str(e.value).endswith(f"/{step_dir(2)}/{rank_chunk_key(attempt, 1)} belongs to another "
                                     "attempt or rank")
    assert run.rank_state(1, 1, run.manifest(1)) == rng_of(1, 1)


def test_a_row_that_is_not_a_sealed_document_is_a_metadata_error(tmp_path: Path) -> None:
    attempt = save(tmp_path, 2)
    row = bytearray(ROW_BYTES)
    row[:8] = b'{"x": 1}'
    chunk_path(tmp_path, 2, attempt, 0).write_bytes(b"".join(ROW_CODEC.encode(memoryview(row), 1)))
    run = Run(LocalStore(tmp_path))
    with pytest.raises(CheckpointError, match=r"c/0/0.*not sealed"):
        run.rank_state(2, 0, run.manifest(2))


def test_padding_must_be_zeros_and_an_all_zero_chunk_is_no_state(tmp_path: Path) -> None:
    attempt = save(tmp_path, 2)
    path = chunk_path(tmp_path, 2, attempt, 0)
    row = bytearray(ROW_CODEC.decode(path.read_bytes(), ROW_BYTES, "row"))
    row[-1] = 7  # a byte after the document's zero padding
    path.write_bytes(b"".join(ROW_CODEC.encode(memoryview(row), 1)))
    run = Run(LocalStore(tmp_path))
    m = run.manifest(2)
    with pytest.raises(MetadataError) as e:
        run.rank_state(2, 0, m)
    assert str(e.value).endswith(f"{rank_chunk_key(attempt, 0)}: the row does not end in a sealed document "
                                 "and zero padding")
    # zarr-python may write the fill value explicitly: it means what an absent chunk means
    path.write_bytes(b"".join(ROW_CODEC.encode(memoryview(bytearray(ROW_BYTES)), 1)))
    assert run.rank_state(2, 0, m) is None
