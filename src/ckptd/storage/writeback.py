"""Get a save's data to the device early, and make it durable beside the writers.

Why: a save makes every file durable (``fdatasync``) before it commits. Waiting inside each
writer thread (write, then ``fdatasync``) costs a journal commit and a device flush per shard
file and leaves the thread idle; deferring every ``fdatasync`` to the end leaves the device idle
while the whole checkpoint is copied into the page cache, then waits for all of it. So each
large file's writeback is started as soon as it is written (:func:`start_writeback`), and one
background thread (:class:`BackgroundSync`) ``fdatasync``s it right after, while the writers
fill the next files; small files are synced together at the end. Durability is unchanged: a
commit still waits for every file's ``fdatasync``. Same-run medians on our 2-core box (W1
state, 0.75 GB, benchmarks/results/w1-writeback-20261202T102628Z.json, 15 repeats) as a
fraction of a raw fsync'd write of the same bytes: per-file ``fdatasync`` in the writer 0.89x,
everything at the end 0.77x, writeback started early but synced at the end 0.88x, this 0.99x.
Measured at the flush: with writeback started early, under 25 MB of 0.75 GB was still dirty or
in flight, yet the end-only syncs took 0.7 s — the device's cache flushes, now mostly done
beside the writers.

Linux only (``sync_file_range(2)``); elsewhere :func:`start_writeback` does nothing and the
syncs do all the work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2
"""Start writeback of dirty pages in the range; do not wait for it."""


def _load() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()


def start_writeback(fd: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages; True if it accepted. Best effort:
    a refusal (an unsupported filesystem) only means the final sync does all the writing."""
    if _sync_file_range is None:
        return False
    return bool(_sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0)


class BackgroundSync:
    """Makes large files durable on one background thread, in the order they were written.

    Why: after ``start_writeback`` the data is on its way, but each file's ``fdatasync`` (the
    device cache flush and journal commit that make it durable) used to wait for ``flush()``,
    after the last shard. Issuing them one by one beside the writers, on a thread that nothing
    else waits for, overlaps that work with the rest of the save; one thread keeps the device
    queue ordered (two or four did no better in a quick A/B, not kept in results). Small files
    stay in ``flush()``'s parallel batch, where one journal commit serves many of them.
    """

    def __init__(self, sync: Callable[[Path], None]) -> None:
        self._sync = sync
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Path, Future[None]]] = []

    def soon(self, path: Path) -> None:
        """Queue ``path``'s sync; its error (if any) is raised by the next ``wait``."""
        with self._lock:
            if self._pool is None:  # started per save, not per store: no idle thread between saves
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-sync")
            self._pending.append((path, self._pool.submit(self._sync, path)))

    def forget(self, under: Path) -> None:
        """Drop the files at or below ``under`` (deleted: a failed attempt's cleanup); a sync of
        theirs that fails because they are gone concerns no checkpoint and is never raised."""
        with self._lock:
            self._pending[:] = [(p, f) for p, f in self._pending if not is_within(p, under)]

    def wait(self) -> None:
        """Return once every queued file is durable; raise the first failure after all have ended."""
        with self._lock:
            pending, self._pending = self._pending, []
            pool, self._pool = self._pool, None
        error: BaseException | None = None
        for _, f in pending:
            try:
                f.result()
            except BaseException as e:  # keep waiting: nothing may still be syncing after we return
                error = error or e
        if pool is not None:
            pool.shutdown(wait=True)
        if error is not None:
            raise error


def is_within(path: Path, under: Path) -> bool:
    return path == under or under in path.parents
