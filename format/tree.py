"""State trees: nested dicts/lists of tensors, stateful objects and JSON-able values.

``flatten`` turns a state into (skeleton, tensors): the skeleton is JSON with each
tensor replaced by a reference to its array path, and the tensors are keyed by that
path. Non-JSON values are encoded with a small tagged vocabulary (``{"$ckptd": ...}``)
so tuples, non-string dict keys and non-finite floats round-trip exactly. Nothing
here ever produces or consumes pickles: loading a skeleton runs no code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from ckptd.format.errors import LayoutError, MetadataError
from ckptd.format.names import check_array_path, encode_key

TAG = "$ckptd"
MAX_DEPTH = 64


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def flatten(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split a state into a JSON skeleton and ``{array path: tensor}``."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: dict[tuple[Any, ...], str] = {}

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise MetadataError(f"state is nested deeper than {MAX_DEPTH} levels at {'/'.join(path)}")
        if isinstance(value, torch.Tensor):
            array = check_array_path("/".join(path))
            if value.device.type != "meta" and value.numel() > 0:
                # Tied weights appear twice in a state dict; store them once and alias.
                ident = (
                    value.untyped_storage().data_ptr(),
                    value.storage_offset(),
                    tuple(value.shape),
                    tuple(value.stride()),
                    value.dtype,
                )
                if ident in seen_storage:
                    return {TAG: "alias", "path": seen_storage[ident]}
                seen_storage[ident] = array
            tensors[array] = value
            return {TAG: "tensor", "path": array}
        if isinstance(value, Stateful) and not isinstance(value, Mapping):
            return {TAG: "stateful", "state": walk(value.state_dict(), path)}
        if isinstance(value, Mapping):
            items: list[tuple[Any, Any]] = []
            segments: dict[str, Any] = {}
            for k, v in value.items():
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise MetadataError(f"state key {k!r} at {'/'.join(path) or '<root>'} must be str or int")
                seg = encode_key(str(k))
                if seg in segments:
                    raise MetadataError(
                        f"state keys {segments[seg]!r} and {k!r} collide as path segment {seg!r}"
                    )
                segments[seg] = k
                items.append((k, walk(v, (*path, seg))))
            if all(isinstance(k, str) for k, _ in items) and TAG not in value:
                return {k: v for k, v in items}
            return {TAG: "dict", "items": [[k, v] for k, v in items]}
        if isinstance(value, list | tuple):
            encoded = [walk(v, (*path, str(i))) for i, v in enumerate(value)]
            return encoded if isinstance(value, list) else {TAG: "tuple", "items": encoded}
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            return {TAG: "float", "value": repr(value)}
        if isinstance(value, torch.dtype):
            return {TAG: "dtype", "value": str(value).removeprefix("torch.")}
        raise MetadataError(
            f"value of type {type(value).__name__} at {'/'.join(path) or '<root>'} cannot be checkpointed: "
            "use tensors, JSON-able values, or objects with state_dict()/load_state_dict()"
        )

    skeleton = walk(state, ())
    if not isinstance(skeleton, dict):
        raise MetadataError("the state to checkpoint must be a mapping")
    return skeleton, tensors


def tensor_paths(skeleton: Any) -> list[str]:
    """Every array path a skeleton refers to (validated)."""
    out: list[str] = []

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise MetadataError("state skeleton is nested too deeply")
        if isinstance(node, dict):
            if node.get(TAG) == "tensor":
                out.append(check_array_path(_str(node.get("path"))))
                return
            for v in node.values():
                walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)

    walk(skeleton, 0)
    return out


ReadTensor = Callable[[str, torch.Tensor | None], torch.Tensor]
"""``read(array_path, destination)``: fills ``destination`` in place (and returns it) when given,
otherwise returns a new CPU tensor."""


def restore(state: Any, skeleton: Any, read: ReadTensor, *, sync: Callable[[], None] | None = None) -> Any:
    """Load ``skeleton`` into ``state`` in place; returns the (possibly new) value for the root.

    Tensors present in ``state`` are filled in place (shapes must match); values absent
    from ``state`` are materialised (new CPU tensors, decoded JSON); stateful objects get
    ``load_state_dict`` with their own state dict after it has been filled.

    ``read`` may fill tensors asynchronously; ``sync`` then waits for every pending fill
    and is called before anything consumes tensor data (``load_state_dict``, tied aliases)
    and at the end.
    """
    wait = sync or (lambda: None)
    aliases: dict[str, torch.Tensor] = {}

    def fill(current: Any, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise MetadataError("state skeleton is nested too deeply")
        if isinstance(node, dict) and TAG in node:
            tag = node[TAG]
            if tag == "tensor":
                path = check_array_path(_str(node.get("path")))
                dest = current if isinstance(current, torch.Tensor) else None
                out = read(path, dest)
                aliases[path] = out
                return out
            if tag == "alias":
                path = check_array_path(_str(node.get("path")))
                if path not in aliases:
                    aliases[path] = read(path, None)
                src = aliases[path]
                wait()
                if isinstance(current, torch.Tensor):
                    if current.shape != src.shape:
                        raise LayoutError(
                            f"tied tensor {path}: shape {tuple(current.shape)} vs {tuple(src.shape)}"
                        )
                    with torch.no_grad():
                        current.copy_(src)
                    return current
                return src
            if tag == "stateful":
                if isinstance(current, Stateful) and not isinstance(current, Mapping):
                    sd = current.state_dict()
                    filled = fill(sd, node.get("state"), depth + 1)
                    wait()
                    current.load_state_dict(filled)
                    return current
                return fill(None, node.get("state"), depth + 1)
            if tag == "dict":
                items = node.get("items")
                if not isinstance(items, list):
                    raise MetadataError("malformed dict node in state skeleton")
                target = current if isinstance(current, dict) else {}
                for pair in items:
                    if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str | int):
                        raise MetadataError("malformed dict item in state skeleton")
                    k, v = pair
                    target[k] = fill(target.get(k), v, depth + 1)
                return target
            if tag == "tuple":
                items = node.get("items")
                if not isinstance(items, list):
                    raise MetadataError("malformed tuple node in state skeleton")
                cur = current if isinstance(current, list | tuple) and len(current) == len(items) else None
                return tuple(fill(cur[i] if cur else None, v, depth + 1) for i, v in enumerate(items))
            if tag == "float":
                text = _str(node.get("value"))
                if text not in ("nan", "inf", "-inf"):
                    raise MetadataError(f"malformed float {text!r} in state skeleton")
                return float(text)
            if tag == "dtype":
                name = _str(node.get("value"))
                dt = getattr(torch, name, None)
                if not isinstance(dt, torch.dtype):
                    raise MetadataError(f"unknown dtype {name!r} in state skeleton")
                return dt
            raise MetadataError(f"unknown node tag {tag!r} in state skeleton")
        if isinstance(node, dict):
            target = current if isinstance(current, dict) else {}
            for k, v in node.items():
                target[k] = fill(target.get(k), v, depth + 1)
            return target
        if isinstance(node, list):
            if isinstance(current, list) and len(current) == len(node):
                for i, v in enumerate(node):
                    current[i] = fill(current[i], v, depth + 1)
                return current
            return [fill(None, v, depth + 1) for v in node]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise MetadataError(f"unexpected value {node!r} in state skeleton")

    result = fill(state, skeleton, 0)
    wait()
    return result


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise MetadataError(f"expected a string in state skeleton, got {value!r}")
    return value
