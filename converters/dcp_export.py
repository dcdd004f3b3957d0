"""Export a ckptd checkpoint as a ``torch.distributed.checkpoint`` directory.

The output has ``FileSystemWriter``'s layout: ``__0_0.distcp`` holding one ``torch.save``
record per tensor (and per non-tensor value), and ``.metadata``, DCP's pickled
``Metadata`` naming each record's file, offset and length. Each tensor is stored as one
whole chunk; ``torch.distributed.checkpoint.load`` reshards on read, so any number of
ranks in any layout can load it.

Memory stays bounded by the largest tensor: tensors are read and written one at a time.
Names follow DCP's flattening of the restored nested state (``model.layers.0.weight``),
so ``dcp.load({"model": model.state_dict()}, ...)`` finds every key.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ckptd.converters.dcp_metadata import METADATA_FILE
from ckptd.converters.dcp_tree import dcp_leaves, fqn_of
from ckptd.format.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    MetadataError,
    StorageError,
)
from ckptd.format.reader import CheckpointReader
from ckptd.format.run import Run
from ckptd.format.tree import TAG, restore
from ckptd.storage import open_store

DATA_FILE = "__0_0.distcp"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION


def export_dcp(
    uri: str,
    out: str | Path,
    *,
    step: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write checkpoint ``step`` (default: latest) of ``uri`` as DCP directory ``out``; returns the step."""
    from torch.distributed.checkpoint.metadata import Metadata

    run = Run(open_store(uri, storage_options))
    if step is None:
        step = run.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {uri}")
    reader = run.reader(step)
    out = Path(out)
    if (out / METADATA_FILE).exists() and not overwrite:
        raise CheckpointExistsError(f"{out} already holds a DCP checkpoint (use --overwrite)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create {out}: {e}", url=str(out)) from e
    index = _DcpIndex()
    with open(out / DATA_FILE, "wb") as f:
        for path, node in dcp_leaves(reader.manifest.state):
            index.add(f, path, node, reader, step)
        f.flush()
        os.fsync(f.fileno())
    metadata = Metadata(state_dict_metadata=index.state_md, planner_data=index.planner_data,
                        storage_data=index.storage_md, version=DCP_VERSION)
    # The metadata file appears last and atomically: a crash leaves no loadable half-export.
    tmp = out / f"{METADATA_FILE}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / METADATA_FILE)
    return step


class _DcpIndex:
    """DCP's metadata of the records written so far: what each name is, and where its bytes lie."""

    def __init__(self) -> None:
        self.state_md: dict[str, Any] = {}
        self.storage_md: dict[Any, Any] = {}
        self.planner_data: dict[str, tuple[str | int, ...]] = {}

    def add(self, f: BinaryIO, path: tuple[str | int, ...], node: Any, reader: CheckpointReader,
            step: int) -> None:
        """Append the record of one leaf (a tensor, or a value as one object) to ``f``."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        fqn = fqn_of(path)
        if fqn in self.state_md:
            raise MetadataError(f"two entries of step {step} flatten to the same DCP name {fqn!r}")
        self.planner_data[fqn] = path
        offset = f.tell()
        if isinstance(node, dict) and node.get(TAG) in ("tensor", "alias"):
            tensor = reader.read(str(node["path"])).contiguous()
            torch.save(tensor, f)
            zeros = torch.Size([0] * tensor.dim())
            self.state_md[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=tensor.dtype),
                size=tensor.size(),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=tensor.size())],
            )
            index = MetadataIndex(fqn, zeros, 0)
            del tensor
        else:
            buf = io.BytesIO()
            torch.save(restore(None, node, _no_tensor), buf)
            f.write(buf.getbuffer())
            self.state_md[fqn] = BytesStorageMetadata()
            index = MetadataIndex(fqn)
        self.storage_md[index] = _StorageInfo(DATA_FILE, offset, f.tell() - offset)


def _no_tensor(path: str, dest: torch.Tensor | None) -> torch.Tensor:
    raise MetadataError(f"array {path} sits inside a value DCP stores as one object; cannot export it")
