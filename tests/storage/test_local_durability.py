"""What ``LocalStore`` makes durable, and when: every object and every new directory entry is fsync'd
before ``flush`` returns and before a published object (the commit) becomes visible.

A SIGKILL keeps the page cache, so no crash test short of a power cut sees a missing fsync; the
strace-based crash-state tests (tests/format/test_crash_states.py) do, but take minutes. This one
records the real ``fsync``/``fdatasync`` calls (they still run) and the path behind each descriptor,
in milliseconds, so the fast mutation run catches a store that stops syncing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.storage import LocalStore
from ckptd.storage.local import EAGER_FSYNC_BYTES


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


def test_a_large_write_is_synced_at_once(tmp_path: Path, synced: list[Path]) -> None:
    store = LocalStore(tmp_path)
    store.write("big", [b"\0" * EAGER_FSYNC_BYTES])
    assert synced == [tmp_path / "big"]


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
    store.write("a/c.0", [b"x" * EAGER_FSYNC_BYTES])
    store.flush()
    store.write_exclusive("a/manifest.json", b"{}")
    assert synced == [] and (tmp_path / "a/manifest.json").read_bytes() == b"{}"
