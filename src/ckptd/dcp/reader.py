"""``ckptd.dcp.StorageReader``: DCP's ``StorageReader`` interface over a ckptd checkpoint.

``read_metadata`` presents each array as one DCP tensor with a single chunk covering its
global shape, named as DCP flattens the restored nested state. DCP's load planner then
asks each rank for exactly the region its (possibly sharded, possibly DTensor) destination
needs, and ``read_data`` reads that box with ckptd's reader, which fetches only the
overlapping shards. Any checkpoint works, whatever layout or tool wrote it.

Non-tensor values come from the manifest's JSON; DCP's planner receives them as
``torch.save`` bytes of those plain values, produced here — nothing read from storage is
ever unpickled.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint import storage as dcp_storage
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from ckptd.converters.dcp_tree import KeyPath, dcp_leaves, fqn_of
from ckptd.format.boxes import ShardBox
from ckptd.format.errors import CheckpointNotFoundError, MetadataError
from ckptd.format.reader import CheckpointReader
from ckptd.format.run import Run
from ckptd.format.tree import TAG, restore
from ckptd.storage import open_store


class StorageReader(dcp_storage.StorageReader):
    """Read checkpoint ``step`` (default: the latest) of the ckptd run ``uri`` through ``dcp.load``."""

    def __init__(
        self,
        uri: str,
        *,
        step: int | None = None,
        threads: int = 8,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.uri = uri
        self.step = step
        self.threads = threads
        self.storage_options = storage_options
        self._reader: CheckpointReader | None = None
        self._arrays: dict[str, str] = {}  # fqn -> array path
        self._values: dict[str, Any] = {}  # fqn -> decoded JSON value

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        # The source is (uri, step), fixed at construction (see StorageWriter.reset).
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP asks for per-rank metadata only when the global one is missing; ckptd has none.
            raise CheckpointNotFoundError(f"no per-rank DCP metadata in ckptd run {self.uri}")
        run = Run(open_store(self.uri, self.storage_options))
        step = self.step if self.step is not None else run.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {self.uri}")
        reader = run.reader(step, threads=self.threads)
        self._reader, self._arrays, self._values = reader, {}, {}
        state_md: dict[str, Any] = {}
        planner_data: dict[str, KeyPath] = {}
        for path, node in dcp_leaves(reader.manifest.state):
            fqn = fqn_of(path)
            if fqn in state_md:
                raise MetadataError(f"two entries of step {step} flatten to the same DCP name {fqn!r}")
            planner_data[fqn] = path
            if isinstance(node, dict) and node.get(TAG) in ("tensor", "alias"):
                a = reader.array(str(node.get("path")))
                size = torch.Size(a.shape)
                state_md[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=a.dtype.torch_dtype),
                    size=size,
                    chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)],
                )
                self._arrays[fqn] = a.path
            else:
                self._values[fqn] = restore(None, node, _no_tensor)
                state_md[fqn] = BytesStorageMetadata()
        return Metadata(state_dict_metadata=state_md, planner_data=planner_data, storage_data={})

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._reader is None:  # DCP read the metadata on another instance (pickled copy)
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        reader = self._reader
        assert reader is not None, "read_metadata runs before read_data"
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(self._values[fqn], buf)  # a plain JSON value, serialised here
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            box = ShardBox(tuple(int(o) for o in item.storage_offsets), tuple(int(n) for n in item.lengths))
            target = planner.resolve_tensor(item).detach()
            reader.read(self._arrays[fqn], box, out=target)
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked automatically: pass an instance as storage_reader=


def _no_tensor(path: str, dest: torch.Tensor | None) -> torch.Tensor:
    raise MetadataError(f"array {path} sits inside a value that DCP loads as one object")
