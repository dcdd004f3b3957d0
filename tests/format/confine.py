"""An audit hook that records every file write, delete or rename outside one directory and every
read outside it and the interpreter's own files: hostile checkpoint tests run inside ``confined_to``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from damaged import REPO

_ALLOWED_READ_PREFIXES = tuple(
    {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        str(REPO),
        "/dev/",
        "/proc/",
        "/sys/",
        "/etc/localtime",
        "/usr/",
    }
)
_audit_root: list[Path] = []
_audit_violations: list[str] = []


def _abs(path: Any, dir_fd: Any = None) -> str | None:
    if not isinstance(path, str | bytes | os.PathLike):
        return None
    p = os.fsdecode(path)
    if isinstance(dir_fd, int) and not os.path.isabs(p):
        p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)  # shutil.rmtree works relative to fds
    return os.path.abspath(p)


# event -> indexes of (path, dir_fd) pairs in its arguments (dir_fd index None when the event has none)
_MUTATING_EVENTS: dict[str, list[tuple[int, int | None]]] = {
    "os.remove": [(0, 1)],
    "os.rmdir": [(0, 1)],
    "os.mkdir": [(0, 2)],
    "shutil.rmtree": [(0, 1)],
    "os.rename": [(0, 2), (1, 3)],
    "os.link": [(0, 2), (1, 3)],
    "os.symlink": [(1, 2)],
    "os.truncate": [(0, None)],
    "os.chmod": [(0, 2)],
    "os.utime": [(0, 3)],
}


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _audit_root:
        return
    root = str(_audit_root[0])

    def inside(p: str) -> bool:
        return p == root or p.startswith(root + os.sep)

    if event == "open":
        path, mode, flags = args
        p = _abs(path)
        if p is None:
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        )
        relative_to_fd = not os.path.isabs(os.fsdecode(path)) and not writing  # rmtree's read-only dir opens
        if not inside(p) and not relative_to_fd and (writing or not p.startswith(_ALLOWED_READ_PREFIXES)):
            _audit_violations.append(f"{event} {p} mode={mode} flags={flags}")
    elif event in _MUTATING_EVENTS:
        for pi, fi in _MUTATING_EVENTS[event]:
            p = _abs(args[pi], args[fi] if fi is not None and fi < len(args) else None)
            if p is not None and not inside(p):
                _audit_violations.append(f"{event} {p}")


sys.addaudithook(_audit_hook)  # inert unless _audit_root is set


@contextlib.contextmanager
def confined_to(root: Path) -> Iterator[None]:
    _audit_root[:] = [root.resolve()]
    _audit_violations.clear()
    try:
        yield
    finally:
        _audit_root.clear()
    assert not _audit_violations, _audit_violations
