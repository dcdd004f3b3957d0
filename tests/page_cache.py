"""Whether a file's pages sit in the page cache: what ``direct_io`` is for, seen from outside."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
"""Filesystems whose pages are the file: residency says nothing there."""

_libc = ctypes.CDLL(None, use_errno=True)


def resident_fraction(path: Path) -> float:
    """Fraction of ``path``'s pages in the page cache (``mincore(2)`` on a private mapping)."""
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) / pages


def fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = Path("/"), ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        m = Path(mount)
        if (m == path.resolve() or m in path.resolve().parents) and len(m.parts) >= len(best.parts):
            best, kind = m, fstype
    return kind
