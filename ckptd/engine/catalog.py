"""The engine's seam to the REST catalog: notifications on a background thread.

Training must never wait for the catalog: every call goes through a queue to one daemon
thread, and the HTTP client itself never raises (it retries, then logs and gives up;
``ckptd catalog sync`` reconciles the catalog from storage later). Only rank 0 talks to
the catalog. Reading the rollback pointer at restore time is the one synchronous call:
it happens once, before training starts, and is bounded by the client's deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ckptd.format.manifest import Manifest

log = logging.getLogger(__name__)


class CatalogNotifier:
    def __init__(self, url: str, *, run: str, roots: dict[str, str], token: str | None = None) -> None:
        from ckptd.api.client import CatalogClient, ClientConfig  # httpx only; optional dependency

        self.run = run
        self.client = CatalogClient(ClientConfig(base_url=url, token=token))
        self._queue: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="ckptd-catalog", daemon=True)
        self._thread.start()
        self._queue.put(lambda: self.client.register_run(run, roots=roots))

    def _loop(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call()
            except Exception as e:  # the client promises not to raise; a bug here must not stop training
                log.warning("catalog notification failed: %r", e)

    def committed(self, tier: str, uri: str, manifest: Manifest) -> None:
        metrics = manifest.metadata.get("ckptd.engine", {}).get("metrics", {})

        def call() -> None:
            ref = self.client.register_checkpoint(self.run, manifest.step, locations={tier: uri},
                                                  nbytes=manifest.stored_bytes, metrics=dict(metrics))
            if ref is not None:
                self.client.mark_committed(ref.id, nbytes=manifest.stored_bytes, locations={tier: uri})

        self._queue.put(call)

    def rollback_step(self) -> int | None:
        """The step an operator asked this run to roll back to (synchronous; once, at restore)."""
        pointer = self.client.rollback_pointer(self.run)
        return None if pointer is None else pointer.checkpoint.step

    def acknowledge_rollback(self) -> None:
        self._queue.put(lambda: self.client.acknowledge_rollback(self.run))

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        self.client.close()
