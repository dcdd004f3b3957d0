"""Hugging Face sharded safetensors: export a checkpoint's weights, import a directory or one file.

Export writes ``model-0000k-of-0000n.safetensors`` files and ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``), the layout
``transformers`` loads. Names are the tensors' dotted key paths in the checkpoint's state
(``model.layers.0.weight``); ``select`` keeps those under a prefix and strips it, so
``select="model."`` turns ``{"model": model.state_dict()}`` back into the model's own names.

Both directions stream: export writes each file's safetensors header first (shapes and
dtypes come from the manifest), then reads and appends one tensor at a time; import maps
each file and hands tensors to the writer one at a time, flushing before ``memory_bytes``
are held. Memory is bounded by the largest tensor, not the model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ckptd.converters.dcp_tree import dcp_leaves, fqn_of
from ckptd.converters.outputs import attempt_discarded_on_failure, drain
from ckptd.format.dtypes import tensor_to_numpy
from ckptd.format.errors import (
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    MetadataError,
    StorageError,
)
from ckptd.format.manifest import Manifest
from ckptd.format.run import Run
from ckptd.format.tree import TAG, flatten
from ckptd.format.writer import CheckpointWriter, WriterReport
from ckptd.storage import open_store

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_MEMORY_BYTES = 512 * 2**20
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.bool: "BOOL",
}  # fmt: skip
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise MetadataError(f"bad size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def export_hf(
    uri: str,
    out: str | Path,
    *,
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    select: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[int, int]:
    """Write the weights of checkpoint ``step`` (default: latest) as sharded safetensors.

    Returns ``(step, number of files)``.
    """
    run = Run(open_store(uri, storage_options))
    if step is None:
        step = run.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {uri}")
    reader = run.reader(step)
    weights: list[tuple[str, str]] = []  # (hf name, array path)
    for path, node in dcp_leaves(reader.manifest.state):
        name = fqn_of(path)
        if not (isinstance(node, dict) and node.get(TAG) in ("tensor", "alias")):
            continue
        if select:
            if not name.startswith(select) or name == select:
                continue
            name = name[len(select) :]
        weights.append((name, str(node["path"])))
    if not weights:
        raise CheckpointNotFoundError(
            f"step {step} of {uri} has no tensors" + (f" under {select!r}" if select else "")
        )
    shards = _plan_shards(reader.manifest, weights, max_shard_bytes)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create {out}: {e}", url=str(out)) from e
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += _write_file(out / fname, reader, shard, {"format": "pt", "ckptd.step": str(step)})
        weight_map.update({name: fname for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = out / f"{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX_FILE)  # the index appears last: a crash leaves no half export
    return step, len(shards)


def _plan_shards(m: Manifest, weights: list[tuple[str, str]], limit: int) -> list[list[tuple[str, str]]]:
    """Greedy in state order; a tensor larger than ``limit`` gets a file of its own."""
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for name, path in weights:
        a = m.arrays[path]
        if a.dtype.torch_dtype not in _ST_DTYPES:
            raise ConfigError(f"{path}: safetensors cannot hold {a.dtype.name} tensors")
        n = a.nbytes
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, path))
        size += n
    return shards


def _write_file(dest: Path, reader: Any, shard: list[tuple[str, str]], meta: dict[str, str]) -> int:
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, path in shard:
        a = reader.array(path)
        header[name] = {
            "dtype": _ST_DTYPES[a.dtype.torch_dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(dest, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, path in shard:
            tensor = reader.read(path)
            f.write(tensor_to_numpy(tensor).reshape(-1).view("uint8").data)
            del tensor
        f.flush()
        os.fsync(f.fileno())
    return offset


def import_safetensors(
    src: str | Path,
    uri: str,
    *,
    step: int,
    overwrite: bool = False,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save a sharded directory (``model.safetensors.index.json``) or one ``.safetensors`` file.

    Names containing ``/`` (ckptd's own single-file export) are nested along it; dotted
    Hugging Face names stay flat keys, so ``ckptd.load(model.state_dict(), uri)`` fills a model.
    """
    src = Path(src)
    files = _files_of(src)
    run = Run(open_store(uri, storage_options))
    store = run.prepare(step, overwrite=overwrite)
    with attempt_discarded_on_failure(run, step):
        reports: list[WriterReport] = []
        writer, held = CheckpointWriter(store), 0
        state: dict[str, Any] = {}
        try:
            for file, names in files.items():
                for name, tensor in _tensors(file, names):
                    _place(state, name, tensor)
                    writer.add(_array_path(name), tensor)
                    held += tensor.numel() * tensor.element_size()
                    if held >= memory_bytes:
                        reports.append(writer.finish())
                        writer, held = CheckpointWriter(store), 0
        except BaseException:
            drain(writer)
            raise
        reports.append(writer.finish())
        skeleton, _ = flatten(state)
        return run.commit(step, reports, state=skeleton, metadata={"imported_from": str(src)})


def _place(state: dict[str, Any], name: str, tensor: torch.Tensor) -> None:
    """A placeholder for ``name`` in the nested state: names nest along ``/``, so ``a`` and ``a/b``
    cannot both be tensors."""
    node = state
    *parents, leaf = name.split("/")
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise MetadataError(f"safetensors names {'/'.join(parents[: i + 1])!r} and {name!r} collide: "
                                "one would be a tensor and a group of tensors at once")
    if leaf in node:
        raise MetadataError(f"safetensors name {name!r} is both a tensor and a prefix of other names")
    node[leaf] = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")


def _array_path(name: str) -> str:
    """The array path ``ckptd.save`` gives the tensor at this (``/``-nested) name."""
    placeholder = torch.empty(0, device="meta")
    node: dict[str, Any] = {}
    root = node
    *parents, leaf = name.split("/")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = placeholder
    _, tensors = flatten(root)
    return next(iter(tensors))


def _files_of(src: Path) -> dict[Path, list[str] | None]:
    """file -> the names the index assigns it (None: whatever a single file holds)."""
    if src.is_file():
        return {src: None}
    index_path = src / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{src} has no {INDEX_FILE}") from None
    except (OSError, ValueError) as e:
        raise MetadataError(f"{index_path} is not a readable index: {e}") from e
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise MetadataError(f"{index_path} has no valid weight_map")
    files: dict[Path, list[str] | None] = {}
    for name, fname in wm.items():
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise MetadataError(f"{index_path} names an unsafe shard file {fname!r}")
        names = files.setdefault(src / fname, [])
        assert names is not None
        names.append(name)
    return files


def _tensors(file: Path, names: list[str] | None) -> Any:
    from safetensors import SafetensorError, safe_open

    if not file.exists():
        raise IntegrityError(f"safetensors shard {file} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            wanted = names if names is not None else sorted(keys)
            missing = [n for n in wanted if n not in keys]
            if missing:
                raise IntegrityError(
                    f"{file} lacks {len(missing)} weights the index lists, e.g. {missing[0]!r}"
                )
            for name in wanted:
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise IntegrityError(f"safetensors shard {file} is unreadable: {e}") from e
