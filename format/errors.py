"""The ckptd exception tree.

Every error ckptd raises on purpose derives from :class:`CheckpointError`; leaves
also subclass the matching built-in so that callers who already catch
``FileNotFoundError`` or ``ValueError`` keep working::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)
    ├── CheckpointExistsError(CheckpointError, FileExistsError)
    ├── IntegrityError(CheckpointError)            crc32c mismatch, truncated or missing chunk
    ├── MetadataError(CheckpointError, ValueError) malformed or hostile manifest / zarr.json
    │   └── UnsafeNameError(MetadataError)          a name that cannot become a path segment
    ├── LayoutError(CheckpointError, ValueError)   boxes that do not tile, shape mismatches
    ├── StorageError(CheckpointError, OSError)     a backend failed (disk full, S3 5xx, ...)
    └── UnsupportedFormatError(CheckpointError)    a newer format major version

Backend exceptions are translated at the storage boundary with ``raise ... from``
so the original cause stays attached.
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


class MetadataError(CheckpointError, ValueError):
    """A manifest or array metadata document is malformed, inconsistent or hostile."""


class UnsafeNameError(MetadataError):
    """A tensor or run name that cannot safely become a storage path segment."""


class LayoutError(CheckpointError, ValueError):
    """Boxes that do not tile their array, or a tensor whose shape disagrees with the checkpoint."""


class StorageError(CheckpointError, OSError):
    """A storage backend failed: disk full, permission denied, connection error, HTTP 5xx."""


class UnsupportedFormatError(CheckpointError):
    """The checkpoint was written by a newer, incompatible version of the format."""
