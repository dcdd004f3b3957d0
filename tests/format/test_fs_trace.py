"""The strace parser behind the crash-state tests, on logs whose threads interleave.

With ``strace -f`` the log is in the order strace handled each call's exit, which is not always
the order the kernel did the work. These logs have the shapes a save's threads produced in CI;
the crash-state tests can only vouch for a save the parser replays faithfully.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fs_trace import FsModel, TraceError, parse


def _parse(tmp_path: Path, log: str) -> tuple[list[tuple[str, str]], FsModel]:
    root = Path(os.path.realpath(tmp_path)) / "run"
    root.mkdir()
    model = FsModel.of_tree(root)
    ops = parse(log.replace("ROOT", str(root)), root, model, cwd=tmp_path)
    return [(op.kind, op.path) for op in ops], model


def test_a_close_logged_after_its_fd_was_reused_for_the_same_file_keeps_the_new_fd(tmp_path: Path) -> None:
    # A writer closes a.bin while the sync thread, handed the path, already opened it again as 3.
    log = """\
101 openat(AT_FDCWD, "ROOT/a.bin", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0644) = 3<ROOT/a.bin>
101 write(3<ROOT/a.bin>, ""..., 10) = 10
101 close(3<ROOT/a.bin> <unfinished ...>
102 openat(AT_FDCWD, "ROOT/a.bin", O_RDONLY|O_CLOEXEC) = 3<ROOT/a.bin>
101 <... close resumed>) = 0
102 fdatasync(3<ROOT/a.bin>) = 0
102 close(3<ROOT/a.bin>) = 0
"""
    ops, model = _parse(tmp_path, log)
    assert ops == [("create", "a.bin"), ("write", "a.bin"), ("fsync", "a.bin")]
    assert model.durable_extents[model.lookup("a.bin")] == {(0, 10)}


def test_a_close_that_began_after_the_open_returned_closes_it(tmp_path: Path) -> None:
    log = """\
101 openat(AT_FDCWD, "ROOT/a.bin", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0644) = 3<ROOT/a.bin>
101 close(3<ROOT/a.bin>) = 0
102 fdatasync(3<ROOT/a.bin>) = 0
"""
    with pytest.raises(KeyError):  # fd 3 is closed: an fsync through it is not replayable
        _parse(tmp_path, log)


def test_a_mkdir_whose_exit_is_logged_after_another_thread_used_the_directory(tmp_path: Path) -> None:
    # Two writers make d/ for their files: one's mkdir wins but its exit is handled last.
    log = """\
101 mkdir("ROOT/d", 0777 <unfinished ...>
102 mkdir("ROOT/d", 0777) = -1 EEXIST (File exists)
102 mkdir("ROOT/d/e", 0777) = 0
102 openat(AT_FDCWD, "ROOT/d/e/f", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0644) = 3<ROOT/d/e/f>
101 <... mkdir resumed>) = 0
"""
    ops, model = _parse(tmp_path, log)
    assert ops == [("mkdir", "d"), ("mkdir", "d/e"), ("create", "d/e/f")]
    assert "f" in model.entries[model.lookup("d/e")]


def test_a_file_in_a_directory_no_mkdir_made_is_refused(tmp_path: Path) -> None:
    log = """\
102 openat(AT_FDCWD, "ROOT/d/f", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0644) = 3<ROOT/d/f>
101 mkdir("ROOT/d", 0777) = 0
"""
    with pytest.raises(TraceError, match="which no mkdir made"):
        _parse(tmp_path, log)
