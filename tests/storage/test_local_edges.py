"""Edges of ``LocalStore`` a user meets: which keys are refused and with what words, the streaming
writer, file permissions, the eager-fsync threshold, many writers creating one new directory at
once, and a shard that vanishes before the commit."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from ckptd.format.errors import CheckpointExistsError, StorageError
from ckptd.storage import LocalStore


@pytest.mark.parametrize("key", ["a\\b", "step_1\\..\\..\\x", "/etc/passwd", "a/../../b", "./a"])
def test_keys_that_could_leave_the_root_are_refused_with_the_whole_message(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(StorageError) as err:
        store.write(key, [b"x"])
    want = f"refusing key {key!r}: it would leave the store root {tmp_path / 'root'}"
    assert str(err.value) == want
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*"))


def test_a_symlink_below_the_root_is_named_in_the_whole_message(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "step_1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StorageError) as err:
        LocalStore(root).read("step_1/a/manifest.json")
    assert str(err.value) == (f"refusing {root}/step_1/a/manifest.json: {root}/step_1 is a symbolic link "
                              f"(ckptd never follows links inside a run root)")


def test_writing_the_root_itself_names_it_as_slash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.write("x", [b"1"])
    with pytest.raises(StorageError) as err:
        store.write("", [b"1"])
    assert re.fullmatch(rf"writing / on {re.escape(store.url)} failed: .*", str(err.value))


def test_streamed_objects_read_back_and_a_stream_under_a_file_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    stream = store.open_write("step_1/a/c.0")
    assert stream.write(b"abc") == 3
    stream.write(memoryview(b"defg"))
    stream.close()
    assert store.read("step_1/a/c.0") == b"abcdefg"
    with pytest.raises(StorageError) as err:
        store.open_write("step_1/a/c.0/inner")
    assert re.fullmatch(rf"opening for writing step_1/a/c.0/inner on {re.escape(store.url)} failed: .*",
                        str(err.value))
    assert err.value.key == "step_1/a/c.0/inner"


def test_objects_are_created_rw_r_r_under_a_zero_umask(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    old = os.umask(0)
    try:
        store.write("a/c.0", [b"x"])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a/c.0").stat().st_mode) == 0o644


def test_a_write_of_one_mib_starts_its_writeback_at_once_and_both_are_synced_by_flush(
    tmp_path: Path, synced: list[Path], writeback_started: list[Path]
) -> None:
    store = LocalStore(tmp_path)
    store.write("small", [b"\0" * ((1 << 20) - 1)])
    assert writeback_started == []  # below the limit: left to flush
    store.write("big", [b"\0" * (1 << 19), b"\1" * (1 << 19)])  # 1 MiB in two buffers
    assert writeback_started == [tmp_path / "big"]
    store.flush()
    assert set(synced[:2]) == {tmp_path / "small", tmp_path / "big"}  # the files, then the directories


def test_many_writers_creating_one_new_directory_at_once_all_succeed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for round_ in range(20):
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def write(i: int, round_: int = round_, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                store.write(f"r{round_}/a/b/c.{i}", [bytes([i])])
            except BaseException as e:  # collected: the test thread asserts
                errors.append(e)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(p.name for p in (tmp_path / f"r{round_}/a/b").iterdir()) == [f"c.{i}" for i in range(8)]


def test_a_shard_vanishing_before_the_commit_fails_the_publish_with_a_storage_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write("a/c.0", [b"x"])
    (tmp_path / "a/c.0").unlink()  # e.g. a gc of another process
    with pytest.raises(StorageError) as err:
        store.write_exclusive("a/manifest.json", b"{}")
    assert re.fullmatch(rf"publishing a/manifest.json on {re.escape(store.url)} failed: .*", str(err.value))
    assert not (tmp_path / "a/manifest.json").exists()


def test_a_second_exclusive_publish_is_refused_with_the_whole_message(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_exclusive("step_1/manifest.json", b"first")
    with pytest.raises(CheckpointExistsError) as err:
        store.write_exclusive("step_1/manifest.json", b"second")
    path = tmp_path / "step_1/manifest.json"
    assert str(err.value) == f"{path} already exists: another writer committed first"
    assert path.read_bytes() == b"first"
    assert store.list_dir("step_1") == ["manifest.json"]  # no temporary name is left


def test_a_stream_onto_a_full_device_fails_with_a_storage_error_naming_the_write(tmp_path: Path) -> None:
    """Disk full while streaming (a ``/dev/full`` node stands in for the full disk)."""
    store = LocalStore(tmp_path)
    for key, size in (("big", 1 << 20), ("small", 10)):
        try:
            os.mknod(tmp_path / key, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
        stream = store.open_write(key)
        with pytest.raises(StorageError) as err:
            stream.write(b"x" * size)  # a big write goes straight to the device
            stream.close()  # a small one fails when flushed
        assert re.fullmatch(rf"writing {key} on {re.escape(store.url)} failed: .*", str(err.value))
        assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
        assert not (tmp_path / key).exists()  # the failed stream removed what it had created


def test_ranges_and_tails_are_clamped_to_the_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write("c.0", [b"0123456789"])
    assert store.read_ranges("c.0", [(0, 4), (4, 4), (8, 100), (12, 20)]) == [b"0123", b"", b"89", b""]
    assert store.read_tail("c.0", 3) == b"789"
    assert store.read_tail("c.0", 10) == b"0123456789"
    assert store.read_tail("c.0", 100) == b"0123456789"  # a tail longer than the object: all of it
    assert store.read_tail("c.0", 0) == b""


def test_hidden_entries_are_not_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write("d/b", [b"1"])
    store.write("d/a", [b"1"])
    (tmp_path / "d/.manifest.json.0123.tmp").write_bytes(b"partial")
    assert store.list_dir("d") == ["a", "b"]


def test_deleting_the_whole_root_is_refused_and_fsync_false_syncs_no_delete(
    tmp_path: Path, synced: list[Path]
) -> None:
    store = LocalStore(tmp_path / "root", fsync=False)
    store.write("step_1/c.0", [b"1"])
    with pytest.raises(StorageError) as err:
        store.delete_prefix("")
    assert str(err.value) == "refusing to delete a whole store root"
    store.delete_prefix("step_1")
    assert not (tmp_path / "root/step_1").exists() and synced == []
    durable = LocalStore(tmp_path / "root")
    durable.write("step_2/c.0", [b"1"])
    durable.flush()
    synced.clear()
    durable.delete_prefix("step_2")
    assert synced == [tmp_path / "root"]  # the removal itself is made durable
