"""Between DCP's flat fully qualified names and ckptd's nested state trees.

DCP flattens a nested state dict into ``"model.layers.0.weight"``-style names and records,
per name, the key path it came from (``("model", "layers.0.weight")``). ckptd keeps the
nesting in its JSON skeleton and names arrays by encoded path segments
(``model/layers.0.weight``). These helpers convert in both directions with DCP's own
traversal rules, so a state dict flattened by DCP and one restored by ckptd agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any

import torch

from ckptd.format.errors import MetadataError
from ckptd.format.tree import TAG, flatten

KeyPath = tuple[str | int, ...]


def fqn_of(path: KeyPath) -> str:
    """DCP's name for a key path: the segments joined by dots."""
    return ".".join(map(str, path))


def nest(leaves: Iterable[tuple[KeyPath, Any]]) -> dict[str, Any]:
    """Rebuild a nested state from ``(key path, value)`` pairs (DCP's ``set_element``: ints index lists)."""
    root: dict[str, Any] = {}
    for path, value in leaves:
        node: Any = root
        for key, nxt in pairwise(path):
            child: Any = [] if isinstance(nxt, int) else {}
            node = _slot(node, key, child, path)
        _put(node, path[-1], value, path)
    return root


def _slot(node: Any, key: str | int, default: Any, path: KeyPath) -> Any:
    if isinstance(node, list):
        if not isinstance(key, int):
            raise MetadataError(f"DCP key path {path!r} mixes list and dict at {key!r}")
        while len(node) <= key:
            node.append(None)
        if node[key] is None:
            node[key] = default
        return node[key]
    if not isinstance(node, dict):
        raise MetadataError(f"DCP key path {path!r} runs through a value at {key!r}")
    return node.setdefault(str(key), default)


def _put(node: Any, key: str | int, value: Any, path: KeyPath) -> None:
    if isinstance(node, list) and isinstance(key, int):
        while len(node) <= key:
            node.append(None)
        node[key] = value
    elif isinstance(node, dict):
        if str(key) in node:
            raise MetadataError(f"DCP key path {path!r} is stored twice")
        node[str(key)] = value
    else:
        raise MetadataError(f"DCP key path {path!r} runs through a value")


def array_paths(tensor_paths: Mapping[str, KeyPath]) -> dict[str, str]:
    """fqn -> ckptd array path, exactly as ``ckptd.save`` would name the nested state's tensors."""
    placeholders = {fqn: torch.empty(0, device="meta") for fqn in tensor_paths}
    by_id = {id(t): fqn for fqn, t in placeholders.items()}
    _, tensors = flatten(nest((tensor_paths[fqn], t) for fqn, t in placeholders.items()))
    return {by_id[id(t)]: path for path, t in tensors.items()}


def dcp_leaves(skeleton: Any) -> list[tuple[KeyPath, Any]]:
    """The skeleton's leaves as DCP would flatten the restored state: ``(key path, node)``.

    A node is a tensor reference (``{"$ckptd": "tensor"|"alias", "path": ...}``) or an encoded
    value. Lists are walked only when they hold tensors or mappings (DCP's rule); tuples
    and lists of plain values are single values.
    """
    out: list[tuple[KeyPath, Any]] = []

    def walk(node: Any, path: KeyPath) -> None:
        if isinstance(node, dict):
            tag = node.get(TAG)
            if tag in ("tensor", "alias"):
                out.append((path, node))
            elif tag == "stateful":
                walk(node.get("state"), path)
            elif tag == "dict":
                for k, v in node.get("items", []):
                    walk(v, (*path, str(k)))
            elif tag is not None:
                out.append((path, node))
            else:
                for k, v in node.items():
                    walk(v, (*path, k))
        elif isinstance(node, list) and not _terminal(node):
            for i, v in enumerate(node):
                walk(v, (*path, i))
        else:
            out.append((path, node))

    if not isinstance(skeleton, dict):
        raise MetadataError("a checkpoint's state skeleton must be a mapping")
    for k, v in skeleton.items():
        walk(v, (k,))
    return out


def _terminal(items: list[Any]) -> bool:
    for v in items:
        if isinstance(v, dict) and v.get(TAG) not in ("tuple", "float", "dtype"):
            return False  # a mapping, a stateful object or a tensor
        if isinstance(v, list) and not _terminal(v):
            return False
    return True
