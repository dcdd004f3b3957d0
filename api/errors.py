"""Domain errors of the catalog service.

Service functions raise these (never HTTP exceptions: the CLI shares the services);
``ckptd.api.app`` maps them to HTTP statuses in one exception handler::

    CheckpointError                                  (ckptd.format.errors)
    └── CatalogError
        ├── NotFoundError(CatalogError, LookupError)       -> 404
        ├── ConflictError(CatalogError)                    -> 409  incompatible re-registration
        ├── InvalidTransitionError(ConflictError)          -> 409  checkpoint state machine violated
        ├── InvalidRequestError(CatalogError, ValueError)  -> 422  well-formed but meaningless request
        ├── OutsideRunRootError(InvalidRequestError)       -> 422  a URI that is not its step's directory
        ├── RootNotAllowedError(InvalidRequestError)       -> 422  a run root outside the allowed prefixes
        ├── BackendNotInstalledError(InvalidRequestError)  -> 422  gs://, az://... without its fsspec package
        └── StorageDeleteError(CatalogError)               -> 502  storage failed (deleting, listing)

``ckptd.format.errors.MetadataError`` (and ``UnsafeNameError``) and ``LayoutError`` raised while
validating input map to 422 as well; ``ckptd.format.errors.StorageError`` to 502.
"""

from __future__ import annotations

from ckptd.format.errors import CheckpointError


class CatalogError(CheckpointError):
    """Root of the errors the catalog raises on purpose."""


class NotFoundError(CatalogError, LookupError):
    """A run, checkpoint, alias or job that does not exist."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class ConflictError(CatalogError):
    """The request contradicts what the catalog already holds."""


class InvalidTransitionError(ConflictError):
    """A checkpoint state change that the state machine does not allow."""


class InvalidRequestError(CatalogError, ValueError):
    """A syntactically valid request that cannot be served (unknown metric, too many ranks, ...)."""


class OutsideRunRootError(InvalidRequestError):
    """A storage URI that does not lie strictly inside the run's registered root for its tier."""


class RootNotAllowedError(InvalidRequestError):
    """A run root that lies under none of the prefixes the server operator allowed."""


class BackendNotInstalledError(InvalidRequestError):
    """A storage URI whose fsspec backend (gcsfs, adlfs, ...) this server does not have."""


class StorageDeleteError(CatalogError):
    """Storage failed under a catalog operation: deleting a checkpoint's data, listing a run root."""
