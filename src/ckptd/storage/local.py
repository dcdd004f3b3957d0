"""Local-filesystem store with real durability: fsync of files and of new directories.

Shards are written with ``writev`` straight from the caller's buffers (no joining
copy). ``write_atomic`` is temporary name + fsync + rename + fsync of the directory,
the only way a POSIX filesystem publishes a file all at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

from ckptd.format.errors import CheckpointExistsError, StorageError
from ckptd.format.store import Buffer
from ckptd.storage.direct import open_direct, write_direct
from ckptd.storage.errors import map_exceptions
from ckptd.storage.writeback import BackgroundSync, is_within, start_writeback

_IOV_MAX = 512
# Files at least this big start their writeback as soon as they are written and are fsync'd by a
# background thread right after (writeback.py); smaller ones are fsync'd by flush(), together and
# in parallel — hundreds of serial fsyncs (biases, zarr.json) or one wait per shard in the writer
# threads would dominate a save.
WRITEBACK_BYTES = 1 << 20
_FLUSH_THREADS = 16


class LocalStore:
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, direct_io: bool = False) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.direct_io = direct_io
        """Write files of at least ``WRITEBACK_BYTES`` around the page cache (``direct.py``); a
        setting of each save: child stores take it when they are made."""
        self._new_dirs: set[Path] = set()
        self._unsynced: list[Path] = []
        self._lock = threading.Lock()
        self._syncing = BackgroundSync(_fsync_file)

    # -------------------------------------------------------------- paths
    @property
    def url(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or "\\" in key or any(p in ("..", ".") for p in key.split("/") if p):
            raise StorageError(f"refusing key {key!r}: it would leave the store root {self.root}", key=key,
                               url=self.url)
        path = self.root / key if key else self.root
        self._refuse_links(path)
        return path

    def _refuse_links(self, path: Path) -> None:
        """No operation follows a symbolic link below the root: a symlinked step directory must
        never let ``rm``/``gc`` delete (or a save overwrite) another run root's files."""
        p = path
        while p != self.root and len(p.parts) > len(self.root.parts):
            if p.is_symlink():
                raise StorageError(f"refusing {path}: {p} is a symbolic link (ckptd never follows links "
                                   f"inside a run root)")
            p = p.parent

    def child(self, prefix: str) -> LocalStore:
        c = LocalStore(self._path(prefix), fsync=self.fsync, direct_io=self.direct_io)
        c._new_dirs, c._unsynced, c._lock = self._new_dirs, self._unsynced, self._lock  # shared bookkeeping
        c._syncing = self._syncing
        return c

    def _makedirs(self, d: Path) -> None:
        if d.is_dir():
            # An entry is about to appear in d: d needs an fsync even if an earlier flush synced it
            # (zarr.json lands in array directories the writers already synced).
            with self._lock:
                self._new_dirs.add(d)
            return
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._new_dirs.update(missing)
            self._new_dirs.add(p)  # the existing parent got a new entry too

    # -------------------------------------------------------------- writes
    def _mapped(self, what: str, key: str) -> AbstractContextManager[None]:
        """OS errors of ``what`` on ``key`` as ``StorageError`` (see ``storage/errors.py``)."""
        return map_exceptions(f"{what} {key or '/'}", url=self.url, key=key, missing="wrap", catch=(OSError,))

    def write(self, key: str, data: Sequence[Buffer]) -> int:
        path = self._path(key)
        with self._mapped("writing", key):
            self._makedirs(path.parent)
            if self.direct_io and sum(memoryview(b).nbytes for b in data) >= WRITEBACK_BYTES:
                written = self._write_direct(path, data)
                if written is not None:
                    return written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                total = _writev_all(fd, data)
                if self.fsync and total >= WRITEBACK_BYTES:
                    start_writeback(fd)
                    self._syncing.soon(path)
                elif self.fsync:
                    with self._lock:
                        self._unsynced.append(path)
            finally:
                os.close(fd)
        return total

    def _write_direct(self, path: Path, data: Sequence[Buffer]) -> int | None:
        """None: the filesystem refused ``O_DIRECT`` (or its alignment); write it buffered."""
        fd = open_direct(path)
        if fd is None:
            return None
        try:
            total = write_direct(fd, data)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None  # the buffered write truncates what went out
            raise
        finally:
            os.close(fd)
        if self.fsync:
            self._syncing.soon(path)  # no dirty data left, but the size and the extents
        return total

    def open_write(self, key: str) -> _LocalStream:
        path = self._path(key)
        with self._mapped("opening for writing", key):
            self._makedirs(path.parent)
            return _LocalStream(self, path, key)

    def flush(self) -> None:
        if not self.fsync:
            return
        with self._lock:
            files, self._unsynced[:] = list(self._unsynced), []
            dirs = sorted(self._new_dirs, key=lambda p: -len(p.parts))
            self._new_dirs.clear()
        if files:
            with ThreadPoolExecutor(min(_FLUSH_THREADS, len(files))) as pool:
                list(pool.map(_fsync_file, files))
        self._syncing.wait()  # large files: most were made durable while the writers went on
        if dirs:
            # Every directory must be durable before the manifest; their order does not matter.
            with ThreadPoolExecutor(min(_FLUSH_THREADS, len(dirs))) as pool:
                list(pool.map(_fsync_dir, dirs))

    def _forget(self, under: Path) -> None:
        """What is deleted needs no sync: without this, the next save's flush would fail on the
        files of a failed attempt that its cleanup removed (a full disk, then any later save)."""
        with self._lock:
            self._unsynced[:] = [p for p in self._unsynced if not is_within(p, under)]
            self._new_dirs.difference_update([d for d in self._new_dirs if is_within(d, under)])
        self._syncing.forget(under)

    def write_atomic(self, key: str, data: bytes) -> None:
        self._publish(key, data, exclusive=False)

    def write_exclusive(self, key: str, data: bytes) -> None:
        self._publish(key, data, exclusive=True)

    def _publish(self, key: str, data: bytes, *, exclusive: bool) -> None:
        """Temporary file, fsync, then rename (or link(): it fails when the name exists, atomically)."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with self._mapped("publishing", key):
            try:
                self._makedirs(path.parent)
                self.flush()
                self._write_durably(tmp, data)
                if exclusive:
                    _link_exclusive(tmp, path)
                else:
                    os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):  # the temporary name is garbage either way
                    tmp.unlink(missing_ok=True)
                raise
            if self.fsync:
                _fsync_dir(path.parent)

    def _write_durably(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    # -------------------------------------------------------------- reads
    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            # Clamp to the file: a hostile manifest may claim a huge size, and a short result is
            # how callers detect truncation (never allocate what the file cannot hold).
            size = os.fstat(fd).st_size
            return [os.pread(fd, max(0, min(stop, size) - start), start) for start, stop in ranges]
        finally:
            os.close(fd)

    def read_tail(self, key: str, n: int) -> bytes:
        fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - n)
            return os.pread(fd, size - start, start)
        finally:
            os.close(fd)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list_dir(self, prefix: str) -> list[str]:
        p = self._path(prefix)
        try:
            return sorted(e.name for e in os.scandir(p) if not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def mtime(self, key: str) -> float | None:
        p = self._path(key)
        if not p.exists():
            return None
        if p.is_file():
            return p.stat().st_mtime
        newest = p.stat().st_mtime
        for dirpath, _, files in os.walk(p):
            for name in files:
                try:
                    newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
                except FileNotFoundError:
                    pass
        return newest

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._forget(path)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(path, ignore_errors=True)

    def delete_prefix(self, prefix: str) -> None:
        p = self._path(prefix)
        if p == self.root and not prefix:
            raise StorageError("refusing to delete a whole store root")
        self._forget(p)
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            raise StorageError(f"could not delete {p}")
        if self.fsync and p.parent.exists():
            _fsync_dir(p.parent)


def _link_exclusive(tmp: Path, path: Path) -> None:
    """link() fails when the name exists, atomically: exactly one writer publishes ``path``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CheckpointExistsError(f"{path} already exists: another writer committed first") from None
    finally:
        tmp.unlink(missing_ok=True)


def _writev_all(fd: int, data: Sequence[Buffer]) -> int:
    views = [memoryview(b).cast("B") for b in data if len(b)]
    total = 0
    while views:
        batch = views[:_IOV_MAX]
        n = os.writev(fd, batch)
        total += n
        # partial writes: drop what went out, keep the rest
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalStream:
    def __init__(self, store: LocalStore, path: Path, key: str) -> None:
        self._store, self._path, self._key = store, path, key
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()/abort()

    def write(self, data: Buffer, /) -> int:
        try:
            with self._store._mapped("writing", self._key):
                return self._f.write(data)
        except StorageError:
            self.abort()
            raise

    def close(self) -> None:
        try:
            with self._store._mapped("writing", self._key):
                self._f.flush()
                if self._store.fsync:
                    os.fdatasync(self._f.fileno())
                self._f.close()
        except StorageError:
            self.abort()
            raise

    def abort(self) -> None:
        # Closing flushes what is still buffered: on a full disk that fails again, and the caller
        # must see the StorageError it is already handling, not this second OSError.
        with contextlib.suppress(OSError):
            self._f.close()
        self._path.unlink(missing_ok=True)
