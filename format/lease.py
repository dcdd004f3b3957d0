"""The writer's lease on an open save attempt: gc never deletes an attempt a live writer holds.

The committing writer creates ``<attempt>.meta/lease`` when the attempt opens and rewrites it
every ``refresh_s`` seconds until the attempt commits or fails. ``gc`` deletes an uncommitted
attempt only once its lease (or, without one, its newest object) is older than ``--min-age``;
and it deletes the lease *first*, so a writer that was paused for longer than that finds its
lease gone when it is about to commit (``check``) and fails instead of committing a checkpoint
whose files gc removed.
"""

from __future__ import annotations

import threading
import time

from ckptd.format.errors import CheckpointError, StorageError
from ckptd.format.store import Store

DEFAULT_REFRESH_S = 60.0


class Lease:
    def __init__(self, store: Store, key: str, *, refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.store = store
        self.key = key
        self.refresh_s = refresh_s
        self._token = f"{time.time():.3f}".encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.store.write(self.key, [self._token])
        self.store.flush()
        self._thread = threading.Thread(target=self._keep, name="ckptd-lease", daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.store.exists(self.key):
                    return  # collected: check() reports it at commit time
                self.store.write(self.key, [self._token])
            except (CheckpointError, OSError):
                pass  # a transient storage error must not kill the save; check() decides

    def check(self) -> None:
        """Raise when gc took this attempt (the lease is gone): committing now would publish
        a checkpoint whose files were deleted."""
        try:
            alive = self.store.exists(self.key)
        except OSError as e:
            raise StorageError(f"checking the lease {self.key} failed: {e}") from e
        if not alive:
            raise StorageError(f"the save attempt's lease {self.store.url}/{self.key} was collected "
                                  "(the writer paused for longer than gc --min-age); nothing was committed")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """After the commit: stop refreshing. The lease object stays: gc never collects the attempt
        a commit record names, and the commit record must stay the last object a save writes."""
        self.__exit__()
