"""Reading a ``torch.distributed.checkpoint`` (DCP) ``.metadata`` file without trusting it.

DCP's ``FileSystemWriter`` pickles its ``Metadata`` object. A plain ``pickle.load`` of a
file someone handed us runs whatever callable the file names (``os.system``, ``eval``,
``subprocess.Popen``...). So the file is read with a restricted unpickler whose
``find_class`` resolves only the names a real DCP metadata pickle references — found by
inspecting files that torch 2.x writes — and refuses everything else *before* anything
is called. The allowed names are data classes and value constructors: building them
runs no user-controlled code.

The file size is checked before unpickling so a hostile file cannot exhaust memory.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from ckptd.format.errors import MetadataError, UnsupportedFormatError

METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 512 * 2**20  # Megatron-scale models produce tens of MB; far below this

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# module -> names that module may contribute to the object graph.
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # TensorProperties pickles its layout as torch.serialization._get_layout("torch.strided"),
    # a lookup in a table of torch.layout values.
    "torch.serialization": frozenset({"_get_layout"}),
    # StorageMeta.checkpoint_id is often the pathlib.Path the user saved to.
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves DCP's metadata classes, ``torch.Size`` and ``torch.<dtype>``; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            if name == "Size":
                return torch.Size
            # DCP pickles dtypes as the attribute torch.float32. vars(), not getattr: torch's
            # module __getattr__ would import submodules for unknown names.
            value = vars(torch).get(name)
            if isinstance(value, torch.dtype):
                return value
        elif name in _ALLOWED.get(module, frozenset()):
            return super().find_class(module, name)
        raise MetadataError(
            f"DCP metadata refers to {module}.{name}, which a DCP checkpoint never contains; "
            "refusing to load it (the file may be hostile)"
        )


def read_metadata(directory: str | Path, *, max_bytes: int = MAX_METADATA_BYTES) -> Any:
    """The ``Metadata`` object of the DCP checkpoint in ``directory``, read safely."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / METADATA_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MetadataError(f"{directory} is not a DCP checkpoint: it has no {METADATA_FILE} file") from None
    if size > max_bytes:
        raise MetadataError(f"{path} is {size} bytes, more than the {max_bytes} a DCP metadata file may have")
    raw = path.read_bytes()
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except MetadataError:
        raise
    except Exception as e:  # truncated or garbled pickles raise many types
        raise MetadataError(f"{path} is not a readable DCP metadata file: {e}") from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise MetadataError(f"{path} does not hold DCP Metadata (got {type(md).__name__})")
    return md


def check_storage_info(fqn: str, info: Any) -> tuple[str, int, int]:
    """``(relative file, offset, length)`` of one stored item, validated."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    if not isinstance(info, _StorageInfo):
        raise UnsupportedFormatError(
            f"DCP item {fqn!r} was not written by FileSystemWriter (storage record {type(info).__name__})"
        )
    rel, offset, length = info.relative_path, info.offset, info.length
    if getattr(info, "transform_descriptors", None):
        raise UnsupportedFormatError(
            f"DCP item {fqn!r} uses storage transforms {list(info.transform_descriptors or ())}, "
            "which ckptd does not import"
        )
    if (
        not isinstance(rel, str)
        or not rel
        or "/" in rel
        or "\\" in rel
        or rel.startswith(".")
        or not isinstance(offset, int)
        or not isinstance(length, int)
        or offset < 0
        or length < 0
    ):
        raise MetadataError(f"DCP item {fqn!r} has a malformed storage record {info!r}")
    return rel, offset, length


def planner_paths(md: Any) -> dict[str, tuple[str | int, ...]]:
    """fqn -> the key path in the original nested state (DCP's flatten mapping), when recorded."""
    mapping = md.planner_data
    out: dict[str, tuple[str | int, ...]] = {}
    for fqn in md.state_dict_metadata:
        path = mapping.get(fqn) if isinstance(mapping, dict) else None
        if (
            isinstance(path, tuple)
            and path
            and all(isinstance(p, str | int) and not isinstance(p, bool) for p in path)
        ):
            out[fqn] = path
        else:
            out[fqn] = (fqn,)
    return out
