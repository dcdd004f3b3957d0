"""Format v2 metadata: the small commit record, array tables, the state tree and per-rank state.

::

    step_0000000100/
      manifest.json              the commit record: created exclusively, last
      a-0123456789abcdef/        the attempt's Zarr v3 group: every array, in canonical shape
      a-0123456789abcdef.meta/
        tables/t-00000.json      array records, sorted by path, a page of at most PAGE_ARRAYS
        state.json               the state tree (JSON, tensors by array path)
        ranks/                   what only each rank restores (RNG states, ...): one Zarr v3
          zarr.json              array, row r = rank r's document (format/rank_array.py);
          c/3/0                  older v2 checkpoints: ranks/r-0000003.json objects
        lease                    refreshed by the committing writer while the attempt is open

Nothing here grows with the number of ranks: the commit record lists table pages (one per
PAGE_ARRAYS arrays) and totals, a restoring rank reads the record, the state tree, the pages
holding the arrays it restores and its own row of the rank-state array. Every document is sealed
(``strict_json``); the record also pins the size and crc32c of every page and of the state, so
a document of another attempt can never be mixed in.
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptd.format.codecs import crc32c
from ckptd.format.errors import IntegrityError, MetadataError
from ckptd.format.manifest import FORMAT_NAME, MANIFEST_KEY, ArrayRecord, Manifest, Totals
from ckptd.format.manifest_parse import parse_array, parse_mesh, with_context
from ckptd.format.names import check_array_path
from ckptd.format.store import Store
from ckptd.format.strict_json import dumps_sealed, integer, loads_sealed, lst, obj, string

PAGE_ARRAYS = 32
MAX_RECORD_BYTES = 1 * 2**20
"""Commit record limit: it holds totals, one entry per table page and the user's metadata."""
MAX_PAGE_BYTES = 8 * 2**20
MAX_STATE_BYTES = 128 * 2**20
MAX_RANK_BYTES = 1 * 2**20
"""A rank's state document (one row of the rank-state array, SPEC §8.3)."""
MAX_RANK_OBJECT_BYTES = 16 * 2**20
"""The JSON rank objects of older v2 checkpoints (``rank_state: true``)."""
MAX_METADATA_BYTES = 256 * 2**10
ATTEMPT = re.compile(r"^a-[0-9a-f]{16}$")


def check_attempt(name: str) -> str:
    if not isinstance(name, str) or not ATTEMPT.match(name):
        raise MetadataError(f"attempt {name!r} is not a-<16 hex digits>")
    return name


def meta_key(attempt: str, name: str) -> str:
    return f"{check_attempt(attempt)}.meta/{name}"


def page_key(attempt: str, index: int) -> str:
    return meta_key(attempt, f"tables/t-{index:05d}.json")


def rank_key(attempt: str, rank: int) -> str:
    return meta_key(attempt, f"ranks/r-{rank:07d}.json")


STATE_NAME = "state.json"
LEASE_NAME = "lease"


@dataclass(frozen=True, slots=True)
class PageRef:
    first: str
    last: str
    arrays: int
    size: int
    crc32c: int

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "arrays": self.arrays, "size": self.size,
                "crc32c": self.crc32c}


@dataclass(frozen=True, slots=True)
class BlobRef:
    size: int
    crc32c: int


# ---------------------------------------------------------------- writing


def encode_pages(attempt: str, arrays: Mapping[str, ArrayRecord]) -> list[tuple[PageRef, bytes]]:
    """Table pages of ``arrays`` (format v2 records: ``ArrayRecord.unlisted``)."""
    paths = sorted(arrays)
    out: list[tuple[PageRef, bytes]] = []
    for i, start in enumerate(range(0, len(paths), PAGE_ARRAYS)):
        chunk = paths[start : start + PAGE_ARRAYS]
        doc = {"format": f"{FORMAT_NAME}-arrays", "attempt": attempt, "page": i,
               "arrays": {p: arrays[p].to_json() for p in chunk}}
        raw = dumps_sealed(doc)
        if len(raw) > MAX_PAGE_BYTES:
            raise MetadataError(f"array table page {i} would be {len(raw)} bytes (limit {MAX_PAGE_BYTES})")
        out.append((PageRef(chunk[0], chunk[-1], len(chunk), len(raw), crc32c(raw)), raw))
    return out


def encode_state(attempt: str, state: dict[str, Any]) -> bytes:
    raw = dumps_sealed({"format": f"{FORMAT_NAME}-state", "attempt": attempt, "state": state})
    if len(raw) > MAX_STATE_BYTES:
        raise MetadataError(f"the state tree would be {len(raw)} bytes as JSON (limit {MAX_STATE_BYTES}): "
                            "large values belong in tensors")
    return raw


def encode_rank_state(attempt: str, rank: int, state: dict[str, Any]) -> bytes:
    """An older v2 checkpoint's rank object (new saves write the rank-state array instead)."""
    raw = dumps_sealed({"format": f"{FORMAT_NAME}-rank", "attempt": attempt, "rank": rank, "state": state})
    if len(raw) > MAX_RANK_OBJECT_BYTES:
        raise MetadataError(f"rank {rank}'s state would be {len(raw)} bytes (limit {MAX_RANK_OBJECT_BYTES})")
    return raw


def encode_record(manifest: Manifest, pages: Sequence[PageRef], state: BlobRef) -> bytes:
    """The commit record. Its size depends on the number of arrays (one entry per page) and the
    user's metadata, never on the world size; both limits are checked here, before publishing."""
    assert manifest.totals is not None
    metadata = dict(manifest.metadata)
    meta_raw = dumps_sealed({"metadata": metadata}) if metadata else b""
    if len(meta_raw) > MAX_METADATA_BYTES:
        raise MetadataError(
            f"checkpoint metadata is {len(meta_raw)} bytes as JSON (limit {MAX_METADATA_BYTES})"
        )
    doc = {
        "format": FORMAT_NAME,
        "format_version": 2,
        "step": manifest.step,
        "checkpoint_id": manifest.checkpoint_id,
        "attempt": manifest.attempt,
        "created_at": manifest.created_at,
        "world_size": manifest.world_size,
        "mesh": dict(manifest.mesh),
        "totals": manifest.totals.to_json(),
        "tables": [p.to_json() for p in pages],
        "state": {"size": state.size, "crc32c": state.crc32c},
        "rank_state": manifest.rank_state,
        "metadata": metadata,
    }
    raw = dumps_sealed(doc)
    if len(raw) > MAX_RECORD_BYTES:
        raise MetadataError(f"the commit record would be {len(raw)} bytes (limit {MAX_RECORD_BYTES}): "
                            f"{manifest.totals.arrays} arrays in {len(pages)} table pages")
    return raw


# ---------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class CommitRecord:
    manifest_fields: dict[str, Any]
    attempt: str
    pages: tuple[PageRef, ...]
    state: BlobRef


def parse_record(doc: dict[str, Any], where: str) -> CommitRecord:
    def parse() -> CommitRecord:
        attempt = check_attempt(string(doc.get("attempt"), "attempt"))
        t = obj(doc.get("totals"), "totals")
        totals = Totals(**{k: integer(t.get(k), f"totals.{k}", lo=0)
                           for k in ("arrays", "shards", "nbytes", "stored_bytes", "writers")})
        pages = tuple(_page_ref(p) for p in lst(doc.get("tables"), "tables"))
        for a, b in itertools.pairwise(pages):
            if not a.last < b.first:
                raise MetadataError(f"table pages are not sorted and disjoint ({a.last!r} >= {b.first!r})")
        if sum(p.arrays for p in pages) != totals.arrays:
            raise MetadataError(f"the table pages hold {sum(p.arrays for p in pages)} arrays, "
                                f"totals say {totals.arrays}")
        s = obj(doc.get("state"), "state")
        state = BlobRef(integer(s.get("size"), "state.size", lo=2, hi=MAX_STATE_BYTES),
                        integer(s.get("crc32c"), "state.crc32c", lo=0, hi=2**32 - 1))
        rank_state = doc.get("rank_state")
        if not isinstance(rank_state, bool) and rank_state != "array":
            raise MetadataError('rank_state must be true, false or "array"')
        fields = {
            "step": integer(doc.get("step"), "step", lo=0, hi=10**10 - 1),
            "checkpoint_id": string(doc.get("checkpoint_id"), "checkpoint_id"),
            "created_at": string(doc.get("created_at"), "created_at"),
            "world_size": integer(doc.get("world_size"), "world_size", lo=1, hi=2**31),
            "mesh": parse_mesh(doc.get("mesh", {})),
            "metadata": obj(doc.get("metadata", {}), "metadata"),
            "format_version": 2,
            "attempt": attempt,
            "totals": totals,
            "rank_state": rank_state,
        }
        return CommitRecord(fields, attempt, pages, state)

    result: CommitRecord = with_context(where, parse)
    return result


def _page_ref(doc: Any) -> PageRef:
    p = obj(doc, "table page")
    first = check_array_path(string(p.get("first"), "table page first"))
    last = check_array_path(string(p.get("last"), "table page last"))
    if last < first:
        raise MetadataError(f"table page {first!r}..{last!r} is empty")
    return PageRef(first, last, integer(p.get("arrays"), "table page arrays", lo=1, hi=4096),
                   integer(p.get("size"), "table page size", lo=2, hi=MAX_PAGE_BYTES),
                   integer(p.get("crc32c"), "table page crc32c", lo=0, hi=2**32 - 1))


def read_pinned(store: Store, key: str, ref: BlobRef | PageRef, what: str) -> bytes:
    """An object whose size and crc32c the commit record pins (absent or different: IntegrityError)."""
    try:
        # never more than one byte beyond the pinned size: a replaced, huge object is not read whole
        (raw,) = store.read_ranges(key, [(0, ref.size + 1)])
    except FileNotFoundError:
        raise IntegrityError(f"{what} ({store.url}/{key}) is missing") from None
    if len(raw) != ref.size or crc32c(raw) != ref.crc32c:
        raise IntegrityError(f"{what} ({store.url}/{key}) does not match the commit record")
    return raw


def load_state(store: Store, record: CommitRecord, where: str) -> dict[str, Any]:
    raw = read_pinned(store, meta_key(record.attempt, STATE_NAME), record.state, "the state tree")
    doc = loads_sealed(raw, f"{where} state tree", limit=MAX_STATE_BYTES)
    if doc.get("attempt") != record.attempt:
        raise IntegrityError(f"{where}: the state tree belongs to another attempt")
    return obj(doc.get("state"), f"{where} state")


def load_rank_state(store: Store, attempt: str, rank: int, where: str) -> dict[str, Any] | None:
    """Rank ``rank``'s own state from an older v2 checkpoint's JSON object (None when it saved none)."""
    key = rank_key(attempt, rank)
    try:
        raw = store.read(key)
    except FileNotFoundError:
        return None
    doc = loads_sealed(raw, f"{where} rank {rank} state", limit=MAX_RANK_OBJECT_BYTES)
    if doc.get("attempt") != attempt or doc.get("rank") != rank:
        raise IntegrityError(f"{where}: {key} belongs to another attempt or rank")
    return obj(doc.get("state"), f"{where} rank {rank} state")


class ArrayTable(Mapping[str, ArrayRecord]):
    """The arrays of a format v2 checkpoint, loading a table page on first access to one of its
    arrays (thread-safe). ``loaded_bytes`` counts what was fetched (the scale benchmark reads it)."""

    def __init__(self, store: Store, record: CommitRecord, where: str) -> None:
        self._store = store
        self._record = record
        self._where = where
        self._firsts = [p.first for p in record.pages]
        self._pages: dict[int, dict[str, ArrayRecord]] = {}
        self._lock = threading.Lock()
        self.loaded_bytes = 0

    def _page_of(self, path: str) -> int | None:
        i = bisect.bisect_right(self._firsts, path) - 1
        if i < 0 or path > self._record.pages[i].last:
            return None
        return i

    def _load(self, i: int) -> dict[str, ArrayRecord]:
        with self._lock:
            page = self._pages.get(i)
        if page is not None:
            return page
        ref = self._record.pages[i]
        raw = read_pinned(self._store, page_key(self._record.attempt, i), ref, f"array table page {i}")
        where = f"{self._where} table page {i}"
        doc = loads_sealed(raw, where, limit=MAX_PAGE_BYTES)
        if doc.get("attempt") != self._record.attempt or doc.get("page") != i:
            raise IntegrityError(f"{where} belongs to another attempt or page")
        arrays_doc = obj(doc.get("arrays"), f"{where} arrays")
        page = with_context(where, lambda: {check_array_path(p): parse_array(p, a, listed=False)
                                            for p, a in arrays_doc.items()})
        paths = sorted(page)
        if len(paths) != ref.arrays or paths[0] != ref.first or paths[-1] != ref.last:
            raise IntegrityError(f"{where} does not hold the arrays the commit record says")
        with self._lock:
            self._pages[i] = page
            self.loaded_bytes += len(raw)
        return page

    def __getitem__(self, path: str) -> ArrayRecord:
        i = self._page_of(path)
        if i is None:
            raise KeyError(path)
        return self._load(i)[path]

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        i = self._page_of(path)
        return i is not None and path in self._load(i)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self._record.pages)):
            yield from sorted(self._load(i))

    def __len__(self) -> int:
        return sum(p.arrays for p in self._record.pages)


def load_manifest(step_store: Store, raw_doc: dict[str, Any], where: str) -> Manifest:
    """A format v2 checkpoint's manifest view: the record parsed, the state tree loaded, arrays lazy."""
    record = parse_record(raw_doc, where)
    state = load_state(step_store, record, where)
    return Manifest(arrays=ArrayTable(step_store, record, where), state=state, **record.manifest_fields)


__all__ = ["MANIFEST_KEY", "ArrayTable", "CommitRecord", "PageRef", "load_manifest", "load_rank_state"]
