"""Zarr v3 metadata documents (``zarr.json``) for checkpoint groups and arrays.

Written by the committer, after the data and before the manifest, so that plain
zarr-python (``zarr.open_group``) and tensorstore can open every array of a
committed checkpoint in its canonical global shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ckptd.format.codecs import CodecSpec
from ckptd.format.dtypes import LogicalDType
from ckptd.format.manifest import ArrayRecord, PartRecord

ZARR_JSON = "zarr.json"


def checkpoint_groups(arrays: Iterable[ArrayRecord]) -> set[str]:
    """Paths of every Zarr group of a checkpoint ("" is the root): parents of arrays, and pieces arrays."""
    groups: set[str] = {""}
    for a in arrays:
        segments = a.path.split("/")
        groups.update("/".join(segments[:i]) for i in range(1, len(segments)))
        if a.kind == "pieces":
            groups.add(a.path)
    return groups


def root_attributes(format_version: int, step: int) -> dict[str, Any]:
    return {"ckptd": {"format_version": format_version, "step": step}}


def group_document(attributes: dict[str, Any] | None = None) -> bytes:
    return _dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}})


def _fill_value(dtype: LogicalDType) -> Any:
    if dtype.storage == "bool":
        return False
    if dtype.storage.startswith("complex"):
        return [0.0, 0.0]
    if dtype.storage.startswith("float"):
        return 0.0
    return 0


def array_document(array: ArrayRecord, part: PartRecord, part_index: int) -> bytes:
    dt = array.dtype
    attrs: dict[str, Any] = {
        "ckptd": {
            "path": array.path,
            "logical_dtype": dt.name,
            "global_shape": list(array.shape),
            "kind": array.kind,
            "offset": list(part.offset),
            "layout": None if array.layout is None else array.layout.to_json(),
        }
    }
    if array.kind == "pieces":
        attrs["ckptd"]["piece"] = part_index
    doc: dict[str, Any] = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(part.shape),
        "data_type": dt.storage,
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": _fill_value(dt),
        "attributes": attrs,
    }
    if array.kind == "scalar" or 0 in part.shape:
        doc["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(part.grid)}}
        doc["codecs"] = _plain_chain(dt)
    else:
        doc["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(part.grid)}}
        doc["codecs"] = [sharding_codec(array.codec, dt, part.chunks)]
    return _dumps(doc)


def _plain_chain(dt: LogicalDType) -> list[dict[str, Any]]:
    return [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def sharding_codec(codec: CodecSpec, dt: LogicalDType, chunks: tuple[int, ...]) -> dict[str, Any]:
    return {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": list(chunks),
            "codecs": codec.zarr_codecs(dt.itemsize),
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end",
        },
    }


def _dumps(doc: dict[str, Any]) -> bytes:
    # compact: the C encoder (``indent`` falls back to pure Python, 20x slower for thousands of arrays)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
