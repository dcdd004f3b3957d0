"""``ckptd.dcp.StorageWriter``: DCP's ``StorageWriter`` interface writing a ckptd checkpoint.

DCP drives every rank through the same calls; this maps them onto ckptd's commit protocol:

1. ``prepare_global_plan`` (coordinator) sees every rank's write items, so it learns all
   chunk boxes of every tensor — the writer boxes ckptd's storage plan needs so that each
   shard object has exactly one writer. It prepares the step directory and hands each
   rank its arrays (array path, global shape, all boxes) in the plan's ``storage_data``.
2. ``write_data`` (every rank) writes its chunks with a ``CheckpointWriter``, makes them
   durable, and returns the ``WriterReport`` (as JSON) inside its ``WriteResult``s.
3. ``finish`` (coordinator) merges the reports and commits the manifest, with the nested
   state rebuilt from DCP's flatten mapping. The checkpoint exists only once this returns.

Non-tensor items are kept as JSON values in the manifest; an item that is not JSON-able
(an arbitrary pickled object) is refused, because ckptd never unpickles on load.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import storage as dcp_storage
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.futures import Future

from ckptd.converters.dcp_tree import KeyPath, array_paths, nest
from ckptd.format.boxes import ShardBox
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import LayoutError, MetadataError
from ckptd.format.plan import DEFAULT_CHUNK_BYTES
from ckptd.format.run import Run
from ckptd.format.tree import flatten, restore
from ckptd.format.writer import CheckpointWriter, report_from_json, report_to_json
from ckptd.storage import open_store

Box = tuple[tuple[int, ...], tuple[int, ...]]


ATTEMPT_KEY = "__ckptd_attempt__"
"""Entry of every rank's plan storage_data naming the save attempt its shards go into (format v2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ArrayAssignment:
    """What one rank must know to write its chunks of one tensor."""

    path: str
    shape: tuple[int, ...]
    boxes: tuple[Box, ...]


class StorageWriter(dcp_storage.StorageWriter):
    """Write ``dcp.save`` / ``dcp.async_save`` output as checkpoint ``step`` of the ckptd run ``uri``."""

    def __init__(
        self,
        uri: str,
        *,
        step: int,
        overwrite: bool = False,
        codec: CodecSpec | str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        threads: int = 8,
        metadata: Mapping[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.uri = uri
        self.step = step
        self.overwrite = overwrite
        self.codec = CodecSpec.parse(codec) if isinstance(codec, str) else codec
        self.chunk_bytes = chunk_bytes
        self.threads = threads
        self.metadata = dict(metadata or {})
        self.storage_options = storage_options
        self.rank = 0
        self.is_coordinator = True

    def _run(self) -> Run:
        # One Run per writer: the coordinator's Run holds the open save attempt (and its lease)
        # from prepare_global_plan until finish commits it.
        run: Run | None = getattr(self, "_run_obj", None)
        if run is None:
            run = Run(open_store(self.uri, self.storage_options))
            self._run_obj = run
        return run

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        # The destination is (uri, step), fixed at construction; a checkpoint_id passed to
        # dcp.save alongside this writer (torchtitan passes a folder name) is not a location here.
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        self.rank = int(rank) if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        boxes: dict[str, list[Box]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for plan in plans:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                    continue
                fqn = item.index.fqn
                td = item.tensor_data
                shapes[fqn] = tuple(int(s) for s in td.size)
                boxes.setdefault(fqn, []).append(
                    (tuple(int(o) for o in td.chunk.offsets), tuple(int(s) for s in td.chunk.sizes))
                )
        mapping = _merged_paths(p.planner_data for p in plans)
        names = array_paths({fqn: mapping.get(fqn, (fqn,)) for fqn in boxes})
        assignments = {
            fqn: ArrayAssignment(names[fqn], shapes[fqn], tuple(sorted(b))) for fqn, b in boxes.items()
        }
        run = self._run()
        run.prepare(self.step, overwrite=self.overwrite)
        attempt = run.open_attempt(self.step)
        return [
            dataclasses.replace(
                plan,
                storage_data={
                    ATTEMPT_KEY: attempt,
                    **{i.index.fqn: assignments[i.index.fqn] for i in plan.items
                       if i.index.fqn in assignments},
                },
            )
            for plan in plans
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[dcp_storage.WriteResult]]:
        try:
            return self._write_data(plan, planner)
        except BaseException:
            # DCP calls no finish() after a failed write: the attempt this process opened would keep
            # its lease refreshed for the life of the process, and gc could never collect it.
            self._run().abandon(self.step)
            raise

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[dcp_storage.WriteResult]]:
        storage_data: dict[str, Any] = dict(plan.storage_data or {})
        attempt = storage_data.pop(ATTEMPT_KEY, None)
        if not isinstance(attempt, str):
            raise LayoutError("the DCP save plan carries no ckptd save attempt "
                              "(prepare_global_plan did not run)")
        self._attempt = attempt
        assignments: dict[str, ArrayAssignment] = storage_data
        writer = CheckpointWriter(
            self._run().attempt_store(self.step, attempt),
            rank=self.rank,
            codec=self.codec,
            chunk_bytes=self.chunk_bytes,
            threads=self.threads,
        )
        results: list[dcp_storage.WriteResult] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                node = _value_node(fqn, planner, item)
                results.append(dcp_storage.WriteResult(item.index, 0, {"value": node}))
                continue
            a = assignments.get(fqn)
            td = item.tensor_data
            if a is None or td is None:
                raise LayoutError(f"DCP item {fqn!r} was not in the global plan")
            data = planner.resolve_data(item)
            assert isinstance(data, torch.Tensor)
            # Keep the host copy alive until finish(): the writer encodes from its memory.
            tensor = data.detach().to("cpu").contiguous()
            box = ShardBox(tuple(int(o) for o in td.chunk.offsets), tuple(int(s) for s in td.chunk.sizes))
            writer.add(a.path, tensor, shape=a.shape, box=box, boxes=[ShardBox(o, s) for o, s in a.boxes])
            results.append(dcp_storage.WriteResult(item.index, tensor.numel() * tensor.element_size(), None))
        report = writer.finish()
        if results:
            first = results[0]
            data_doc = dict(first.storage_data or {})
            data_doc["report"] = report_to_json(report)
            results[0] = dataclasses.replace(first, storage_data=data_doc)
        fut: Future[list[dcp_storage.WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[dcp_storage.WriteResult]]) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reports = []
        values: dict[str, Any] = {}
        for rank_results in results:
            for wr in rank_results:
                doc = wr.storage_data
                if isinstance(doc, dict):
                    if "report" in doc:
                        reports.append(report_from_json(doc["report"]))
                    if "value" in doc:
                        values[wr.index.fqn] = doc["value"]
        mapping = _merged_paths([metadata.planner_data])
        leaves: list[tuple[KeyPath, Any]] = []
        for fqn, md in metadata.state_dict_metadata.items():
            path = mapping.get(fqn, (fqn,))
            if isinstance(md, TensorStorageMetadata):
                leaves.append((path, torch.empty(0, device="meta")))
            elif fqn in values:
                leaves.append((path, restore(None, values[fqn], _no_tensor)))
        skeleton, _ = flatten(nest(leaves))
        meta = {"written_by": "torch.distributed.checkpoint", **self.metadata}
        self._run().commit(self.step, reports, state=skeleton, world_size=len(results), metadata=meta,
                           attempt=self._run().open_attempt(self.step) or getattr(self, "_attempt", None))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked automatically: pass an instance as storage_writer=

    def storage_meta(self) -> Any:
        return None


def _merged_paths(planner_data: Any) -> dict[str, KeyPath]:
    """Union of the flatten mappings DCP's planner recorded (fqn -> key path in the nested state)."""
    out: dict[str, KeyPath] = {}
    for data in planner_data:
        if isinstance(data, dict):
            for fqn, path in data.items():
                if isinstance(path, tuple) and path:
                    out[str(fqn)] = path
    return out


def _value_node(fqn: str, planner: SavePlanner, item: Any) -> Any:
    """A non-tensor item as an encoded JSON value (the skeleton's vocabulary)."""
    flat = getattr(planner, "state_dict", None)
    if isinstance(flat, Mapping) and fqn in flat:
        value = flat[fqn]  # the object itself: no need to round-trip DCP's pickle
    else:
        buf = planner.resolve_data(item)
        assert isinstance(buf, io.BytesIO)
        try:
            value = torch.load(buf, weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects
            raise MetadataError(
                f"DCP item {fqn!r} is a pickled object ckptd cannot store as JSON: {e}"
            ) from e
    try:
        skeleton, tensors = flatten({"v": value})
    except MetadataError as e:
        raise MetadataError(
            f"DCP item {fqn!r} ({type(value).__name__}) is not JSON-able; ckptd stores tensors and "
            f"JSON-able values only, never pickles: {e}"
        ) from e
    if tensors:
        raise MetadataError(f"DCP item {fqn!r} hides tensors inside a non-tensor value")
    return skeleton["v"]


def _no_tensor(path: str, dest: torch.Tensor | None) -> torch.Tensor:
    raise MetadataError(f"a non-tensor DCP item refers to array {path}")
