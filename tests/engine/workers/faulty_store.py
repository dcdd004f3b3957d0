"""A ``Store`` around the real ``LocalStore`` that fails, hangs or kills one rank at one step.

Registered as the ``faulty+file://`` scheme (``ckptd.storage.register_scheme``), so the engine's
own tier opens it like any run root. What to break is read from the environment of the process,
``CKPTD_FAULT="<fault>:<rank>:<step>"`` (set and cleared by the worker between saves):

* ``write``: the rank's shard writes fail with EIO (the disk or the network fails);
* ``prepare``: the rank's ``flush`` fails with EIO (its data cannot be made durable before it
  reports: the "prepare" vote of the commit);
* ``lease``: opening the attempt (rank 0 writes the attempt's lease) fails with EIO;
* ``hang``: the rank's first shard write sleeps ``CKPTD_HANG_S`` seconds (past the commit timeout),
  then goes on;
* ``kill``: the rank writes half of its first shard, then SIGKILLs itself.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Sequence
from typing import Any

from ckptd.format.run import step_dir
from ckptd.format.store import Buffer, Store
from ckptd.storage import LocalStore, register_scheme

SCHEME = "faulty+file"
SHARD_KEY = re.compile(r"(^|/)c([./]\d+)*$")  # Zarr v3 chunk keys: "c.0.1" ("." separator) or "c/0/1"
_hung: set[str] = set()  # a rank hangs once per armed fault, not once per shard


def _fault() -> tuple[str, int, int] | None:
    raw = os.environ.get("CKPTD_FAULT")
    if not raw:
        return None
    kind, rank, step = raw.split(":")
    return kind, int(rank), int(step)


class FaultyStore:
    def __init__(self, inner: Store, prefix: str = "") -> None:
        self.inner = inner
        self.prefix = prefix

    def __getattr__(self, name: str) -> Any:  # everything not broken here is the real store's
        return getattr(self.inner, name)

    @property
    def url(self) -> str:
        return self.inner.url

    def child(self, prefix: str) -> FaultyStore:
        return FaultyStore(self.inner.child(prefix), f"{self.prefix}{prefix.rstrip('/')}/")

    def _armed(self, kind: str, key: str = "") -> bool:
        fault = _fault()
        if fault is None or fault[0] != kind or fault[1] != int(os.environ["RANK"]):
            return False
        return f"{step_dir(fault[2])}/" in f"{self.prefix}{key}"

    def write(self, key: str, data: Sequence[Buffer]) -> int:
        shard = SHARD_KEY.search(key) is not None
        if shard and self._armed("write", key):
            raise OSError(errno.EIO, "injected: shard write failed", key)
        if shard and self._armed("hang", key) and os.environ["CKPTD_FAULT"] not in _hung:
            _hung.add(os.environ["CKPTD_FAULT"])
            time.sleep(float(os.environ["CKPTD_HANG_S"]))
        if shard and self._armed("kill", key):
            blob = b"".join(bytes(b) for b in data)
            self.inner.write(key, [blob[: len(blob) // 2]])
            os.kill(os.getpid(), signal.SIGKILL)
        if key.endswith(".meta/lease") and self._armed("lease", key):
            raise OSError(errno.EIO, "injected: cannot open the attempt", key)
        return self.inner.write(key, data)

    def flush(self) -> None:
        self.inner.flush()  # as a real failing fsync: what was pending is no longer pending
        if self._armed("prepare"):
            raise OSError(errno.EIO, "injected: fsync failed")


def open_faulty(uri: str, storage_options: dict[str, Any] | None) -> Store:
    store: Store = FaultyStore(LocalStore(uri.removeprefix(f"{SCHEME}://")))
    return store


register_scheme(SCHEME, open_faulty)
