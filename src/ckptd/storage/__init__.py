"""Storage backends behind the ``ckptd.format.store.Store`` contract.

``open_store(uri)`` picks the backend: a plain path or ``file://`` URL gets the
local store (fsync'd, atomic rename); anything else goes through fsspec
(``s3://`` via s3fs, ``memory://``, ``gs://``, ...).
"""

from __future__ import annotations

from typing import Any

from ckptd.format.store import Store
from ckptd.storage.fsspec_store import FsspecStore
from ckptd.storage.local import LocalStore

__all__ = ["FsspecStore", "LocalStore", "Store", "open_store"]


def open_store(uri: str, storage_options: dict[str, Any] | None = None, *, fsync: bool = True) -> Store:
    if "://" not in uri:
        return LocalStore(uri, fsync=fsync)
    if uri.startswith("file://"):
        return LocalStore(uri.removeprefix("file://"), fsync=fsync)
    return FsspecStore.from_url(uri, storage_options)
