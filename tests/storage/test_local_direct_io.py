"""``LocalStore(direct_io=True)``: large files go around the page cache, byte for byte, durably.

What a user notices: the file reads back exactly (sizes that are no multiple of the staging
alignment or buffer included), it is still synced before ``flush`` returns, it does not sit in
the page cache afterwards (the point of the setting), and a filesystem or device that refuses
``O_DIRECT`` still gets a complete file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from ckptd.format.errors import StorageError
from ckptd.storage import LocalStore, direct
from ckptd.storage.local import WRITEBACK_BYTES
from tests.page_cache import MEMORY_FILESYSTEMS, fs_type, resident_fraction


@pytest.fixture()
def disk_path(tmp_path: Path) -> Path:
    if fs_type(tmp_path) in MEMORY_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is on {fs_type(tmp_path)}: its pages never leave memory")
    return tmp_path


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("sizes", [
    [WRITEBACK_BYTES],                                  # exactly the threshold
    [WRITEBACK_BYTES + 1],                              # a padded, truncated last block
    [direct.PIECE, 4],                                  # one full staging piece, then a chunk's crc
    [3 * 2**20 + 4, 3 * 2**20 + 4, 100, 7],             # chunk + crc pairs straddling pieces
    [direct.PIECE * 2 + direct.ALIGN - 1],              # one buffer larger than the staging piece
])
def test_a_direct_write_reads_back_exactly(disk_path: Path, sizes: list[int]) -> None:
    store = LocalStore(disk_path, direct_io=True)
    parts = [payload(n, seed=i) for i, n in enumerate(sizes)]
    assert store.write("a/shard", [memoryview(p) for p in parts]) == sum(sizes)
    store.flush()
    assert (disk_path / "a/shard").stat().st_size == sum(sizes)
    assert store.read("a/shard") == b"".join(parts)


def test_a_direct_write_leaves_the_page_cache_alone_and_a_buffered_one_does_not(disk_path: Path) -> None:
    data = [payload(4 * 2**20)]
    LocalStore(disk_path / "direct", direct_io=True).write("shard", data)
    LocalStore(disk_path / "buffered").write("shard", data)
    assert resident_fraction(disk_path / "direct/shard") < 0.05
    assert resident_fraction(disk_path / "buffered/shard") > 0.9


def test_a_small_file_is_written_buffered_even_with_direct_io(disk_path: Path) -> None:
    store = LocalStore(disk_path, direct_io=True)
    store.write("zarr.json", [b"{}" * 100])
    assert resident_fraction(disk_path / "zarr.json") == 1.0


def test_a_direct_write_is_durable_before_flush_returns(
    disk_path: Path, synced_by: list[tuple[Path, str]]
) -> None:
    store = LocalStore(disk_path, direct_io=True).child("step_1")
    store.write("big", [payload(WRITEBACK_BYTES + 5)])
    store.flush()
    threads = dict(synced_by)
    assert threads[disk_path / "step_1/big"].startswith("ckptd-sync")  # its size and extents
    assert disk_path / "step_1" in threads  # and its new directory entry


def test_a_filesystem_refusing_o_direct_gets_the_buffered_write(
    disk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what e.g. some FUSE filesystems say
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    data = payload(2 * 2**20 + 3)
    store = LocalStore(disk_path, direct_io=True)
    assert store.write("shard", [data]) == len(data)
    store.flush()
    assert store.read("shard") == data


def test_a_device_wanting_larger_alignment_midway_gets_a_complete_buffered_file(
    disk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    calls = []

    def refuse_second(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_second)
    data = payload(direct.PIECE + 12345)
    store = LocalStore(disk_path, direct_io=True)
    assert store.write("shard", [data]) == len(data)
    store.flush()
    assert calls[:2] == [0, direct.PIECE]
    assert store.read("shard") == data


def test_a_full_disk_during_a_direct_write_is_a_storage_error_and_the_next_flush_is_clean(
    disk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = LocalStore(disk_path, direct_io=True)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StorageError, match="No space left"):
        store.write("shard", [payload(2 * 2**20)])
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    store.delete("shard")  # a failed attempt's cleanup
    store.write("other", [payload(2 * 2**20, seed=1)])
    store.flush()
    assert store.read("other") == payload(2 * 2**20, seed=1)
