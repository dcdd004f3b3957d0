"""How ranks agree: on decisions at step boundaries, and on committing a checkpoint.

Two channels, neither of them the training process group (a collective issued from a
background thread on the training group interleaves with the training's own collectives
and deadlocks, or corrupts NCCL's stream order):

* ``agree_max`` / ``agree_min`` run on the main thread at step boundaries over a
  dedicated **gloo** group (time-based policies and signals arrive at different steps
  on different ranks; the whole job must save at the same step);
* the commit protocol runs on the flush threads over the **TCPStore** (key/value, order
  independent, so several tiers can commit concurrently). Waits poll ``check`` instead of
  blocking in ``wait``: a blocking wait holds the store client's lock and would stall
  another tier's thread of the same process.

Commit protocol for one checkpoint attempt ``key``: rank 0 prepares the directory and
publishes ``prepared``; every rank writes its boxes, makes them durable and publishes its
report (or its error); rank 0 merges, writes the manifest last and publishes ``done``.
A rank's failure reaches every rank as a ``CheckpointError``; nothing is committed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch

from ckptd.format.errors import CheckpointError
from ckptd.format.writer import WriterReport, report_from_json, report_to_json

Prepare = Callable[[], None]
Write = Callable[[], WriterReport]
Finalize = Callable[[list[WriterReport], dict[int, Any]], None]


class Coordinator(Protocol):
    rank: int
    world_size: int

    def agree_max(self, value: int) -> int: ...

    def agree_min(self, value: int) -> int: ...

    def agree_max_all(self, values: list[int]) -> list[int]: ...

    def commit(self, key: str, *, prepare: Prepare, write: Write, finalize: Finalize, extra: Any) -> None: ...

    def close(self) -> None: ...


class LocalCoordinator:
    """One process: nothing to agree on."""

    rank = 0
    world_size = 1

    def agree_max(self, value: int) -> int:
        return value

    def agree_min(self, value: int) -> int:
        return value

    def agree_max_all(self, values: list[int]) -> list[int]:
        return list(values)

    def commit(self, key: str, *, prepare: Prepare, write: Write, finalize: Finalize, extra: Any) -> None:
        prepare()
        report = write()
        finalize([report], {0: extra})

    def close(self) -> None:
        pass


class DistributedCoordinator:
    """Agreement for a torch.distributed job (gloo or NCCL training group)."""

    def __init__(self, *, store: Any | None = None, timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise CheckpointError("DistributedCoordinator needs an initialised torch.distributed group")
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
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        prefix_store = getattr(dist, "PrefixStore")  # noqa: B009 - not in torch.distributed's __all__
        self.store = prefix_store(f"ckptd/{bytes(session.tolist()).hex()}/", base)

    # ---------------------------------------------------------------- main-thread agreement
    def _reduce(self, values: list[int], op: Any) -> list[int]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=op, group=self.group)
        return [int(v) for v in t.tolist()]

    def agree_max_all(self, values: list[int]) -> list[int]:
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.MAX)

    def agree_max(self, value: int) -> int:
        import torch.distributed as dist

        return self._reduce([value], dist.ReduceOp.MAX)[0]

    def agree_min(self, value: int) -> int:
        import torch.distributed as dist

        return self._reduce([value], dist.ReduceOp.MIN)[0]

    # ---------------------------------------------------------------- commit protocol
    def _wait(self, keys: list[str], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.001
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                raise CheckpointError(f"timed out after {self.timeout_s:.0f}s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _get(self, key: str) -> dict[str, Any]:
        doc = json.loads(self.store.get(key).decode())
        if not isinstance(doc, dict):
            raise CheckpointError(f"malformed coordination message at {key}")
        return doc

    def _set(self, key: str, doc: dict[str, Any]) -> None:
        self.store.set(key, json.dumps(doc))

    def commit(self, key: str, *, prepare: Prepare, write: Write, finalize: Finalize, extra: Any) -> None:
        try:
            self._commit(key, prepare=prepare, write=write, finalize=finalize, extra=extra)
        finally:
            # the last rank out removes the shared keys, so a long run does not grow the store
            if self.store.add(f"{key}/out", 1) == self.world_size:
                for k in ("prepared", "done", "out"):
                    self.store.delete_key(f"{key}/{k}")

    def _commit(self, key: str, *, prepare: Prepare, write: Write, finalize: Finalize, extra: Any) -> None:
        if self.rank == 0:
            try:
                prepare()
            except BaseException as e:
                self._set(f"{key}/prepared", {"error": f"rank 0: {e}"})
                raise
            self._set(f"{key}/prepared", {"ok": True})
        else:
            self._wait([f"{key}/prepared"], f"rank 0 to prepare {key}")
            doc = self._get(f"{key}/prepared")
            if "error" in doc:
                raise CheckpointError(f"checkpoint {key} failed on {doc['error']}")
        error: BaseException | None = None
        try:
            msg: dict[str, Any] = {"report": report_to_json(write()), "extra": extra}
        except BaseException as e:
            error = e
            msg = {"error": f"rank {self.rank}: {type(e).__name__}: {e}"}
        self._set(f"{key}/report/{self.rank}", msg)
        if self.rank == 0:
            self._finish_as_committer(key, finalize, error)
        else:
            self._wait([f"{key}/done"], f"rank 0 to commit {key}")
            if error is not None:
                raise error
            doc = self._get(f"{key}/done")
            if "error" in doc:
                raise CheckpointError(f"checkpoint {key} was not committed: {doc['error']}")

    def _finish_as_committer(self, key: str, finalize: Finalize, own_error: BaseException | None) -> None:
        keys = [f"{key}/report/{r}" for r in range(self.world_size)]
        try:
            self._wait(keys, f"every rank's shards of {key}")
            docs = [self._get(k) for k in keys]
            for k in keys:
                self.store.delete_key(k)
            errors = [d["error"] for d in docs if "error" in d]
            if errors:
                raise CheckpointError("; ".join(str(e) for e in errors))
            reports = [report_from_json(d["report"]) for d in docs]
            finalize(reports, {r: d.get("extra") for r, d in enumerate(docs)})
        except BaseException as e:
            self._set(f"{key}/done", {"error": str(e)})
            if own_error is not None:
                raise own_error from e
            raise
        self._set(f"{key}/done", {"ok": True})

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self.group)
