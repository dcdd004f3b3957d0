"""How ranks agree: on decisions at step boundaries, and on committing a checkpoint.

Two channels, neither of them the training process group (a collective issued from a
background thread on the training group interleaves with the training's own collectives
and deadlocks, or corrupts NCCL's stream order):

* step-boundary agreement runs on the main thread over a dedicated **gloo** group. It never
  blocks a step: ``start_max_all`` issues an asynchronous all-reduce whose result the
  checkpointer reads one step boundary later (``agreement.py``); only explicit calls
  (``wait()``, ``save()``, ``restore()``) agree synchronously;
* the commit protocol runs on the flush threads over the **TCPStore**, with O(1) requests per
  rank and no hot key: each rank adds its tally (shard count, fingerprint, bytes) to a few
  counters and bumps ``reported``; the rank whose bump completes the count wakes the committer.
  Only writers that own an array's first box send that array's description (``lead``), so
  what reaches rank 0 is O(arrays), never O(ranks x arrays). Waits are blocking server-side
  waits on a per-thread clone of the store client (no polling; a blocking wait on a shared
  client would stall another tier's thread of the same process).

Commit protocol for one attempt ``key`` (its directory name is derived from the job's
session and ``key`` on every rank, so nothing has to be sent before writing): rank 0 opens
the attempt (its lease); every rank writes its boxes and its own rank-state chunk, makes
them durable and reports; rank 0 checks the tally against the storage plan, publishes the
commit record exclusively and sets ``done``. A failed, dead or stuck rank ends the attempt
within ``timeout_s`` on every live rank as a ``CheckpointError``; nothing is committed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

from ckptd.format.errors import ConfigError, CoordinationTimeout, LayoutError, StorageError
from ckptd.format.manifest import ArrayRecord
from ckptd.format.tally import Tally
from ckptd.format.writer import WriterReport

Open = Callable[[], None]
Write = Callable[[], WriterReport]


@dataclass(frozen=True, slots=True)
class Gathered:
    """What the committer learns from every rank of one attempt."""

    arrays: dict[str, ArrayRecord]
    tally: Tally
    writers: int
    """Ranks that wrote at least one shard."""
    rank_states: int
    """Ranks that wrote their own rank-state chunk (a row of the rank-state array)."""


Finalize = Callable[[Gathered], None]
__all__ = ["CoordinationTimeout", "Coordinator", "DistributedCoordinator", "Gathered", "LocalCoordinator"]


class Coordinator(Protocol):
    rank: int
    world_size: int

    def agree_max_all(self, values: list[int]) -> list[int]: ...

    def start_max_all(self, values: list[int]) -> Callable[[], list[int]]: ...

    def attempt_name(self, key: str) -> str: ...

    def commit(self, key: str, *, open_attempt: Open, write: Write, finalize: Finalize) -> None: ...

    def close(self) -> None: ...


def merge_leads(docs: list[dict[str, ArrayRecord]]) -> dict[str, ArrayRecord]:
    merged: dict[str, ArrayRecord] = {}
    for doc in docs:
        for path, rec in doc.items():
            have = merged.setdefault(path, rec)
            if have is not rec and have.to_json() != rec.to_json():
                raise LayoutError(f"{path}: ranks planned the array differently ({have.to_json()} vs "
                                  f"{rec.to_json()})")
    return merged


class LocalCoordinator:
    """One process: nothing to agree on."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.session = uuid.uuid4().hex

    def agree_max_all(self, values: list[int]) -> list[int]:
        return list(values)

    def start_max_all(self, values: list[int]) -> Callable[[], list[int]]:
        result = list(values)
        return lambda: result

    def attempt_name(self, key: str) -> str:
        return attempt_name(self.session, key)

    def commit(self, key: str, *, open_attempt: Open, write: Write, finalize: Finalize) -> None:
        open_attempt()
        report = write()
        finalize(Gathered(report.lead_records(), report.tally, int(report.tally.shards > 0),
                          int(report.rank_state)))

    def close(self) -> None:
        pass


def attempt_name(session: str, key: str) -> str:
    return "a-" + hashlib.sha256(f"{session}/{key}".encode()).hexdigest()[:16]


_COUNTERS = ("shards", "fp_lo", "fp_hi", "nbytes", "stored_bytes", "writers", "rank_states")


class DistributedCoordinator:
    """Agreement for a torch.distributed job (gloo or NCCL training group)."""

    def __init__(self, *, store: Any | None = None, timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("DistributedCoordinator needs an initialised torch.distributed group "
                              "(torch.distributed.init_process_group first)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout_s = timeout_s
        # Collective over the training group exactly once, at construction (every rank builds
        # its Checkpointer at the same point); from then on only the new gloo group is used.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        session = torch.zeros(16, dtype=torch.uint8)
        if self.rank == 0:
            session[:] = torch.frombuffer(bytearray(uuid.uuid4().bytes), dtype=torch.uint8)
        dist.broadcast(session, src=0, group=self.group)
        self.session = bytes(session.tolist()).hex()
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        prefix_store = getattr(dist, "PrefixStore")  # noqa: B009 - not in torch.distributed's __all__
        self.store = prefix_store(f"ckptd/{self.session}/", base)
        self._local = threading.local()

    # ---------------------------------------------------------------- main-thread agreement
    def agree_max_all(self, values: list[int]) -> list[int]:
        return self.start_max_all(values)()

    def start_max_all(self, values: list[int]) -> Callable[[], list[int]]:
        """Issue an all-reduce (max) on the engine's gloo group; the returned call waits for it."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

        def result() -> list[int]:
            if work is not None:
                try:
                    work.wait()
                except Exception as e:  # gloo: a peer died, or did not arrive within the timeout
                    raise CoordinationTimeout(
                        f"ranks could not agree at a step boundary within {self.timeout_s:.0f}s (a rank "
                        f"died or is stuck): {type(e).__name__}: {str(e)[:300]}"
                    ) from e
            return [int(v) for v in t.tolist()]

        return result

    def attempt_name(self, key: str) -> str:
        return attempt_name(self.session, key)

    # ---------------------------------------------------------------- commit protocol
    def _client(self) -> Any:
        """This thread's own connection to the store: blocking waits hold a client's lock."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self.store.clone() if hasattr(self.store, "clone") else self.store
            self._local.client = client
        return client

    def _wait(self, key: str, what: str) -> None:
        try:
            self._client().wait([key], timedelta(seconds=self.timeout_s))
        except Exception as e:  # DistStoreError on timeout; RuntimeError when the store went away
            raise CoordinationTimeout(f"timed out after {self.timeout_s:.0f}s waiting for {what} "
                                      f"({type(e).__name__}); nothing was committed") from e

    def commit(self, key: str, *, open_attempt: Open, write: Write, finalize: Finalize) -> None:
        store = self._client()
        try:
            error: BaseException | None = None
            try:
                if self.rank == 0:
                    open_attempt()
                report = write()
                self._report(store, key, report)
            except BaseException as e:
                error = e
                store.set(f"{key}/error", f"rank {self.rank}: {type(e).__name__}: {e}")
                store.add(f"{key}/failed", 1)
            if store.add(f"{key}/reported", 1) == self.world_size:
                store.set(f"{key}/all", "1")  # the last reporter wakes the committer
            if self.rank == 0:
                self._finish_as_committer(store, key, finalize, error)
            else:
                self._wait(f"{key}/done", f"rank 0 to commit {key}")
                if error is not None:
                    raise error
                doc = json.loads(store.get(f"{key}/done").decode())
                if not isinstance(doc, dict) or "error" in doc:
                    raise StorageError(f"checkpoint {key} was not committed: "
                                          f"{doc.get('error') if isinstance(doc, dict) else doc}")
        finally:
            self._leave(store, key)

    def _report(self, store: Any, key: str, report: WriterReport) -> None:
        leads = report.lead_records()
        if leads:
            index = store.add(f"{key}/nleads", 1) - 1
            store.set(f"{key}/lead/{index}", encode_leads(leads))
        counters = report.tally.counters()
        counters["writers"] = int(report.tally.shards > 0)
        counters["rank_states"] = int(report.rank_state)
        for name in _COUNTERS:
            if counters[name]:
                store.add(f"{key}/n/{name}", counters[name])

    def _finish_as_committer(self, store: Any, key: str, finalize: Finalize,
                             own_error: BaseException | None) -> None:
        try:
            self._wait(f"{key}/all", f"every rank's shards of {key}")
            if store.add(f"{key}/failed", 0):
                raise StorageError(f"checkpoint {key} failed on {store.get(f'{key}/error').decode()}")
            counts = {name: store.add(f"{key}/n/{name}", 0) for name in _COUNTERS}
            leads = []
            for i in range(store.add(f"{key}/nleads", 0)):
                leads.append(parse_leads(store.get(f"{key}/lead/{i}")))
            finalize(Gathered(merge_leads(leads), Tally.from_counters(counts), counts["writers"],
                              counts["rank_states"]))
        except BaseException as e:
            store.set(f"{key}/done", json.dumps({"error": str(e)}))
            if own_error is not None:
                raise own_error from e
            raise
        store.set(f"{key}/done", json.dumps({"ok": True}))

    def _leave(self, store: Any, key: str) -> None:
        """The last rank out removes the attempt's keys, so a long run does not grow the store."""
        try:
            if store.add(f"{key}/out", 1) != self.world_size:
                return
            names = ["reported", "all", "failed", "error", "done", "out", "nleads"]
            names += [f"n/{n}" for n in _COUNTERS]
            names += [f"lead/{i}" for i in range(store.add(f"{key}/nleads", 0))]
            for n in names:
                store.delete_key(f"{key}/{n}")
        except Exception:  # the store may be gone when the job is ending; keys are only clutter
            pass

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self.group)


def encode_leads(leads: dict[str, ArrayRecord]) -> str:
    """A lead writer's array descriptions as JSON (never a pickle: the committer parses it strictly)."""
    return json.dumps({p: a.to_json() for p, a in leads.items()}, separators=(",", ":"))


def parse_leads(raw: bytes) -> dict[str, ArrayRecord]:
    from ckptd.format.errors import MetadataError
    from ckptd.format.manifest_parse import parse_array
    from ckptd.format.names import check_array_path

    try:
        doc = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise MetadataError(f"malformed array description from a writer: {e}") from e
    if not isinstance(doc, dict):
        raise MetadataError("malformed array description from a writer")
    return {check_array_path(p): parse_array(p, a, listed=False) for p, a in doc.items()}
