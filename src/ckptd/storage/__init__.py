"""Storage backends behind the ``ckptd.format.store.Store`` contract.

``open_store(uri)`` picks the backend: a plain path or ``file://`` URL gets the
local store (fsync'd, atomic rename); anything else goes through fsspec
(``s3://`` via s3fs, ``memory://``, ``gs://``, ...). ``register_scheme`` adds a scheme of
one's own (a backend fsspec lacks, or a wrapping store such as the fault injector of the
commit-failure tests), which every ``open_store`` caller then reaches, the engine's tiers included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckptd.format.store import Store
from ckptd.storage.fsspec_store import FsspecStore
from ckptd.storage.local import LocalStore

__all__ = ["FsspecStore", "LocalStore", "Store", "open_store", "register_scheme"]

Opener = Callable[[str, dict[str, Any] | None], Store]
_SCHEMES: dict[str, Opener] = {}


def register_scheme(scheme: str, opener: Opener) -> None:
    """Open ``scheme://...`` URLs with ``opener(uri, storage_options)`` from now on (this process)."""
    _SCHEMES[scheme] = opener


def open_store(uri: str, storage_options: dict[str, Any] | None = None, *, fsync: bool = True) -> Store:
    opener = _SCHEMES.get(uri.partition("://")[0]) if "://" in uri else None
    if opener is not None:
        return opener(uri, storage_options)
    if "://" not in uri:
        return LocalStore(uri, fsync=fsync)
    if uri.startswith("file://"):
        return LocalStore(uri.removeprefix("file://"), fsync=fsync)
    return FsspecStore.from_url(uri, storage_options)
