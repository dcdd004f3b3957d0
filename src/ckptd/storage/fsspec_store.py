"""A store over any fsspec filesystem: S3 (s3fs) first, memory, GCS, Azure, ...

Object stores have no rename, so ``write_atomic`` relies on single-PUT atomicity:
an object is visible whole or not at all. Listing caches are disabled because other
processes (other ranks, the catalog, a GC) change the same prefixes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import fsspec

from ckptd.format.errors import CheckpointExistsError, StorageError
from ckptd.format.store import Buffer
from ckptd.storage.errors import Missing, map_exceptions


class FsspecStore:
    def __init__(self, fs: Any, root: str, *, protocol: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.protocol = protocol

    @staticmethod
    def from_url(url: str, storage_options: dict[str, Any] | None = None) -> FsspecStore:
        protocol = url.split("://", 1)[0]
        opts = dict(storage_options or {})
        if protocol in ("s3", "s3a"):
            opts.setdefault("use_listings_cache", False)
            opts.setdefault("skip_instance_cache", True)
        try:
            fs, path = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open {url}: {e}", url=url) from e
        return FsspecStore(fs, path, protocol=protocol)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.root}"

    def _path(self, key: str) -> str:
        if key.startswith("/") or any(p in ("..", ".") for p in key.split("/") if p):
            raise StorageError(f"refusing key {key!r}: it would leave the store root {self.url}", key=key,
                               url=self.url)
        return f"{self.root}/{key}" if key else self.root

    def child(self, prefix: str) -> FsspecStore:
        return FsspecStore(self.fs, self._path(prefix), protocol=self.protocol)

    def _mapped(self, what: str, key: str, missing: Missing = "raise") -> AbstractContextManager[None]:
        """Backend errors of ``what`` on ``key`` as ``StorageError`` (see ``storage/errors.py``)."""
        return map_exceptions(f"{what} {key or '/'}", url=self.url, key=key, missing=missing)

    def write(self, key: str, data: Sequence[Buffer]) -> int:
        blob = data[0] if len(data) == 1 and isinstance(data[0], bytes) else b"".join(data)
        with self._mapped("writing", key, missing="wrap"):
            self.fs.pipe_file(self._path(key), blob)
        return len(blob)

    def open_write(self, key: str) -> _FsspecStream:
        with self._mapped("opening for writing", key, missing="wrap"):
            return _FsspecStream(self.fs.open(self._path(key), "wb", block_size=32 * 2**20), self, key)

    def write_atomic(self, key: str, data: bytes) -> None:
        # A single PUT is atomic on S3 and every object store; memory:// is atomic per call.
        self.write(key, [data])

    def write_exclusive(self, key: str, data: bytes) -> None:
        """S3: ``If-None-Match: *`` (s3fs ``mode="create"``), atomic on the server. Other fsspec
        backends get fsspec's generic check-then-write, which is not atomic: there, two writers of
        one step can both believe they won, but each manifest names its own attempt directory, so
        the data of two attempts still never mixes (see SPEC.md, "Commit protocol")."""
        path = self._path(key)
        with self._mapped("writing", key, missing="wrap"):
            try:
                self.fs.pipe_file(path, data, mode="create")
            except Exception as e:
                if isinstance(e, FileExistsError) or _precondition_failed(e):
                    raise CheckpointExistsError(
                        f"{self.url}/{key} already exists: another writer committed first"
                    ) from None
                raise

    def flush(self) -> None:
        """Every completed PUT is durable on object stores."""

    def read(self, key: str) -> bytes:
        with self._mapped("reading", key):
            return bytes(self.fs.cat_file(self._path(key)))

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        path = self._path(key)
        with self._mapped("reading", key):
            if len(ranges) == 1:
                start, stop = ranges[0]
                return [bytes(self.fs.cat_file(path, start=start, end=stop))]
            out = self.fs.cat_ranges(
                [path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges], on_error="raise"
            )
            return [bytes(b) for b in out]

    def read_tail(self, key: str, n: int) -> bytes:
        path = self._path(key)
        with self._mapped("reading", key):
            try:
                return bytes(self.fs.cat_file(path, start=-n))
            except Exception as e:
                if isinstance(e, FileNotFoundError) or ("InvalidRange" not in str(e) and "416" not in str(e)):
                    raise
        return self.read(key)  # shorter than n: the whole object

    def size(self, key: str) -> int:
        with self._mapped("stat", key):
            return int(self.fs.size(self._path(key)))

    def exists(self, key: str) -> bool:
        with self._mapped("checking", key, missing="wrap"):
            return bool(self.fs.exists(self._path(key)))

    def list_dir(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        entries: list[Any] = []  # a missing prefix lists as empty
        with self._mapped("listing", prefix, missing="ignore"):
            self.fs.invalidate_cache(path)
            entries = self.fs.ls(path, detail=False)
        names = sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})
        return [n for n in names if n and not n.startswith(".") and f"{path}/{n}".rstrip("/") != path]

    def mtime(self, key: str) -> float | None:
        path = self._path(key)
        infos: Any = {}  # a missing key has no mtime
        with self._mapped("listing", key, missing="ignore"):
            infos = self.fs.find(path, detail=True, withdirs=False)
        newest: float | None = None
        for info in infos.values() if isinstance(infos, dict) else []:
            t = _mtime_of(info)
            if t is not None:
                newest = t if newest is None else max(newest, t)
        return newest

    def delete(self, key: str) -> None:
        with self._mapped("deleting", key, missing="ignore"):
            self.fs.rm_file(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        if not prefix:
            raise StorageError("refusing to delete a whole store root")
        path = self._path(prefix)
        with self._mapped("deleting", prefix, missing="ignore"):
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)


def _precondition_failed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return "PreconditionFailed" in text or "412" in text or "At least one of the pre-conditions" in text


def _mtime_of(info: dict[str, Any]) -> float | None:
    for k in ("LastModified", "mtime", "created", "last_modified"):
        v = info.get(k)
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, int | float):
            return float(v)
    return None


class _FsspecStream:
    """fsspec's buffered writer: multipart upload on S3, the object appears on close."""

    def __init__(self, f: Any, store: FsspecStore, key: str) -> None:
        self._f, self._store, self._key = f, store, key

    def write(self, data: Buffer, /) -> int:
        try:
            with self._store._mapped("writing", self._key, missing="wrap"):
                return int(self._f.write(data))
        except StorageError:
            self.abort()
            raise

    def close(self) -> None:
        with self._store._mapped("writing", self._key, missing="wrap"):
            self._f.close()

    def abort(self) -> None:
        try:
            if hasattr(self._f, "discard"):
                self._f.discard()
            else:
                self._f.close()
        except Exception:  # aborting is best effort; the uncommitted object is garbage-collected
            pass
