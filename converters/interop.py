"""Import from and export to other checkpoint formats.

- ``torch``: one ``torch.save`` file. Export materialises the whole state in host memory;
  import uses ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects —
  importing never runs code from the file.
- ``safetensors``: one file, every tensor under its array path (export materialises the
  state; import streams, see ``hf``).
- ``hf``: Hugging Face sharded safetensors with ``model.safetensors.index.json`` (``hf``),
  streamed both ways.
- ``dcp``: a ``torch.distributed.checkpoint`` directory (``dcp_import``/``dcp_export``),
  streamed; its pickled ``.metadata`` is read with a restricted unpickler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ckptd.format.errors import CheckpointNotFoundError, ConfigError, MetadataError
from ckptd.format.manifest import Manifest
from ckptd.format.run import Run
from ckptd.format.tree import flatten
from ckptd.format.writer import CheckpointWriter
from ckptd.storage import open_store

ExportFormat = Literal["torch", "safetensors", "dcp", "hf"]


def export_checkpoint(
    uri: str,
    out: str | Path,
    *,
    fmt: ExportFormat = "torch",
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    select: str | None = None,
    overwrite: bool = False,
) -> int:
    """Write checkpoint ``step`` (default: latest) of run ``uri`` to ``out``; returns the step.

    ``torch``: the nested state (tensors and JSON values) as one ``torch.save`` file.
    ``safetensors``: every tensor under its array path (``model/wte.weight``); non-tensor
    values go to the file's string metadata as JSON.
    ``dcp``: a directory ``torch.distributed.checkpoint.load`` reads at any world size.
    ``hf``: a directory of sharded safetensors (weights under ``select``, see ``hf.export_hf``).
    """
    if fmt == "dcp":
        from ckptd.converters.dcp_export import export_dcp

        return export_dcp(uri, out, step=step, overwrite=overwrite, storage_options=storage_options)
    if fmt == "hf":
        from ckptd.converters.hf import DEFAULT_MAX_SHARD_BYTES, export_hf

        limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        return export_hf(
            uri, out, step=step, max_shard_bytes=limit, select=select, storage_options=storage_options
        )[0]
    state, step = _load_whole(uri, step=step, storage_options=storage_options)
    out = Path(out)
    if fmt == "torch":
        torch.save(state, out)
    elif fmt == "safetensors":
        import json

        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        _split(state, "", tensors, values)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out),
            metadata={"ckptd.step": str(step), "ckptd.values": json.dumps(values, default=str)},
        )
    else:
        raise ConfigError(f"unknown export format {fmt!r} (torch, safetensors, dcp or hf)")
    return step


def import_checkpoint(
    src: str | Path,
    uri: str,
    *,
    step: int,
    fmt: ExportFormat | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Save a ``torch.save`` or safetensors file, or a DCP or sharded safetensors directory, as ``step``."""
    src = Path(src)
    fmt = fmt or detect_format(src)
    if fmt == "dcp":
        from ckptd.converters.dcp_import import import_dcp

        return import_dcp(src, uri, step=step, overwrite=overwrite, storage_options=storage_options)
    if fmt in ("hf", "safetensors"):
        from ckptd.converters.hf import import_safetensors

        return import_safetensors(src, uri, step=step, overwrite=overwrite, storage_options=storage_options)
    state: dict[str, Any]
    if fmt == "torch":
        try:
            loaded = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refusals are pickle.UnpicklingError; say what happened
            raise MetadataError(
                f"{src} is not a plain tensor checkpoint (weights_only load refused: {e})"
            ) from e
        state = loaded if isinstance(loaded, dict) else {"value": loaded}
    else:
        raise ConfigError(f"unknown import format {fmt!r} (torch, safetensors, hf or dcp)")
    return _save_whole(state, uri, step=step, overwrite=overwrite, storage_options=storage_options,
                       metadata={"imported_from": str(src)})


# A converter reads and writes whole single-process states, so it builds on the format and the
# storage directly, not on ckptd.save/load (whose DTensor and engine paths are layers above).
def _load_whole(
    uri: str, *, step: int | None, storage_options: dict[str, Any] | None
) -> tuple[dict[str, Any], int]:
    """The nested state of checkpoint ``step`` (default: the latest) and its step."""
    run = Run(open_store(uri, storage_options))
    if step is None:
        step = run.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {uri}")
    state: dict[str, Any] = {}
    run.reader(step).restore(state)
    return state, step


def _save_whole(
    state: dict[str, Any],
    uri: str,
    *,
    step: int,
    overwrite: bool,
    storage_options: dict[str, Any] | None,
    metadata: dict[str, Any],
) -> Manifest:
    """Commit ``state`` (tensors and JSON values) as checkpoint ``step`` of run ``uri``."""
    run = Run(open_store(uri, storage_options))
    skeleton, tensors = flatten(state)
    ckpt_store = run.prepare(step, overwrite=overwrite)
    try:
        writer = CheckpointWriter(ckpt_store)
        for path, tensor in tensors.items():
            writer.add(path, tensor)
        return run.commit(step, [writer.finish()], state=skeleton, metadata=metadata)
    finally:
        run.abandon(step)  # a failed attempt stays for gc; a committed one needs no lease


def detect_format(src: Path) -> ExportFormat:
    """What ``src`` is: a DCP directory, a sharded safetensors directory, or a file by suffix."""
    if src.is_dir():
        if (src / ".metadata").exists():
            return "dcp"
        if (src / "model.safetensors.index.json").exists():
            return "hf"
        raise CheckpointNotFoundError(
            f"{src} is neither a DCP checkpoint (.metadata) nor sharded safetensors "
            "(model.safetensors.index.json)"
        )
    if not src.exists():
        raise CheckpointNotFoundError(f"{src} does not exist")
    return "safetensors" if src.suffix == ".safetensors" else "torch"


def _split(node: Any, prefix: str, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    if isinstance(node, torch.Tensor):
        tensors[prefix] = node
    elif isinstance(node, dict):
        for k, v in node.items():
            _split(v, f"{prefix}/{k}" if prefix else str(k), tensors, values)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            _split(v, f"{prefix}/{i}" if prefix else str(i), tensors, values)
    else:
        values[prefix] = node
