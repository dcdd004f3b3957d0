"""One background thread per durable tier: persists one snapshot at a time.

A slow tier must not queue every snapshot (host memory would grow without bound), so a
flusher holds at most one job; the checkpointer keeps the newest snapshot each busy tier
has not taken yet and hands it over when the tier is free — on every rank at the same
step boundary, because the commit is collective. Errors are kept, never raised in the
thread: a transient remote error must not kill this daemon, and the user sees it as a
``CheckpointError`` at the next ``step()``/``wait()``/exit.
"""

from __future__ import annotations

import threading
import time

from ckptd.engine.snapshot import Snapshot
from ckptd.engine.tiers import StoreTier
from ckptd.format.errors import CheckpointError, ConfigError


class Flusher:
    def __init__(self, tier: StoreTier, index: int) -> None:
        self.tier = tier
        self.index = index
        self._cond = threading.Condition()
        self._job: tuple[Snapshot, str] | None = None
        self._busy = False
        self._closed = False
        self._errors: list[CheckpointError] = []
        self.last_durable_s = 0.0
        """Seconds from handing over to commit of the last successful persist."""
        self.persisted = 0
        self._thread = threading.Thread(target=self._loop, name=f"ckptd-flush-{tier.config.kind}-{index}",
                                        daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._busy and self._job is None

    def submit(self, snap: Snapshot, seq: int) -> None:
        """Hand over a snapshot (the flusher must be idle); the flusher takes its own reference."""
        with self._cond:
            if self._closed:
                raise ConfigError(f"{self.tier.name}: the checkpointer is closed")
            if self._busy or self._job is not None:
                raise RuntimeError(f"{self.tier.name}: flusher is busy")  # a bug in the caller
            self._job = (snap.retain(), f"t{self.index}/s{seq}")
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                snap, key = self._job
                self._job = None
                self._busy = True
            t0 = time.perf_counter()
            try:
                self.tier.persist(snap, key)
                self.last_durable_s = time.perf_counter() - t0
                self.persisted += 1
            except BaseException as e:
                err = e if isinstance(e, CheckpointError) else CheckpointError(
                    f"{self.tier.name}: checkpoint of step {snap.step} failed: {type(e).__name__}: {e}")
                if err is not e:
                    err.__cause__ = e
                with self._cond:
                    self._errors.append(err)
            finally:
                snap.release()
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and self._job is None, timeout)

    def take_errors(self) -> list[CheckpointError]:
        with self._cond:
            errors, self._errors = self._errors, []
            return errors

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
