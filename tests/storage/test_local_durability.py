"""What ``LocalStore`` makes durable, and when: every object and every new directory entry is fsync'd
before ``flush`` returns and before a published object (the commit) becomes visible.

A SIGKILL keeps the page cache, so no crash test short of a power cut sees a missing fsync; the
strace-based crash-state tests (tests/format/test_crash_states.py) do, but take minutes. This one
records the real ``fsync``/``fdatasync`` calls (they still run) and the path behind each descriptor,
in milliseconds, so the fast mutation run catches a store that stops syncing.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ckptd.storage import LocalStore
from ckptd.storage.local import WRITEBACK_BYTES


def test_flush_syncs_every_written_file_and_every_new_directory(tmp_path: Path, synced: list[Path]) -> None:
    store = LocalStore(tmp_path / "run")
    step = store.child("step_1")
    step.write("a/c.0", [b"x" * 10])
    step.write("a/b/c.1", [b"y", b"z"])
    assert synced == []  # small writes are synced together, at flush
    step.flush()
    root = tmp_path / "run"
    files = {root / "step_1/a/c.0", root / "step_1/a/b/c.1"}
    dirs = {tmp_path, root, root / "step_1", root / "step_1/a", root / "step_1/a/b"}
    assert set(synced) == files | dirs
    assert max(synced.index(f) for f in files) < min(synced.index(d) for d in dirs - {tmp_path})
    synced.clear()
    step.flush()
    assert synced == []  # nothing new: nothing to sync again


def test_a_large_write_starts_its_writeback_at_once_and_is_synced_beside_the_writers(
    tmp_path: Path, synced_by: list[tuple[Path, str]], writeback_started: list[Path]
) -> None:
    store = LocalStore(tmp_path)
    store.write("big", [b"\0" * WRITEBACK_BYTES])
    store.write("small", [b"\0" * (WRITEBACK_BYTES - 1)])
    assert writeback_started == [tmp_path / "big"]  # the device gets it while the writer fills the next file
    store.flush()
    threads = dict(synced_by)
    # Nobody waits for the device inside a writer thread: the large file is synced by the store's
    # background thread, the small one with the rest at flush, and both before flush returns.
    assert threads[tmp_path / "big"].startswith("ckptd-sync")
    assert tmp_path / "small" in threads and threads[tmp_path / "small"] != threading.current_thread().name


def test_a_failed_background_sync_is_raised_by_flush_and_the_next_save_starts_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    real = os.fdatasync

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full_disk)
    store.write("big", [b"\0" * WRITEBACK_BYTES])
    with pytest.raises(OSError, match="No space left"):
        store.flush()
    monkeypatch.setattr(os, "fdatasync", real)
    store.write("again", [b"\0" * WRITEBACK_BYTES])
    store.flush()  # the failure was reported once; it does not poison the store


def test_starting_writeback_is_best_effort(tmp_path: Path) -> None:
    from ckptd.storage.writeback import start_writeback

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        assert start_writeback(fd) is True  # ext4 here
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert start_writeback(w) is False  # ESPIPE: refused, not raised
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("exclusive", [True, False])
def test_publishing_syncs_earlier_writes_then_the_object_then_its_directory(
    tmp_path: Path, synced: list[Path], exclusive: bool
) -> None:
    store = LocalStore(tmp_path)
    store.write("a/c.0", [b"x"])
    (store.write_exclusive if exclusive else store.write_atomic)("a/manifest.json", b"{}")
    assert (tmp_path / "a/manifest.json").read_bytes() == b"{}"
    data = synced.index(tmp_path / "a/c.0")
    tmp = [i for i, p in enumerate(synced) if p.name.startswith(".manifest.json.")]
    assert len(tmp) == 1 and data < tmp[0]  # the shard is durable before the commit's bytes
    assert synced[-1] == tmp_path / "a"  # the rename (or link) itself is made durable last
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


def test_fsync_false_syncs_nothing(tmp_path: Path, synced: list[Path]) -> None:
    store = LocalStore(tmp_path, fsync=False)
    store.write("a/c.0", [b"x" * WRITEBACK_BYTES])
    store.flush()
    store.write_exclusive("a/manifest.json", b"{}")
    assert synced == [] and (tmp_path / "a/manifest.json").read_bytes() == b"{}"


@pytest.mark.parametrize("size", [1, WRITEBACK_BYTES])
def test_files_deleted_before_they_are_synced_do_not_fail_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # A failed attempt (a full disk) leaves written files behind; its cleanup deletes them before
    # they are synced. The next save's flush must neither fail on them nor skip its own files.
    from ckptd.storage import local

    deleted = threading.Event()
    synced: list[Path] = []
    real = local._fsync_file

    def after_the_cleanup(p: Path) -> None:  # the background sync loses the race to the cleanup
        deleted.wait(timeout=10)
        real(p)
        synced.append(p)

    monkeypatch.setattr(local, "_fsync_file", after_the_cleanup)
    store = LocalStore(tmp_path / "run")
    failed = store.child("step_1")
    failed.write("a-1/w/c.0", [b"\0" * size])
    failed.delete_prefix("a-1")
    deleted.set()
    store.write("step_2/w/c.0", [b"\1" * size])
    store.flush()
    assert synced == [tmp_path / "run/step_2/w/c.0"]
