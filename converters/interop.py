"""Import from and export to other checkpoint formats: ``torch.save`` files and safetensors.

Exports materialise the whole state in host memory (these formats have no partial
writes); use resharding (``reshard``) for bounded-memory work. Imports of ``torch.save``
files use ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects —
importing never runs code from the file. DCP is not imported: its metadata is a pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from ckptd.format.errors import CheckpointError, MetadataError
from ckptd.format.manifest import Manifest

from ckptd.checkpoint_io import load, save

ExportFormat = Literal["torch", "safetensors"]


def export_checkpoint(
    uri: str,
    out: str | Path,
    *,
    fmt: ExportFormat = "torch",
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write checkpoint ``step`` (default: latest) of run ``uri`` to ``out``; returns the step.

    ``torch``: the nested state (tensors and JSON values) as one ``torch.save`` file.
    ``safetensors``: every tensor under its array path (``model/wte.weight``); non-tensor
    values go to the file's string metadata as JSON.
    """
    state: dict[str, Any] = {}
    step = load(state, uri, step=step, storage_options=storage_options)
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
        raise CheckpointError(f"unknown export format {fmt!r} (torch or safetensors)")
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
    """Save the contents of a ``torch.save`` or safetensors file as checkpoint ``step`` of ``uri``."""
    src = Path(src)
    fmt = fmt or ("safetensors" if src.suffix == ".safetensors" else "torch")
    state: dict[str, Any]
    if fmt == "torch":
        try:
            loaded = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refusals are pickle.UnpicklingError; say what happened
            raise MetadataError(
                f"{src} is not a plain tensor checkpoint (weights_only load refused: {e})"
            ) from e
        state = loaded if isinstance(loaded, dict) else {"value": loaded}
    elif fmt == "safetensors":
        from safetensors.torch import load_file

        state = {}
        for key, t in load_file(str(src)).items():
            node = state
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = t
    else:
        raise CheckpointError(f"unknown import format {fmt!r} (torch or safetensors)")
    return save(
        state,
        uri,
        step=step,
        overwrite=overwrite,
        storage_options=storage_options,
        metadata={"imported_from": str(src)},
    )


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
