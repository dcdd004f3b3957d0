"""Import a ``torch.distributed.checkpoint`` directory (``FileSystemWriter`` layout) as a ckptd checkpoint.

A DCP directory holds ``.metadata`` (a pickle, read with the restricted unpickler of
``dcp_metadata``) and ``__<rank>_<n>.distcp`` files in which every saved chunk is a
``torch.save`` record. Each tensor becomes one array of its canonical global shape; DCP's
chunks become the writer boxes of that array, so the storage plan matches the layout the
job was saved in (FSDP2 row blocks stay separate shards) and nothing is re-cut.

Memory stays bounded: chunks are loaded one at a time (``torch.load(weights_only=True)``,
which refuses arbitrary objects) and written before more than ``memory_bytes`` are held.
Non-tensor items are kept only when they are JSON-able values.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ckptd.converters.dcp_metadata import check_storage_info, planner_paths, read_metadata
from ckptd.converters.dcp_tree import KeyPath, array_paths, nest
from ckptd.format.boxes import ShardBox
from ckptd.format.errors import IntegrityError, LayoutError, MetadataError, StorageError
from ckptd.format.manifest import Manifest
from ckptd.format.run import Run
from ckptd.format.tree import flatten
from ckptd.format.writer import CheckpointWriter, WriterReport

from ckptd.storage import open_store

DEFAULT_MEMORY_BYTES = 512 * 2**20


def import_dcp(
    src: str | Path,
    uri: str,
    *,
    step: int,
    overwrite: bool = False,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save the DCP checkpoint in directory ``src`` as checkpoint ``step`` of run ``uri``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    src = Path(src)
    md = read_metadata(src)
    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    # MetadataIndex hashes by (fqn, offset); index the records by that key ourselves.
    records: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for idx, info in storage.items():
        off = None if idx.offset is None else tuple(int(o) for o in idx.offset)
        records[(str(idx.fqn), off)] = info
    paths = planner_paths(md)
    tensor_fqns = {
        fqn: paths[fqn] for fqn, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)
    }
    names = array_paths(tensor_fqns)

    run = Run(open_store(uri, storage_options))
    store = run.prepare(step, overwrite=overwrite)
    reports: list[WriterReport] = []
    writer, held = CheckpointWriter(store), 0
    leaves: list[tuple[KeyPath, Any]] = []
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            leaves.append((paths[fqn], _value(src, fqn, records.get((fqn, None)))))
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise MetadataError(f"DCP item {fqn!r} has unknown storage metadata {type(meta).__name__}")
        shape = tuple(int(s) for s in meta.size)
        dtype = meta.properties.dtype
        boxes = [_box(fqn, c, shape) for c in meta.chunks]
        placeholder = torch.empty(shape, dtype=dtype, device="meta")
        leaves.append((paths[fqn], placeholder))
        for chunk, box in zip(meta.chunks, boxes, strict=True):
            if box.is_empty():
                continue
            info = records.get((fqn, tuple(int(o) for o in chunk.offsets)))
            data = _tensor(src, fqn, info)
            if tuple(data.shape) != box.shape or data.dtype != dtype:
                raise IntegrityError(
                    f"DCP item {fqn!r} chunk at {list(box.offset)}: stored {data.dtype} {list(data.shape)}, "
                    f"metadata says {dtype} {list(box.shape)}"
                )
            writer.add(names[fqn], data, shape=shape, box=box, boxes=boxes)
            held += data.numel() * data.element_size()
            if held >= memory_bytes:  # write what is held before loading more
                reports.append(writer.finish())
                writer, held = CheckpointWriter(store), 0
    reports.append(writer.finish())
    skeleton, _ = flatten(nest(leaves))
    return run.commit(
        step,
        reports,
        state=skeleton,
        metadata={"imported_from": str(src), "source_format": "torch.distributed.checkpoint"},
    )


def _box(fqn: str, chunk: Any, shape: tuple[int, ...]) -> ShardBox:
    offsets = tuple(int(o) for o in chunk.offsets)
    sizes = tuple(int(s) for s in chunk.sizes)
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise MetadataError(f"DCP item {fqn!r} has a chunk of the wrong rank for shape {list(shape)}")
    box = ShardBox(offsets, sizes)
    if not box.fits_in(shape):
        raise LayoutError(f"DCP item {fqn!r}: chunk {box.to_json()} lies outside shape {list(shape)}")
    return box


def _record(src: Path, fqn: str, info: Any) -> bytes:
    if info is None:
        raise MetadataError(f"DCP item {fqn!r} has no storage record in {src}/.metadata")
    rel, offset, length = check_storage_info(fqn, info)
    path = src / rel
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
    except FileNotFoundError:
        raise IntegrityError(f"DCP item {fqn!r}: data file {path} is missing") from None
    except OSError as e:
        raise StorageError(f"DCP item {fqn!r}: reading {path} failed: {e}", key=str(path)) from e
    if len(raw) != length:
        raise IntegrityError(f"DCP item {fqn!r}: {path} is truncated ({len(raw)} of {length} bytes)")
    return raw


def _load(src: Path, fqn: str, info: Any) -> Any:
    raw = _record(src, fqn, info)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals and garbled records
        raise IntegrityError(f"DCP item {fqn!r} is not a plain tensor or value record: {e}") from e


def _tensor(src: Path, fqn: str, info: Any) -> torch.Tensor:
    value = _load(src, fqn, info)
    if not isinstance(value, torch.Tensor):
        raise IntegrityError(f"DCP item {fqn!r} should hold a tensor, holds {type(value).__name__}")
    return value.contiguous()


def _value(src: Path, fqn: str, info: Any) -> Any:
    value = _load(src, fqn, info)
    if not _json_like(value):
        raise MetadataError(
            f"DCP item {fqn!r} holds a {type(value).__name__}, not a JSON-able value; ckptd imports "
            "tensors and JSON-able values only"
        )
    return value


def _json_like(value: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if value is None or isinstance(value, bool | int | float | str | torch.dtype):
        return True
    if isinstance(value, list | tuple):
        return all(_json_like(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str | int) and _json_like(v, depth + 1) for k, v in value.items())
    return False
