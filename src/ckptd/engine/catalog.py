"""The engine's seam to the REST catalog: one background thread, a bounded queue, a poller.

Invariants (rank 0 only; the other ranks never talk to the catalog):

* **Training never waits for the catalog.** ``pending``/``committed``/``failed`` only append
  to a bounded queue; one daemon thread delivers them in order. A full queue drops the
  newest notification (counted in ``dropped``); nothing blocks.
* **The catalog never raises into training.** The client (:class:`CatalogPort`, implemented by
  ``ckptd.wire.client.CatalogClient``) returns ``None``/``False`` when it gives up; a bug in this
  module is caught and logged in the thread.
* **One warning per outage.** After a failed call the thread asks ``/healthz``: when the
  catalog does not answer it is *down*: the warning is logged once, the head notification is
  kept and retried with backoff (notifications survive a short outage in order), and the
  client's own per-call warnings from this thread are suppressed. ``ckptd catalog sync URI``
  reconciles whatever was dropped, from the manifests in storage (the source of truth).
* **Rollback requests are polled, not acted on, here.** The thread reads the run's rollback
  pointer every ``poll_s``; the checkpointer takes it at the next step boundary, where the
  ranks agree on it over the engine's own gloo group and restore in place.

The synchronous calls (``rollback_pointer``, ``resolve``, ``reachable``) are made only by
``Checkpointer.restore()`` before training and are bounded by the client's deadline.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ckptd.engine.catalog_port import CatalogPort
from ckptd.engine.config import CatalogConfig
from ckptd.format.manifest import Manifest
from ckptd.wire.client import LOGGER_NAME as CLIENT_LOGGER_NAME
from ckptd.wire.contract import MAX_LAYOUT_ARRAYS, clean_metrics

if TYPE_CHECKING:
    from ckptd.wire.client import CheckpointRef, RollbackPointer

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0
_REJECTIONS_LOGGED = 5

Notification = Callable[[], bool]
"""A delivery attempt: True when the catalog took it (or it needs nothing more)."""


class _ClientLogGate(logging.Filter):
    """Silences the catalog client's records emitted on the catalog threads of this module, keeping
    the last message of each (the reason a call failed), so an outage is logged once, by us."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: dict[int, list[str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        box = self.threads.get(record.thread or -1)
        if box is None:
            return True
        box[:] = [record.getMessage()]
        return False


_GATE = _ClientLogGate()
logging.getLogger(CLIENT_LOGGER_NAME).addFilter(_GATE)


def layout_summary(manifest: Manifest) -> dict[str, Any] | None:
    """The catalog's ``LayoutDoc`` of a committed checkpoint (what restore plans are built from)."""
    if len(manifest.arrays) > MAX_LAYOUT_ARRAYS:
        return None
    arrays = {
        path: {
            "dtype": a.dtype.name,
            "shape": list(a.shape),
            "layout": a.layout.to_json() if a.layout is not None else {},
            "nbytes": a.nbytes,
        }
        for path, a in manifest.arrays.items()
    }
    return {"mesh": {str(k): int(v) for k, v in manifest.mesh.items()}, "arrays": arrays}


def _engine_client(config: CatalogConfig) -> CatalogPort:
    # httpx and the client are loaded only when a catalog is configured (optional dependency)
    from ckptd.wire.client import CatalogClient, ClientConfig

    return CatalogClient(
        ClientConfig(
            base_url=config.url,
            token=config.token,
            timeout_s=config.timeout_s,
            retries=2,
            backoff_s=0.1,
            max_backoff_s=1.0,
            deadline_s=config.deadline_s,
        )
    )


class CatalogLink:
    """Rank 0's connection to the catalog for one run (see the module docstring)."""

    def __init__(
        self,
        config: CatalogConfig,
        *,
        run: str,
        roots: Mapping[str, str],
        client: CatalogPort | None = None,
    ) -> None:
        self.config = config
        self.run = run
        self.client = client if client is not None else _engine_client(config)
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[str, Notification]] = collections.deque()
        self._closing = False
        self._close_deadline = math.inf
        self._down_since: float | None = None
        self._backoff_s = 0.25
        self._retry_at = 0.0
        self._next_poll = time.monotonic() + (config.poll_s or 0.0)
        self._overflow_warned = False
        self._rejections = 0
        self.delivered = 0
        self.dropped = 0
        """Notifications the catalog never got (queue full, or still queued at close while down)."""
        self.outages = 0
        # worker-thread state: catalog ids of this run's checkpoints, steps committed in some tier
        self._ids: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._committed: collections.OrderedDict[int, None] = collections.OrderedDict()
        # rollback pointer seen by the poller, and the requests already handled
        self._pointer_lock = threading.Lock()
        self._pointer: RollbackPointer | None = None
        self._handled: set[tuple[int, str]] = set()
        self._thread = threading.Thread(target=self._loop, name="ckptd-catalog", daemon=True)
        self._gate_box: list[str] = []
        self._thread.start()
        root_map = dict(roots)
        self._enqueue(f"register run {run}", lambda: self.client.register_run(run, roots=root_map))

    # ---------------------------------------------------------------- notifications (any thread)
    def pending(self, tier: str, uri: str, step: int, metrics: Mapping[str, Any], parent: int | None) -> None:
        """A durable tier started writing checkpoint ``step``."""
        clean = clean_metrics(metrics)
        self._enqueue(
            f"pending step {step}", lambda: self._register(step, tier, uri, clean, parent) is not None
        )

    def committed(self, tier: str, uri: str, manifest: Manifest, parent: int | None = None) -> None:
        """``manifest`` was written: the checkpoint exists in ``tier`` at ``uri``."""
        step = manifest.step
        found = manifest.metadata.get("metrics", {})
        clean = clean_metrics(found if isinstance(found, dict) else {})
        nbytes, layout = manifest.nbytes, layout_summary(manifest)

        def call() -> bool:
            cid = self._register(step, tier, uri, clean, parent)
            if cid is None:
                return False
            ok = self.client.mark_committed(
                cid, nbytes=nbytes, metrics=clean, locations={tier: uri}, layout=layout
            )
            if ok:
                self._remember(self._committed, step, None)
            return ok

        self._enqueue(f"commit step {step}", call)

    def failed(self, tier: str, uri: str, step: int, error: str) -> None:
        """Writing checkpoint ``step`` to ``tier`` failed (nothing was committed there)."""

        def call() -> bool:
            if step in self._committed:  # committed in another tier: the checkpoint exists
                return True
            cid = self._register(step, tier, uri, {}, None)
            return cid is not None and self.client.mark_failed(cid, f"{tier}: {error}")

        self._enqueue(f"fail step {step}", call)

    def _register(
        self, step: int, tier: str, uri: str, metrics: dict[str, float], parent: int | None
    ) -> int | None:
        cid = self._ids.get(step)
        if cid is not None:
            return cid
        ref = self.client.register_checkpoint(
            self.run, step, locations={tier: uri}, metrics=metrics, parent_step=parent
        )
        if ref is None:
            return None
        self._remember(self._ids, step, ref.id)
        return ref.id

    @staticmethod
    def _remember(cache: collections.OrderedDict[int, Any], key: int, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > 512:
            cache.popitem(last=False)

    def forget_after(self, step: int) -> None:
        """Checkpoints newer than ``step`` were discarded by a rollback: the catalog marks them
        deleted (``latest`` is ``step`` again), and a new one at the same step must be registered
        afresh, not mistaken for the old one. Queued like every notification, so it reaches the
        catalog before the new trajectory's first registration."""

        def call() -> bool:
            for cache in (self._ids, self._committed):
                for s in [s for s in cache if s > step]:
                    del cache[s]
            return self.client.discard_after(self.run, step)

        self._enqueue(f"forget steps after {step}", call)

    def _enqueue(self, what: str, call: Notification) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._items) >= self.config.queue_size:
                self.dropped += 1
                if not self._overflow_warned:
                    self._overflow_warned = True
                    log.warning(
                        "catalog %s: %d notifications are waiting; dropping new ones until it "
                        "catches up (`ckptd catalog sync` reconciles later)",
                        self.config.url,
                        len(self._items),
                    )
                return
            self._items.append((what, call))
            self._cond.notify_all()

    # ---------------------------------------------------------------- rollback pointer
    @staticmethod
    def _key(pointer: RollbackPointer) -> tuple[int, str]:
        return pointer.checkpoint.id, pointer.requested_at

    def take_rollback(self) -> RollbackPointer | None:
        """The newest rollback request the poller saw and nobody handled yet (never blocks)."""
        with self._pointer_lock:
            p = self._pointer
            return p if p is not None and self._key(p) not in self._handled else None

    def rollback_pointer(self) -> RollbackPointer | None:
        """Read the pointer now (synchronous: ``restore()`` before training starts)."""
        p = self.client.rollback_pointer(self.run)
        with self._pointer_lock:
            return p if p is not None and self._key(p) not in self._handled else None

    def rollback_done(self, pointer: RollbackPointer) -> None:
        """The run resumed from the pointer's checkpoint: clear it in the catalog."""
        self.rollback_skipped(pointer)
        self._enqueue(
            "acknowledge rollback", lambda: self.client.acknowledge_rollback(self.run, pointer.checkpoint.id)
        )

    def rollback_skipped(self, pointer: RollbackPointer) -> None:
        """Never act on this request again (done, or impossible: the engine has no such step)."""
        with self._pointer_lock:
            self._handled.add(self._key(pointer))
            if self._pointer is not None and self._key(self._pointer) == self._key(pointer):
                self._pointer = None

    def _poll(self) -> None:
        before = self.client.failures
        p = self.client.rollback_pointer(self.run)
        if p is None and self.client.failures > before and not self.reachable():
            self._went_down()
            return  # an outage says nothing about the pointer: keep what we knew
        with self._pointer_lock:
            self._pointer = p

    # ---------------------------------------------------------------- synchronous reads
    def resolve(self, selector: str) -> CheckpointRef | None:
        return self.client.resolve(self.run, selector)

    def reachable(self) -> bool:
        return self.client.reachable()

    # ---------------------------------------------------------------- the thread
    def _went_down(self) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            reason = self._gate_box[0] if self._gate_box else "no answer"
            log.warning(
                "catalog %s is unreachable (%s); training continues, notifications wait in a "
                "bounded queue and `ckptd catalog sync` reconciles anything dropped",
                self.config.url,
                reason,
            )
        self._retry_at = now + self._backoff_s
        self._backoff_s = min(2 * self._backoff_s, _MAX_BACKOFF_S)

    def _came_back(self) -> None:
        if self._down_since is not None:
            log.info(
                "catalog %s answers again after %.1fs", self.config.url, time.monotonic() - self._down_since
            )
        self._down_since = None
        self._backoff_s = 0.25
        self._overflow_warned = False

    def _next(self) -> tuple[str, tuple[str, Notification] | None]:
        """Wait for the next thing to do: ("call", item), ("poll", None) or ("exit", None)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing and (
                    not self._items or self._down_since is not None or now >= self._close_deadline
                ):
                    if self._items:
                        self.dropped += len(self._items)
                        log.warning(
                            "catalog %s: %d notifications not delivered at close; run "
                            "`ckptd catalog sync` to reconcile",
                            self.config.url,
                            len(self._items),
                        )
                        self._items.clear()
                    return "exit", None
                if self._items and now >= self._retry_at:
                    return "call", self._items[0]
                poll_s = self.config.poll_s
                if poll_s is not None and not self._closing and now >= max(self._next_poll, self._retry_at):
                    self._next_poll = now + poll_s
                    return "poll", None
                wake = [self._retry_at] if self._items else []
                if poll_s is not None and not self._closing:
                    wake.append(max(self._next_poll, self._retry_at))
                if self._closing:
                    wake.append(self._close_deadline)
                self._cond.wait(max(0.0, min(wake) - now) if wake else None)

    def _loop(self) -> None:
        _GATE.threads[threading.get_ident()] = self._gate_box
        try:
            while True:
                action, item = self._next()
                if action == "exit":
                    return
                self._gate_box.clear()
                try:
                    if self._down_since is not None and not self.reachable():
                        self._went_down()
                        continue
                    self._came_back()
                    if item is None:
                        self._poll()
                    else:
                        self._deliver(*item)
                except Exception as e:  # the client promises not to raise; a bug here must not stop training
                    log.warning("catalog thread: unexpected %r", e)
                    with self._cond:
                        if item is not None and self._items and self._items[0] is item:
                            self._items.popleft()
        finally:
            _GATE.threads.pop(threading.get_ident(), None)

    def _deliver(self, what: str, call: Notification) -> None:
        if call():
            self.delivered += 1
        elif self.reachable():  # the catalog answers but refused it (a 4xx): retrying cannot help
            self._rejections += 1
            if self._rejections <= _REJECTIONS_LOGGED:
                reason = self._gate_box[0] if self._gate_box else "refused"
                log.warning(
                    "catalog %s refused %s: %s%s",
                    self.config.url,
                    what,
                    reason,
                    " (further refusals are not logged)" if self._rejections == _REJECTIONS_LOGGED else "",
                )
        else:
            self._went_down()  # keep it at the head: retried, in order, when the catalog answers again
            return
        with self._cond:
            if self._items and self._items[0][1] is call:
                self._items.popleft()

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Let queued notifications drain (``close_timeout_s``; at once when the catalog is down)."""
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + self.config.close_timeout_s
            self._cond.notify_all()
        self._thread.join(self.config.close_timeout_s + self.config.deadline_s + 1.0)
        self.client.close()


CatalogNotifier = CatalogLink
"""The former name (kept for code that imported it)."""
