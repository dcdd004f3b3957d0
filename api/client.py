"""Moved to :mod:`ckptd.wire.client` (the catalog client is a leaf that the engine uses too);
this name stays for code that imported it. Like its target, it loads neither torch nor FastAPI."""

from ckptd.wire.client import (
    API_PREFIX,
    CatalogClient,
    CheckpointRef,
    ClientConfig,
    RollbackPointer,
)

__all__ = ["API_PREFIX", "CatalogClient", "CheckpointRef", "ClientConfig", "RollbackPointer"]
