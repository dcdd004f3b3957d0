"""State trees: nested dicts/lists of tensors, stateful objects and JSON-able values.

``flatten`` turns a state into (skeleton, tensors): the skeleton is JSON with each
tensor replaced by a reference to its array path, and the tensors are keyed by that
path. Non-JSON values are encoded with a small tagged vocabulary (``{"$ckptd": ...}``)
so tuples, non-string dict keys and non-finite floats round-trip exactly. Nothing
here ever produces or consumes pickles: loading a skeleton runs no code.

``restore`` is the one place that decides whether a skeleton is acceptable: ``check_skeleton``
(what ``verify`` runs) walks it with the same code, reading no data, so a state tree that
load would refuse never verifies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ckptd.format.errors import LayoutError, MetadataError
from ckptd.format.names import check_array_path, encode_key

if TYPE_CHECKING:
    import torch

TAG = "$ckptd"
MAX_DEPTH = 64


# torch is not imported here: ``verify`` walks skeletons with this code and must not load it
# (``ckptd verify`` never imports torch). No value can be a tensor or a dtype before torch is loaded.
def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_dtype(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.dtype)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state_dict: Any, /) -> Any: ...


class _Flattener:
    """One walk of ``flatten``: the tensors found so far and the storages already stored (ties)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.seen_storage: dict[tuple[Any, ...], str] = {}

    def walk(self, value: Any, path: tuple[str, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise MetadataError(f"state is nested deeper than {MAX_DEPTH} levels at {'/'.join(path)}")
        if _is_tensor(value):
            return self._tensor(value, path)
        if isinstance(value, Stateful) and not isinstance(value, Mapping):
            return {TAG: "stateful", "state": self.walk(value.state_dict(), path)}
        if isinstance(value, Mapping):
            return self._mapping(value, path)
        if isinstance(value, list | tuple):
            encoded = [self.walk(v, (*path, str(i))) for i, v in enumerate(value)]
            return encoded if isinstance(value, list) else {TAG: "tuple", "items": encoded}
        if value is None or isinstance(value, bool | str | int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
        if _is_dtype(value):
            return {TAG: "dtype", "value": str(value).removeprefix("torch.")}
        raise MetadataError(
            f"value of type {type(value).__name__} at {'/'.join(path) or '<root>'} cannot be checkpointed: "
            "use tensors, JSON-able values, or objects with state_dict()/load_state_dict()"
        )

    def _tensor(self, value: torch.Tensor, path: tuple[str, ...]) -> dict[str, Any]:
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
            if ident in self.seen_storage:
                return {TAG: "alias", "path": self.seen_storage[ident]}
            self.seen_storage[ident] = array
        self.tensors[array] = value
        return {TAG: "tensor", "path": array}

    def _mapping(self, value: Mapping[Any, Any], path: tuple[str, ...]) -> Any:
        items: list[tuple[Any, Any]] = []
        segments: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise MetadataError(f"state key {k!r} at {'/'.join(path) or '<root>'} must be str or int")
            seg = encode_key(str(k))
            if seg in segments:
                raise MetadataError(f"state keys {segments[seg]!r} and {k!r} collide as path segment {seg!r}")
            segments[seg] = k
            items.append((k, self.walk(v, (*path, seg))))
        if all(isinstance(k, str) for k, _ in items) and TAG not in value:
            return dict(items)
        return {TAG: "dict", "items": [[k, v] for k, v in items]}


def flatten(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split a state into a JSON skeleton and ``{array path: tensor}``."""
    walker = _Flattener()
    skeleton = walker.walk(state, ())
    if not isinstance(skeleton, dict):
        raise MetadataError("the state to checkpoint must be a mapping")
    return skeleton, walker.tensors


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


ReadTensor = Callable[[str, "torch.Tensor | None"], "torch.Tensor"]
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
    restorer = _Restorer(read, sync or (lambda: None))
    result = restorer.fill(state, skeleton, 0)
    restorer.wait()
    return result


def check_skeleton(skeleton: Any, describe: Callable[[str], object]) -> None:
    """Raise what ``restore`` would raise on ``skeleton`` into an empty state, reading no data.

    ``describe(path)`` raises (a ``CheckpointError``) when the checkpoint holds no array at
    ``path``; what it returns stands in for the tensor (an empty state has none to fill).
    """

    def read(path: str, dest: torch.Tensor | None) -> torch.Tensor:
        return describe(path)  # type: ignore[return-value]  # a stand-in: nothing consumes it

    restore(None, skeleton, read)


class _Restorer:
    """One walk of ``restore``: reads scheduled through ``read``, tensors seen so far (tied weights)."""

    def __init__(self, read: ReadTensor, wait: Callable[[], None]) -> None:
        self.read = read
        self.wait = wait
        self.aliases: dict[str, torch.Tensor] = {}

    def fill(self, current: Any, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise MetadataError("state skeleton is nested too deeply")
        if isinstance(node, dict) and TAG in node:
            return self._tagged(current, node, depth)
        if isinstance(node, dict):
            target = current if isinstance(current, dict) else {}
            for k, v in node.items():
                target[k] = self.fill(target.get(k), v, depth + 1)
            return target
        if isinstance(node, list):
            if isinstance(current, list) and len(current) == len(node):
                for i, v in enumerate(node):
                    current[i] = self.fill(current[i], v, depth + 1)
                return current
            return [self.fill(None, v, depth + 1) for v in node]
        if isinstance(node, float) and not math.isfinite(node):
            # JSON has no infinities; a number like 1e999 parses as one. Non-finite floats are tagged.
            raise MetadataError(f"number {node!r} in state skeleton is out of range")
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise MetadataError(f"unexpected value {node!r} in state skeleton")

    def _tagged(self, current: Any, node: dict[str, Any], depth: int) -> Any:
        tag = node[TAG]
        if tag == "tensor":
            path = check_array_path(_str(node.get("path")))
            out = self.read(path, current if _is_tensor(current) else None)
            self.aliases[path] = out
            return out
        if tag == "alias":
            return self._alias(current, check_array_path(_str(node.get("path"))))
        if tag == "stateful":
            return self._stateful(current, node.get("state"), depth)
        if tag == "dict":
            return self._dict(current, node.get("items"), depth)
        if tag == "tuple":
            items = node.get("items")
            if not isinstance(items, list):
                raise MetadataError("malformed tuple node in state skeleton")
            cur = current if isinstance(current, list | tuple) and len(current) == len(items) else None
            return tuple(self.fill(cur[i] if cur else None, v, depth + 1) for i, v in enumerate(items))
        if tag == "float":
            text = _str(node.get("value"))
            if text not in ("nan", "inf", "-inf"):
                raise MetadataError(f"malformed float {text!r} in state skeleton")
            return float(text)
        if tag == "dtype":
            import torch  # a dtype value in a state tree: rare, and it is a torch object

            name = _str(node.get("value"))
            dt = getattr(torch, name, None)
            if not isinstance(dt, torch.dtype):
                raise MetadataError(f"unknown dtype {name!r} in state skeleton")
            return dt
        raise MetadataError(f"unknown node tag {tag!r} in state skeleton")

    def _alias(self, current: Any, path: str) -> Any:
        if path not in self.aliases:
            self.aliases[path] = self.read(path, None)
        src = self.aliases[path]
        self.wait()
        if not _is_tensor(current):
            return src
        if current.shape != src.shape:
            raise LayoutError(f"tied tensor {path}: shape {tuple(current.shape)} vs {tuple(src.shape)}")
        import torch  # loaded: current is a tensor

        with torch.no_grad():
            current.copy_(src)
        return current

    def _stateful(self, current: Any, state: Any, depth: int) -> Any:
        if isinstance(current, Stateful) and not isinstance(current, Mapping):
            filled = self.fill(current.state_dict(), state, depth + 1)
            self.wait()
            current.load_state_dict(filled)
            return current
        return self.fill(None, state, depth + 1)

    def _dict(self, current: Any, items: Any, depth: int) -> dict[Any, Any]:
        if not isinstance(items, list):
            raise MetadataError("malformed dict node in state skeleton")
        target = current if isinstance(current, dict) else {}
        for pair in items:
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str | int):
                raise MetadataError("malformed dict item in state skeleton")
            k, v = pair
            target[k] = self.fill(target.get(k), v, depth + 1)
        return target


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise MetadataError(f"expected a string in state skeleton, got {value!r}")
    return value
