"""The storage contract the format needs: a small, synchronous, typed key/value interface.

Keys are ``/``-separated relative paths built only from validated names
(``ckptd.format.names``); implementations live in ``ckptd.storage`` (local disk,
memory, any fsspec URL). Optional capabilities are ``supports_*`` properties rather
than ``NotImplementedError``.

Durability contract: ``write`` may return before data is durable; ``flush`` makes
every write this instance has done durable (local: fsync of files and their new
directories). ``write_atomic`` and ``write_exclusive`` publish objects: readers see either
the old state (absent) or the complete new object, never a part of it;
``write_exclusive`` also refuses to replace an existing object (one commit per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


class StreamWriter(Protocol):
    """``write`` pieces in order; ``close`` makes the object exist (and durable, as ``write``)."""

    def write(self, data: Buffer, /) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


@runtime_checkable
class Store(Protocol):
    @property
    def url(self) -> str:
        """Where this store points, as a URL or local path (for messages and the catalog)."""
        ...

    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` below this one (same backend, same connection)."""
        ...

    def write(self, key: str, data: Sequence[Buffer]) -> int:
        """Write the concatenation of ``data`` to ``key``, replacing it; returns bytes written."""
        ...

    def open_write(self, key: str) -> StreamWriter:
        """Stream an object of unknown size (converters): bounded memory however large it is."""
        ...

    def write_atomic(self, key: str, data: bytes) -> None:
        """Durably publish ``data`` at ``key`` all at once (after every earlier write is durable)."""
        ...

    def write_exclusive(self, key: str, data: bytes) -> None:
        """Durably publish ``data`` at ``key`` only if ``key`` does not exist yet (after every earlier
        write is durable); :class:`FileExistsError` (a ``CheckpointExistsError``) when it does.

        The commit primitive of format v2: of two writers racing for one key exactly one wins
        (local disk: ``link()``; S3: a conditional PUT with ``If-None-Match: *``).
        """
        ...

    def flush(self) -> None:
        """Make every earlier ``write`` of this instance durable."""
        ...

    def read(self, key: str) -> bytes:
        """The whole object; :class:`FileNotFoundError`-derived error when it is absent."""
        ...

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Byte ranges ``[start, stop)`` of one object, fetched concurrently where the backend can."""
        ...

    def read_tail(self, key: str, n: int) -> bytes:
        """The last ``n`` bytes of an object (all of it when shorter) in one request, size unknown."""
        ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def list_dir(self, prefix: str) -> list[str]:
        """Names (not paths) of the immediate children of ``prefix``; empty when absent."""
        ...

    def mtime(self, key: str) -> float | None:
        """Modification time (seconds since the epoch) of an object or directory, when known."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object (absent is fine)."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything below ``prefix`` (absent is fine)."""
        ...
