"""What ``LocalStore`` makes durable, and when: every object and every new directory entry is fsync'd
before ``flush`` returns and before a published object (the commit) becomes visible.

A SIGKILL keeps the page cache, so no crash test short of a power cut sees a missing fsync; the
strace-based crash-state tests (tests/format/test_crash_states.py) do, but take minutes. This one
records the real ``fsync``/``fdatasync`` calls (they still run) and the path behind each descriptor,
in milliseconds, so the fast mutation run catches a store that stops syncing.
"""

from __future__ import annotations

import os
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


def test_a_large_write_starts_its_writeback_at_once_and_is_synced_with_the_rest(
    tmp_path: Path, synced: list[Path], writeback_started: list[Path]
) -> None:
    store = LocalStore(tmp_path)
    store.write("big", [b"\0" * WRITEBACK_BYTES])
    store.write("small", [b"\0" * (WRITEBACK_BYTES - 1)])
    assert writeback_started == [tmp_path / "big"]  # the device gets it while the writer fills the next file
    assert synced == []  # nobody waits for the device inside a writer thread
    store.flush()
    assert {tmp_path / "big", tmp_path / "small"} <= set(synced)


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
