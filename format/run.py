"""A run root: the committed checkpoints under one URL, by step.

Layout: ``<run root>/step_<10-digit step>/`` holds one checkpoint; it is committed exactly
when its ``manifest.json`` exists. In format v2 every save attempt writes into its own
``a-<16 hex>/`` directory (plus ``a-<16 hex>.meta/``) beside it, and the commit record names
the attempt that won; format v1 checkpoints keep their data at the step directory's root.
Attempts that never committed (crashes, losers of a race, zombie writers) are invisible to
readers and collected by ``gc_uncommitted`` once no writer has held them for a while.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ckptd.format.commit import check_tally, commit, new_attempt, publish
from ckptd.format.commit_record import (
    ATTEMPT,
    LEASE_NAME,
    MAX_RECORD_BYTES,
    load_manifest,
    load_rank_state,
    meta_key,
)
from ckptd.format.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    MetadataError,
    StorageError,
)
from ckptd.format.lease import Lease
from ckptd.format.manifest import MANIFEST_KEY, MAX_MANIFEST_BYTES, ArrayRecord, Manifest, RankState, Totals
from ckptd.format.manifest_parse import loads_document, parse, with_context
from ckptd.format.rank_array import load_rank_chunk
from ckptd.format.store import Store
from ckptd.format.tally import Tally
from ckptd.format.verify import Problem, verify
from ckptd.format.writer import WriterReport

if TYPE_CHECKING:  # the reader loads torch: listing, verifying and gc never restore
    from ckptd.format.reader import CheckpointReader

_STEP_DIR = re.compile(r"^step_(\d{10})$")
_META_SUFFIX = ".meta"


def step_dir(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**10:
        raise ConfigError(f"step must be an integer in [0, 10**10), got {step!r}")
    return f"step_{step:010d}"


class Run:
    """The checkpoints of one run root."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._open: dict[int, tuple[str, Lease]] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.store.url

    def _step_dirs(self) -> list[tuple[int, str]]:
        try:
            names = self.store.list_dir("")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"listing {self.url} failed: {e}") from e
        out = []
        for n in names:
            m = _STEP_DIR.match(n)
            if m:
                out.append((int(m.group(1)), n))
        return sorted(out)

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return [s for s, d in self._step_dirs() if self.store.exists(f"{d}/{MANIFEST_KEY}")]

    def uncommitted(self) -> list[int]:
        return [s for s, d in self._step_dirs() if not self.store.exists(f"{d}/{MANIFEST_KEY}")]

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def checkpoint_store(self, step: int) -> Store:
        """The step directory (commit record, attempts)."""
        return self.store.child(step_dir(step))

    def attempt_store(self, step: int, attempt: str) -> Store:
        """Where the writers of ``attempt`` put their shards (the attempt's Zarr group)."""
        if not ATTEMPT.match(attempt):
            raise MetadataError(f"attempt {attempt!r} is not a-<16 hex digits>")
        return self.store.child(f"{step_dir(step)}/{attempt}")

    def data_store(self, step: int, manifest: Manifest) -> Store:
        return self.attempt_store(step, manifest.attempt) if manifest.attempt else self.checkpoint_store(step)

    def is_committed(self, step: int) -> bool:
        return self.store.exists(f"{step_dir(step)}/{MANIFEST_KEY}")

    def manifest(self, step: int) -> Manifest:
        key = f"{step_dir(step)}/{MANIFEST_KEY}"
        try:
            # one bounded read: a hostile or damaged 40 GB manifest is refused, never read whole
            (raw,) = self.store.read_ranges(key, [(0, MAX_MANIFEST_BYTES + 1)])
            if len(raw) > MAX_MANIFEST_BYTES:
                raise MetadataError(f"{self.url}/{key} is larger than the {MAX_MANIFEST_BYTES} byte limit")
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {step} in {self.url}") from None
        except OSError as e:
            raise StorageError(f"reading {key} from {self.url} failed: {e}") from e
        where = f"{self.url}/{key}"
        version, doc = loads_document(raw, where)
        if version >= 2 and len(raw) > MAX_RECORD_BYTES:
            raise MetadataError(f"{where} is {len(raw)} bytes, larger than the {MAX_RECORD_BYTES} limit of "
                                "a format v2 commit record")
        m: Manifest = (with_context(where, lambda: parse(doc)) if version == 1
                       else load_manifest(self.checkpoint_store(step), doc, where))
        if m.step != step:
            raise MetadataError(f"{where} describes step {m.step}, not {step}")
        return m

    def rank_state(self, step: int, rank: int, manifest: Manifest) -> dict[str, Any] | None:
        """What rank ``rank`` saved for itself alone (format v2; v1 kept it in the metadata): its
        row of the rank-state array, or its JSON object in older v2 checkpoints."""
        where = f"{self.url}/{step_dir(step)}"
        if manifest.rank_state == "array":
            store = self.checkpoint_store(step)
            return load_rank_chunk(store, manifest.attempt, rank, manifest.world_size, where)
        if manifest.rank_state is True:
            return load_rank_state(self.checkpoint_store(step), manifest.attempt, rank, where)
        return None

    def reader(self, step: int | None = None, *, threads: int = 8) -> CheckpointReader:
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.url}")
        m = self.manifest(step)
        from ckptd.format.reader import CheckpointReader

        return CheckpointReader(self.data_store(step, m), m, threads=threads)

    def verify(self, step: int, *, threads: int = 8) -> list[Problem]:
        m = self.manifest(step)
        return verify(self.data_store(step, m), m, threads=threads)

    # ---------------------------------------------------------------- writing
    def prepare(self, step: int, *, overwrite: bool = False, attempt: str | None = None) -> Store:
        """Open a save attempt of ``step``; returns the store its writers write into.

        Nothing already there is touched (another attempt may belong to a live writer: the
        exclusive commit decides between them). ``overwrite`` deletes a committed checkpoint of
        this step first. The attempt holds a lease until ``commit`` or ``abandon``.
        """
        d = step_dir(step)
        if self.store.exists(f"{d}/{MANIFEST_KEY}"):
            if not overwrite:
                raise CheckpointExistsError(f"step {step} is already committed in {self.url}")
            self.delete(step)
        attempt = attempt or new_attempt()
        lease = Lease(self.checkpoint_store(step), meta_key(attempt, LEASE_NAME)).__enter__()
        with self._lock:
            old = self._open.pop(step, None)
            self._open[step] = (attempt, lease)
        if old is not None:
            old[1].__exit__()
        return self.attempt_store(step, attempt)

    def open_attempt(self, step: int) -> str | None:
        with self._lock:
            entry = self._open.get(step)
        return entry[0] if entry else None

    def abandon(self, step: int) -> None:
        """Stop holding the lease of this process's open attempt of ``step`` (gc may collect it)."""
        with self._lock:
            entry = self._open.pop(step, None)
        if entry is not None:
            entry[1].__exit__()

    @contextlib.contextmanager
    def _abandoned_if_lost(self, step: int, lease: Lease | None) -> Iterator[None]:
        try:
            yield
        except CheckpointExistsError:
            if lease is not None:
                with self._lock:
                    self._open.pop(step, None)
                lease.release()
            raise

    def commit(
        self,
        step: int,
        reports: list[WriterReport],
        *,
        state: dict[str, Any],
        world_size: int = 1,
        mesh: Mapping[str, int] | None = None,
        metadata: Mapping[str, Any] | None = None,
        attempt: str | None = None,
        rank_state: RankState = False,
    ) -> Manifest:
        """Commit the attempt ``prepare`` opened (or ``attempt``, opened by another process)."""
        with self._lock:
            entry = self._open.get(step)
        if attempt is None and entry is None:
            raise RuntimeError(f"step {step}: no save attempt is open in this process (call prepare)")
        lease = entry[1] if entry is not None and (attempt is None or attempt == entry[0]) else None
        attempt = attempt or (entry[0] if entry else None)
        # A failure leaves the attempt open (a caller may retry with complete reports); ``abandon``
        # ends it, and gc collects it once its lease is old. Losing the race to another attempt
        # ends it here: no retry can win it, and a lease refreshed for the life of the process
        # would keep gc from ever collecting the loser.
        with self._abandoned_if_lost(step, lease):
            manifest = commit(self.checkpoint_store(step), step=step, reports=reports, state=state,
                              world_size=world_size, mesh=mesh, metadata=metadata, attempt=attempt,
                              rank_state=rank_state, lease=lease)
        if lease is not None:
            with self._lock:
                self._open.pop(step, None)
            lease.release()
        return manifest

    def commit_planned(
        self,
        step: int,
        *,
        arrays: Mapping[str, ArrayRecord],
        tally: Tally,
        writers: int,
        state: dict[str, Any],
        world_size: int,
        mesh: Mapping[str, int] | None = None,
        metadata: Mapping[str, Any] | None = None,
        rank_state: RankState = False,
    ) -> Manifest:
        """Commit the open attempt from what a distributed commit gathered: the arrays as their lead
        writers planned them (they also wrote their ``zarr.json``) and the summed tally, which must be
        exactly what the plan requires."""
        with self._lock:
            entry = self._open.get(step)
        if entry is None:
            raise RuntimeError(f"step {step}: no save attempt is open in this process (call prepare)")
        attempt, lease = entry
        check_tally(arrays, tally)
        totals = Totals(arrays=len(arrays), shards=tally.shards, nbytes=tally.nbytes,
                        stored_bytes=tally.stored_bytes, writers=writers)
        with self._abandoned_if_lost(step, lease):
            manifest = publish(self.checkpoint_store(step), step=step, attempt=attempt, arrays=arrays,
                               state=state, world_size=world_size, mesh=mesh, metadata=metadata,
                               totals=totals, rank_state=rank_state, lease=lease,
                               documented=arrays.keys())
        with self._lock:
            self._open.pop(step, None)
        lease.release()
        return manifest

    def delete(self, step: int) -> None:
        """Uncommit, then delete.

        The manifest goes first, so a crash never leaves a committed but partial checkpoint.
        """
        d = step_dir(step)
        self.store.delete(f"{d}/{MANIFEST_KEY}")
        self.store.delete_prefix(d)

    def gc_uncommitted(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> list[int]:
        """Delete what no committed checkpoint uses and no writer touched for ``min_age_s``.

        Uncommitted attempts (crashes, losers of a commit race, zombies) go once their lease, or
        without one their newest object, is that old; the lease is deleted first, so a writer
        paused meanwhile fails at its commit instead of publishing deleted files. Format v1 step
        directories without a manifest go whole. Returns the steps where something was deleted.
        """
        now = time.time()
        collected = []
        for s, d in self._step_dirs():
            step_store = self.store.child(d)
            committed = self.store.exists(f"{d}/{MANIFEST_KEY}")
            keep = self.manifest(s).attempt if committed else None
            names = step_store.list_dir("")
            attempts = sorted({n.removesuffix(_META_SUFFIX) for n in names
                               if ATTEMPT.match(n.removesuffix(_META_SUFFIX))} - {keep})
            stale = [a for a in attempts if _age(step_store, a, now) >= min_age_s]
            legacy = not committed and not attempts
            if legacy:
                mtime = self.store.mtime(d)
                if mtime is not None and now - mtime < min_age_s:
                    continue
            if not stale and not legacy:
                continue
            if not dry_run:
                for a in stale:
                    step_store.delete(meta_key(a, LEASE_NAME))
                    step_store.delete_prefix(a)
                    step_store.delete_prefix(a + _META_SUFFIX)
                whole = legacy or (not committed and len(stale) == len(attempts))
                if whole and not self.store.exists(f"{d}/{MANIFEST_KEY}"):
                    self.store.delete_prefix(d)
            collected.append(s)
        return collected


def _age(step_store: Store, attempt: str, now: float) -> float:
    """Seconds since a writer last touched ``attempt`` (its lease, else its newest object)."""
    lease = step_store.mtime(meta_key(attempt, LEASE_NAME))
    if lease is not None:
        return now - lease
    newest = max((t for t in (step_store.mtime(attempt), step_store.mtime(attempt + _META_SUFFIX))
                   if t is not None), default=None)
    return float("inf") if newest is None else now - newest
