"""Import a ``torch.distributed.checkpoint`` directory (``FileSystemWriter`` layout) as a ckptd checkpoint.

A DCP directory holds ``.metadata`` (a pickle, read with the restricted unpickler of
``dcp_metadata``) and ``__<rank>_<n>.distcp`` files in which every saved chunk is a
``torch.save`` record. Each tensor becomes one array of its canonical global shape; DCP's
chunks become the writer boxes of that array, so the storage plan matches the layout the
job was saved in (FSDP2 row blocks stay separate shards) and nothing is re-cut.

Memory stays bounded: chunks are loaded one at a time (``torch.load(weights_only=True)``,
which refuses arbitrary objects) and written before more than ``memory_bytes`` are held.
Non-tensor items are kept only when they are JSON-able values.

With ``mesh`` the checkpoint is instead cut for that mesh (``dcp_mesh``: what a mesh means for
arrays that record no layout, and how the cut stays atomic and memory-bounded).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptd.converters.dcp_metadata import check_storage_info, planner_paths, read_metadata
from ckptd.converters.dcp_tree import KeyPath, array_paths, nest
from ckptd.converters.outputs import attempt_discarded_on_failure, drain
from ckptd.format.boxes import ShardBox
from ckptd.format.errors import IntegrityError, LayoutError, MetadataError, StorageError
from ckptd.format.manifest import Manifest
from ckptd.format.run import Run
from ckptd.format.store import Store
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
    mesh: Mapping[str, int] | None = None,
    scratch_dir: str | Path | None = None,
) -> Manifest:
    """Save the DCP checkpoint in directory ``src`` as checkpoint ``step`` of run ``uri``.

    Without ``mesh``, DCP's chunks become the writer boxes. With ``mesh`` (e.g. ``{"dp": 4}``) the
    checkpoint is laid out for that mesh so each of its ranks reads one shard per tensor: arrays
    whose dim 0 has at least as many rows as the mesh has ranks are cut into row blocks along
    dim 0 by every axis in the given order (``Shard(0)`` on each mesh dimension, ceil division as
    in ``torch.chunk``); 0-dim arrays and shorter ones are stored whole, replicated over the mesh.
    That pass stages a plain import in ``scratch_dir`` (default: the system temporary directory),
    which is always deleted; see ``ckptd.converters.dcp_mesh``.
    """
    if mesh is not None:
        from ckptd.converters.dcp_mesh import import_dcp_for_mesh

        return import_dcp_for_mesh(src, uri, step=step, mesh=mesh, overwrite=overwrite,
                                   memory_bytes=memory_bytes, storage_options=storage_options,
                                   scratch_dir=scratch_dir)
    src = Path(src)
    source = _DcpSource(src)
    run = Run(open_store(uri, storage_options))
    store = run.prepare(step, overwrite=overwrite)
    with attempt_discarded_on_failure(run, step):
        reports, leaves = source.write(store, memory_bytes)
        skeleton, _ = flatten(nest(leaves))
        return run.commit(
            step,
            reports,
            state=skeleton,
            metadata={"imported_from": str(src), "source_format": "torch.distributed.checkpoint"},
        )


class _DcpSource:
    """A DCP directory's metadata, indexed: storage records by (fqn, chunk offset), key paths, names."""

    def __init__(self, src: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.src = src
        self.md = read_metadata(src)
        storage = self.md.storage_data if isinstance(self.md.storage_data, dict) else {}
        # MetadataIndex hashes by (fqn, offset); index the records by that key ourselves.
        self.records: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for idx, info in storage.items():
            off = None if idx.offset is None else tuple(int(o) for o in idx.offset)
            self.records[(str(idx.fqn), off)] = info
        self.paths = planner_paths(self.md)
        tensor_fqns = {fqn: self.paths[fqn] for fqn, m in self.md.state_dict_metadata.items()
                       if isinstance(m, TensorStorageMetadata)}
        self.names = array_paths(tensor_fqns)

    def write(self, store: Store, memory_bytes: int) -> tuple[list[WriterReport], list[tuple[KeyPath, Any]]]:
        """Write every tensor chunk; returns the writer reports and the state's leaves (tensors as
        ``meta`` placeholders, values as themselves)."""
        out = _Output(store, memory_bytes)
        try:
            for fqn, meta in self.md.state_dict_metadata.items():
                self._item(fqn, meta, out)
        except BaseException:
            drain(out.writer)
            raise
        out.reports.append(out.writer.finish())
        return out.reports, out.leaves

    def _item(self, fqn: str, meta: Any, out: _Output) -> None:
        """One DCP item: a value leaf, or a tensor whose chunks are loaded one at a time and written."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        if isinstance(meta, BytesStorageMetadata):
            out.leaves.append((self.paths[fqn], _value(self.src, fqn, self.records.get((fqn, None)))))
            return
        if not isinstance(meta, TensorStorageMetadata):
            raise MetadataError(f"DCP item {fqn!r} has unknown storage metadata {type(meta).__name__}")
        shape = tuple(int(s) for s in meta.size)
        out.leaves.append((self.paths[fqn], torch.empty(shape, dtype=meta.properties.dtype, device="meta")))
        boxes = [_box(fqn, c, shape) for c in meta.chunks]
        for chunk, box in zip(meta.chunks, boxes, strict=True):
            if not box.is_empty():
                data = self._chunk(fqn, chunk, box, meta.properties.dtype)
                out.add(self.names[fqn], data, shape=shape, box=box, boxes=boxes)

    def _chunk(self, fqn: str, chunk: Any, box: ShardBox, dtype: torch.dtype) -> torch.Tensor:
        info = self.records.get((fqn, tuple(int(o) for o in chunk.offsets)))
        data = _tensor(self.src, fqn, info)
        if tuple(data.shape) != box.shape or data.dtype != dtype:
            raise IntegrityError(
                f"DCP item {fqn!r} chunk at {list(box.offset)}: stored {data.dtype} {list(data.shape)}, "
                f"metadata says {dtype} {list(box.shape)}"
            )
        return data


class _Output:
    """The writer of an import, replaced by a fresh one whenever ``memory_bytes`` are held."""

    def __init__(self, store: Store, memory_bytes: int) -> None:
        self.store, self.memory_bytes = store, memory_bytes
        self.writer, self.held = CheckpointWriter(store), 0
        self.reports: list[WriterReport] = []
        self.leaves: list[tuple[KeyPath, Any]] = []

    def add(self, path: str, data: torch.Tensor, *, shape: tuple[int, ...], box: ShardBox,
            boxes: list[ShardBox]) -> None:
        self.writer.add(path, data, shape=shape, box=box, boxes=boxes)
        self.held += data.numel() * data.element_size()
        if self.held >= self.memory_bytes:  # write what is held before loading more
            self.reports.append(self.writer.finish())
            self.writer, self.held = CheckpointWriter(self.store), 0


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
