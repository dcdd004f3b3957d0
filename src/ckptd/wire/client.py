"""``CatalogClient``: the HTTP client the snapshot engine uses to talk to the catalog.

Contract with the engine: **no method ever raises into training.** Every call retries
transient failures (connection errors, timeouts, 429 and 5xx) with exponential backoff and
jitter inside a bounded deadline, then gives up, logs a warning and returns ``None``/``False``.
Training continues; ``ckptd catalog sync`` reconciles the catalog from storage later. 4xx
answers are not retried (the request itself is wrong) and also return ``None``/``False``.

Only the standard library is imported here, and httpx when a client is built, so the engine
and ``import ckptd.wire.client`` pull in neither FastAPI nor SQLAlchemy nor torch. One client may
be shared by threads (httpx.Client is thread-safe); the engine calls it from a background thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptd.wire.contract import MAX_ERROR_CHARS

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
LOGGER_NAME = log.name
"""The logger of every per-call warning (the engine gates it per thread during an outage)."""
API_PREFIX = "/api/v1"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    base_url: str
    """``http://host:port`` of the catalog."""
    token: str | None = None
    """``CKPTD_API_TOKEN`` of the catalog (every mutating call needs it)."""
    timeout_s: float = 5.0
    """Per-attempt timeout (connect, read, write, pool)."""
    retries: int = 4
    """Attempts after the first one."""
    backoff_s: float = 0.2
    """First backoff; doubled per attempt, with full jitter, capped by ``max_backoff_s``."""
    max_backoff_s: float = 5.0
    deadline_s: float = 30.0
    """No call takes longer than this in total, retries included."""
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"catalog URL must be http(s)://..., got {self.base_url!r}")
        if self.retries < 0 or self.timeout_s <= 0 or self.deadline_s <= 0:
            raise ValueError("retries must be >= 0 and timeouts positive")


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """What the engine needs to know about a catalog checkpoint."""

    id: int
    run: str
    step: int
    state: str
    locations: dict[str, str]
    """tier -> URI of the checkpoint group."""

    @staticmethod
    def from_json(doc: dict[str, Any]) -> CheckpointRef:
        return CheckpointRef(
            id=int(doc["id"]),
            run=str(doc["run"]),
            step=int(doc["step"]),
            state=str(doc["state"]),
            locations={str(loc["tier"]): str(loc["uri"]) for loc in doc.get("locations", [])},
        )


@dataclass(frozen=True, slots=True)
class RollbackPointer:
    checkpoint: CheckpointRef
    reason: str | None
    requested_at: str


class CatalogClient:
    """Calls the catalog on behalf of a training process; see the module docstring for the contract."""

    def __init__(self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        import httpx  # here, not at module level: importing the client must stay cheap

        self._httpx = httpx
        self.config = config
        headers = {"User-Agent": "ckptd-engine", **config.headers}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/") + API_PREFIX,
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            # idle connections go before the server's keep-alive timeout (uvicorn: 5 s, httpx's own
            # default too): at equal timeouts a request races the server's close and fails with
            # "Server disconnected without sending a response"
            limits=httpx.Limits(keepalive_expiry=2.0),
            transport=transport,
        )
        # liveness probes bypass the retrying path and have their own short timeout: the engine asks
        # "is anyone there?" after a failure and must not wait a whole deadline for the answer
        self._probe = httpx.Client(
            base_url=config.base_url.rstrip("/"), timeout=min(1.0, config.timeout_s), transport=transport
        )
        self._lock = threading.Lock()
        self.failures = 0
        """Calls that gave up (for the engine's own metrics)."""

    def close(self) -> None:
        self._http.close()
        self._probe.close()

    def reachable(self) -> bool:
        """Whether the catalog answers ``GET /healthz`` with 200 now (one attempt, no retries)."""
        try:
            return self._probe.get("/healthz").status_code == 200
        except Exception:  # whatever the transport raised, the answer is "not reachable"
            return False

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """The decoded JSON body (``None`` for 204), or raise :class:`_GiveUp`."""
        deadline = time.monotonic() + self.config.deadline_s
        for attempt in range(self.config.retries + 1):
            try:
                response = self._http.request(method, path, json=json, params=params)
            except self._httpx.HTTPError as e:  # connect error, timeout, protocol error: transient
                reason = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 400:
                    return None if response.status_code == 204 or not response.content else response.json()
                reason = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in _RETRY_STATUS:
                    raise _GiveUp(reason, status=response.status_code)
            delay = min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt) * random.random()
            if attempt == self.config.retries or time.monotonic() + delay >= deadline:
                raise _GiveUp(reason)
            time.sleep(delay)
        raise _GiveUp("no attempt made")  # unreachable: retries >= 0

    def _safe(self, what: str, method: str, path: str, **kw: Any) -> Any:
        try:
            return self._call(method, path, **kw)
        except _GiveUp as e:
            with self._lock:
                self.failures += 1
            if e.status == 404:
                log.info("catalog: %s: not found (%s)", what, e)
            else:
                log.warning("catalog: %s failed, training continues: %s", what, e)
            return _FAILED
        except Exception as e:  # never raise into training, whatever httpx or the JSON decoder did
            with self._lock:
                self.failures += 1
            log.warning("catalog: %s failed unexpectedly, training continues: %r", what, e)
            return _FAILED

    # --- what the engine calls -------------------------------------------------------------------

    def register_run(
        self, name: str, *, roots: dict[str, str] | None = None, config: dict[str, Any] | None = None
    ) -> bool:
        body = {"name": name, "roots": roots or {}, "config": config or {}}
        return self._safe(f"register run {name}", "POST", "/runs", json=body) is not _FAILED

    def register_checkpoint(
        self,
        run: str,
        step: int,
        *,
        locations: dict[str, str] | None = None,
        parent_step: int | None = None,
        layout: dict[str, Any] | None = None,
        nbytes: int | None = None,
        metrics: dict[str, float] | None = None,
        tags: list[str] | None = None,
    ) -> CheckpointRef | None:
        """Register a pending checkpoint; returns its reference (keep ``.id`` to commit it)."""
        body: dict[str, Any] = {
            "step": step,
            "locations": [{"tier": t, "uri": u} for t, u in (locations or {}).items()],
            "metrics": metrics or {},
            "tags": tags or [],
        }
        if parent_step is not None:
            body["parent_step"] = parent_step
        if layout is not None:
            body["layout"] = layout
        if nbytes is not None:
            body["nbytes"] = nbytes
        doc = self._safe(f"register {run} step {step}", "POST", f"/runs/{run}/checkpoints", json=body)
        return None if doc is _FAILED else _ref(doc)

    def mark_committed(
        self,
        checkpoint_id: int,
        *,
        nbytes: int | None = None,
        metrics: dict[str, float] | None = None,
        locations: dict[str, str] | None = None,
        layout: dict[str, Any] | None = None,
    ) -> bool:
        """Move a pending checkpoint to committed; ``layout`` is its ``LayoutDoc`` (restore plans)."""
        body: dict[str, Any] = {"state": "committed"}
        if nbytes is not None:
            body["nbytes"] = nbytes
        if metrics:
            body["metrics"] = metrics
        if locations:
            body["locations"] = [{"tier": t, "uri": u} for t, u in locations.items()]
        if layout is not None:
            body["layout"] = layout
        return (
            self._safe(f"commit {checkpoint_id}", "PATCH", f"/checkpoints/{checkpoint_id}", json=body)
            is not _FAILED
        )

    def mark_failed(self, checkpoint_id: int, error: str) -> bool:
        body = {"state": "failed", "error": error[:MAX_ERROR_CHARS]}
        return (
            self._safe(f"fail {checkpoint_id}", "PATCH", f"/checkpoints/{checkpoint_id}", json=body)
            is not _FAILED
        )

    def rollback_pointer(self, run: str) -> RollbackPointer | None:
        """The checkpoint an operator asked this run to roll back to, or ``None`` (also when unreachable)."""
        doc = self._safe(f"rollback pointer of {run}", "GET", f"/runs/{run}/rollback")
        if doc is _FAILED or doc is None:
            return None
        ref = _ref(doc.get("checkpoint"))
        if ref is None:
            return None
        return RollbackPointer(
            checkpoint=ref, reason=doc.get("reason"), requested_at=str(doc.get("requested_at"))
        )

    def acknowledge_rollback(self, run: str, checkpoint_id: int | None = None) -> bool:
        """Clear the run's rollback pointer — only if it still names ``checkpoint_id``, when given."""
        params = {} if checkpoint_id is None else {"checkpoint_id": checkpoint_id}
        return (
            self._safe(f"acknowledge rollback of {run}", "DELETE", f"/runs/{run}/rollback", params=params)
            is not _FAILED
        )

    def discard_after(self, run: str, step: int) -> bool:
        """The run rolled back to ``step`` and its newer checkpoints were deleted from storage: have
        the catalog mark them deleted (so that ``latest`` names ``step`` again)."""
        return (
            self._safe(
                f"discard {run} after step {step}", "POST", f"/runs/{run}/discard", json={"after_step": step}
            )
            is not _FAILED
        )

    def resolve(self, run: str, selector: str) -> CheckpointRef | None:
        """``latest``, ``best:<metric>[:min|:max]``, ``step:<n>`` or an alias -> a committed checkpoint."""
        doc = self._safe(
            f"resolve {run}/{selector}", "GET", f"/runs/{run}/resolve", params={"select": selector}
        )
        return None if doc is _FAILED or doc is None else _ref(doc.get("checkpoint"))


class _GiveUp(Exception):
    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


_FAILED: Any = object()


def _ref(doc: Any) -> CheckpointRef | None:
    try:
        return CheckpointRef.from_json(doc)
    except (KeyError, TypeError, ValueError):
        log.warning("catalog: unexpected checkpoint document %r", doc)
        return None
