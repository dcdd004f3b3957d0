"""The engine's view of a catalog client: a small Protocol, so the engine depends on the calls it
makes, not on a package. ``ckptd.wire.client.CatalogClient`` implements it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ckptd.wire.client import CheckpointRef, RollbackPointer


class CatalogPort(Protocol):
    """What the engine needs from a catalog client (``ckptd.wire.client.CatalogClient``).

    Every method gives up quietly (``None``/``False``) instead of raising: training never waits
    for, or dies of, the catalog. ``failures`` counts the calls that gave up."""

    failures: int

    def register_run(self, name: str, *, roots: dict[str, str] | None = None) -> bool: ...

    def register_checkpoint(
        self,
        run: str,
        step: int,
        *,
        locations: dict[str, str] | None = None,
        parent_step: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> CheckpointRef | None: ...

    def mark_committed(
        self,
        checkpoint_id: int,
        *,
        nbytes: int | None = None,
        metrics: dict[str, float] | None = None,
        locations: dict[str, str] | None = None,
        layout: dict[str, Any] | None = None,
    ) -> bool: ...

    def mark_failed(self, checkpoint_id: int, error: str) -> bool: ...

    def rollback_pointer(self, run: str) -> RollbackPointer | None: ...

    def acknowledge_rollback(self, run: str, checkpoint_id: int | None = None) -> bool: ...

    def discard_after(self, run: str, step: int) -> bool: ...

    def resolve(self, run: str, selector: str) -> CheckpointRef | None: ...

    def reachable(self) -> bool:
        """``GET /healthz`` answered 200 now (one short attempt: used to tell an outage from a refusal)."""

    def close(self) -> None: ...
