"""State trees holding DTensors, seen as local tensors plus ``ShardSpec``s.

``LocalState(state)`` is the view of a state that the rest of ckptd works on: every DTensor
is replaced by its local shard (same memory, so a restore into the view fills the DTensor in
place) and ``specs()`` gives each one's ``ShardSpec`` by array path. Nothing else changes:
objects with ``state_dict()`` are asked for it once and stand in the view as a proxy whose
``load_state_dict`` hands the owner its DTensors back; containers are copied only where they
hold a DTensor or such an object, and ``write_back()`` returns what a restore put into a copy
(a step counter, an optimizer's ``param_groups``) to the caller's own containers.

``TrainState(model, optimizer)`` is the usual way to put an FSDP2 / tensor-parallel model and
its optimizer in a state: ``torch.distributed.checkpoint.state_dict``'s ``get_state_dict``
(parameter names as keys, DTensors, optimizer state created before the first step, so a
restore has tensors to fill) and ``set_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ckptd.engine.config import ShardSpec
from ckptd.engine.coordination import Coordinator, DistributedCoordinator, Gathered, LocalCoordinator
from ckptd.engine.dtensor import is_dtensor, local_tensor, shard_spec
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import MetadataError
from ckptd.format.manifest import Manifest
from ckptd.format.reader import CheckpointReader
from ckptd.format.run import Run
from ckptd.format.tree import MAX_DEPTH, Stateful, flatten
from ckptd.format.tree import restore as restore_tree
from ckptd.format.writer import CheckpointWriter, WriterReport


class _StatefulView:
    """Stands for an object with ``state_dict()`` in a ``LocalState`` view."""

    def __init__(self, target: Any, owner: LocalState, state: Any) -> None:
        self.target, self.owner, self.state = target, owner, state

    def state_dict(self) -> Any:
        return self.state  # taken once: the restore fills exactly these tensors

    def load_state_dict(self, state_dict: Any, /) -> Any:
        return self.target.load_state_dict(self.owner.with_dtensors(state_dict))


class LocalState:
    """``state`` with every DTensor replaced by its local shard (see the module docstring)."""

    def __init__(self, state: Any) -> None:
        self._dtensors: dict[int, torch.Tensor] = {}  # id(local shard) -> its DTensor
        self._locals: list[torch.Tensor] = []  # keeps the ids above valid
        self._copies: dict[int, tuple[Any, Any]] = {}  # id(copy) -> (caller's container, copy)
        self.view = self._view(state, 0)

    @property
    def has_dtensors(self) -> bool:
        return bool(self._dtensors)

    def _view(self, value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise MetadataError(f"state is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, torch.Tensor):
            if not is_dtensor(value):
                return value
            local = local_tensor(value)
            self._dtensors[id(local)] = value
            self._locals.append(local)
            return local
        if isinstance(value, Stateful) and not isinstance(value, Mapping):
            return _StatefulView(value, self, self._view(value.state_dict(), depth + 1))
        if isinstance(value, Mapping):
            items = {k: self._view(v, depth + 1) for k, v in value.items()}
            if all(items[k] is v for k, v in value.items()):
                return value
            copy = dict(items)
            self._copies[id(copy)] = (value, copy)
            return copy
        if isinstance(value, list | tuple):
            seq = [self._view(v, depth + 1) for v in value]
            if all(a is b for a, b in zip(seq, value, strict=True)):
                return value
            if isinstance(value, tuple):
                return tuple(seq)
            self._copies[id(seq)] = (value, seq)
            return seq
        return value

    def flatten(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, ShardSpec]]:
        """``format.tree.flatten`` of the view, plus the DTensors' specs by array path."""
        skeleton, tensors = flatten(self.view)
        return skeleton, tensors, self._specs_of(tensors)

    def specs(self) -> dict[str, ShardSpec]:
        """The ``ShardSpec`` of every DTensor, by the array path the state gives it."""
        return self._specs_of(flatten(self.view)[1])

    def _specs_of(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, ShardSpec]:
        mine = self._dtensors
        return {path: shard_spec(mine[id(t)]) for path, t in tensors.items() if id(t) in mine}

    def with_dtensors(self, value: Any) -> Any:
        """A tree of the view (after a restore) with the DTensors in place of their shards."""
        if isinstance(value, torch.Tensor):
            return self._dtensors.get(id(value), value)
        if isinstance(value, Mapping):
            return {k: self.with_dtensors(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.with_dtensors(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.with_dtensors(v) for v in value)
        return value

    def write_back(self) -> None:
        """After a restore into the view: give the caller's containers what landed in the copies."""
        for original, copy in self._copies.values():
            keys = copy.keys() if isinstance(copy, dict) else range(len(copy))
            for k in keys:
                v = copy[k]
                if id(v) in self._copies or id(v) in self._dtensors or isinstance(v, _StatefulView):
                    continue  # filled in place (a DTensor, a proxied object) or written back itself
                if isinstance(original, list) and k >= len(original):
                    original.append(v)
                else:
                    original[k] = v


class TrainState:
    """A model and its optimizer(s) as ``get_state_dict`` / ``set_state_dict`` see them.

    ``Checkpointer(uri, state={"train": TrainState(model, opt)}, optimizers=[opt])``: parameter
    names as keys (stable across meshes), DTensors under FSDP2 and tensor parallelism, plain
    tensors in one process. Pass the optimizers to the Checkpointer too, for lazy snapshots.
    """

    def __init__(self, model: torch.nn.Module,
                 optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> None:
        self.model = model
        self.optimizers = ([optimizers] if isinstance(optimizers, torch.optim.Optimizer)
                           else list(optimizers))

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizers)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state_dict: Any, /) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not isinstance(state_dict, dict) or not {"model", "optim"} <= state_dict.keys():
            raise MetadataError("a TrainState checkpoint holds 'model' and 'optim'")
        set_state_dict(self.model, self.optimizers, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def restore_boxes(reader: CheckpointReader, local: LocalState, *, threads: int = 8) -> None:
    """Load ``reader``'s checkpoint into the view: each DTensor reads only its own box.

    Reads run concurrently; every one has finished before any ``load_state_dict`` sees data.
    """
    specs = local.specs()
    pending: list[Future[torch.Tensor]] = []
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptd-read") as pool:

        def schedule(path: str, dest: torch.Tensor | None) -> torch.Tensor:
            spec = specs.get(path)
            if dest is None:
                a = reader.array(path)
                dest = torch.empty(a.shape, dtype=a.dtype.torch_dtype)
            pending.append(pool.submit(reader.read, path, spec.box if spec else None, dest))
            return dest

        def sync() -> None:
            try:
                for f in pending:
                    f.result()
            finally:
                pending.clear()

        try:
            restore_tree(local.view, reader.manifest.state, schedule, sync=sync)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    local.write_back()


def save_sharded(local: LocalState, run: Run, *, step: int, codec: CodecSpec | None, chunk_bytes: int,
                 metadata: Mapping[str, Any] | None, overwrite: bool, threads: int) -> Manifest:
    """``ckptd.save`` of a state holding DTensors: every rank writes the boxes it owns, rank 0
    commits once all of them are durable (``DistributedCoordinator.commit``, the engine's own
    protocol over the TCPStore). Every rank of the job must call it; plain tensors count as
    replicated (rank 0 writes them). For checkpoints inside a training loop use ``Checkpointer``:
    this builds (and tears down) a coordination group per call."""
    import torch.distributed as dist

    skeleton, tensors, specs = local.flatten()
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    coordinator: Coordinator = DistributedCoordinator() if multi else LocalCoordinator()
    rank = coordinator.rank
    mesh: dict[str, int] = {}
    for spec in specs.values():
        mesh.update(spec.mesh or {})

    attempt = coordinator.attempt_name(f"save/{step}")

    def write() -> WriterReport:
        writer = CheckpointWriter(run.attempt_store(step, attempt), rank=rank, codec=codec,
                                  chunk_bytes=chunk_bytes, threads=threads)
        for path, tensor in tensors.items():
            spec = specs.get(path)
            if spec is None:
                if rank == 0:
                    writer.add(path, tensor)
            elif spec.write:
                writer.add(path, tensor, shape=spec.shape, box=spec.box, layout=spec.layout, mesh=spec.mesh,
                           boxes=spec.boxes)
        return writer.finish()

    def finalize(gathered: Gathered) -> None:
        run.commit_planned(step, arrays=gathered.arrays, tally=gathered.tally, writers=gathered.writers,
                           state=skeleton, world_size=coordinator.world_size, mesh=mesh, metadata=metadata)

    def open_attempt() -> None:
        run.prepare(step, overwrite=overwrite, attempt=attempt)

    try:
        coordinator.commit(f"save/{step}", open_attempt=open_attempt, write=write, finalize=finalize)
    finally:
        run.abandon(step)
        coordinator.close()
    return run.manifest(step)
