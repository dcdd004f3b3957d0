"""Random number generator states as JSON (python, numpy, torch CPU and CUDA).

They are per rank (every rank draws its own dropout masks), so they travel beside the
state tree rather than in it. Generator states are byte strings or integer tuples;
they are stored as base64 and lists so loading them runs no code.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

from ckptd.format.errors import MetadataError


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: Any) -> torch.Tensor:
    if not isinstance(text, str):
        raise MetadataError("malformed RNG state")
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def capture() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    name, keys, pos, has_gauss, cached = np_state
    doc: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"name": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        doc["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return doc


def restore(doc: Any) -> None:
    """Restore the states ``capture`` produced; malformed input raises ``MetadataError``."""
    if not isinstance(doc, dict):
        raise MetadataError("malformed RNG state")
    try:
        py = doc["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]),
                         None if py["gauss"] is None else float(py["gauss"])))
        n = doc["numpy"]
        np.random.set_state((str(n["name"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
        torch.set_rng_state(_unb64(doc["torch"]))
        cuda = doc.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            states = [_unb64(s) for s in cuda]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
    except (KeyError, TypeError, ValueError) as e:
        raise MetadataError(f"malformed RNG state: {e}") from e
