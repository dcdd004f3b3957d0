"""The ckptd exception tree.

Every error ckptd raises on purpose derives from :class:`CheckpointError`; leaves
also subclass the matching built-in so that callers who already catch
``FileNotFoundError``, ``ValueError`` or ``TimeoutError`` keep working::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)
    ├── CheckpointExistsError(CheckpointError, FileExistsError)
    ├── IntegrityError(CheckpointError)            crc32c mismatch, truncated or missing chunk
    ├── MetadataError(CheckpointError, ValueError) malformed or hostile manifest / zarr.json
    │   └── UnsafeNameError(MetadataError)          a name that cannot become a path segment
    ├── LayoutError(CheckpointError, ValueError)   boxes that do not tile, shape mismatches
    ├── ConfigError(CheckpointError, ValueError)   an invalid option or selector given by the user
    ├── StorageError(CheckpointError, OSError)     a backend failed (disk full, S3 5xx, ...)
    ├── CoordinationTimeout(CheckpointError, TimeoutError)  ranks did not agree in time
    └── UnsupportedFormatError(CheckpointError)    a newer format major version

Backend exceptions are translated at the storage boundary with ``raise ... from``
so the original cause stays attached. Storage and integrity errors carry the ``key``
(path inside the store) and ``url`` (the store's root) they concern, when known.
Conditions that can only fail through a ckptd bug are not part of this tree: they
are ``assert`` statements or ``RuntimeError``.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Root of every error ckptd raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists at this step."""


class IntegrityError(CheckpointError):
    """Stored bytes do not match their checksum, or a chunk is missing or truncated."""

    def __init__(self, *args: object, key: str | None = None, url: str | None = None) -> None:
        super().__init__(*args)
        self.key = key
        """The object (path inside the store) whose bytes are wrong, when known."""
        self.url = url
        """The store (or run) it belongs to, when known."""


class MetadataError(CheckpointError, ValueError):
    """A manifest or array metadata document is malformed, inconsistent or hostile."""


class UnsafeNameError(MetadataError):
    """A tensor or run name that cannot safely become a storage path segment."""


class LayoutError(CheckpointError, ValueError):
    """Boxes that do not tile their array, or a tensor whose shape disagrees with the checkpoint."""


class ConfigError(CheckpointError, ValueError):
    """An option, selector or argument given by the user is invalid (the message says which)."""


class StorageError(CheckpointError, OSError):
    """A storage backend failed: disk full, permission denied, connection error, HTTP 5xx."""

    def __init__(self, *args: object, key: str | None = None, url: str | None = None) -> None:
        super().__init__(*args)
        self.key = key
        """The object (path inside the store) the failed operation was about, when known."""
        self.url = url
        """The store's root URL or path, when known."""


class CoordinationTimeout(CheckpointError, TimeoutError):
    """Other ranks did not arrive in time (dead, stuck, or much slower): nothing was committed."""


class UnsupportedFormatError(CheckpointError):
    """The checkpoint was written by a newer, incompatible version of the format."""
