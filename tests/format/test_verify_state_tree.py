"""``verify`` checks the state tree exactly as ``load`` does: a state tree load refuses makes verify
report a problem (and ``ckptd verify`` exit 1), and every state tree load accepts verifies clean."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from damaged import STEP, cli, load_doc, reseal, sealed_json

import ckptd
from ckptd.format import CheckpointError, Run
from ckptd.format.codecs import crc32c
from ckptd.format.run import step_dir
from ckptd.storage import LocalStore

Edit = Callable[[dict[str, Any]], None]


def _put(key: str, value: Any) -> Edit:
    def edit(state: dict[str, Any]) -> None:
        state[key] = value

    return edit


def _model_w(path: str) -> Edit:
    def edit(state: dict[str, Any]) -> None:
        state["model"]["w"]["path"] = path

    return edit


REFUSED: list[tuple[str, Edit | bytes]] = [
    ("unknown tag", _put("x", {"$ckptd": "pickle", "data": "gASV"})),
    ("path with ..", _model_w("../../secret")),
    ("absolute path", _model_w("/etc/passwd")),
    ("tensor of a missing array", _model_w("nope")),
    ("alias of a missing array", _put("tied", {"$ckptd": "alias", "path": "nope"})),
    ("alias path escapes", _put("tied", {"$ckptd": "alias", "path": "../w"})),
    ("tensor path is a number", _model_w(7)),  # type: ignore[arg-type]
    ("malformed float tag", _put("x", {"$ckptd": "float", "value": "1e999"})),
    ("dtype tag naming a function", _put("x", {"$ckptd": "dtype", "value": "load"})),
    ("dict items not a list", _put("x", {"$ckptd": "dict", "items": {"a": 1}})),
    ("dict item not a pair", _put("x", {"$ckptd": "dict", "items": [[1, 2, 3]]})),
    ("dict key is a list", _put("x", {"$ckptd": "dict", "items": [[[1], 2]]})),
    ("tuple items not a list", _put("x", {"$ckptd": "tuple", "items": 3})),
    ("nested deeper than 64", _put("x", json.loads("[" * 70 + "]" * 70))),
    ("stateful holding a bad tag", _put("x", {"$ckptd": "stateful", "state": {"$ckptd": "evil"}})),
    ("number beyond float range", b'"lr":1e999'),  # JSON has no infinity: it parses as inf
]


def _rewrite_state(root: Path, edit: Edit | bytes) -> None:
    """Apply ``edit`` to the committed state tree, re-sealed and re-pinned so that only the tree is bad."""
    record_path = root / step_dir(STEP) / "manifest.json"
    record = load_doc(record_path)
    state_path = root / step_dir(STEP) / f"{record['attempt']}.meta" / "state.json"
    doc = load_doc(state_path)
    if isinstance(edit, bytes):
        body = json.dumps(doc, separators=(",", ":")).encode()
        assert b'"lr":0.5' in body
        raw = reseal(body.replace(b'"lr":0.5', edit))
    else:
        edit(doc["state"])
        raw = sealed_json(doc)
    state_path.write_bytes(raw)
    record["state"] = {"size": len(raw), "crc32c": crc32c(raw)}
    record_path.write_bytes(sealed_json(record))


@pytest.mark.parametrize(("name", "edit"), REFUSED, ids=[c[0] for c in REFUSED])
def test_verify_refuses_what_load_refuses(root: Path, name: str, edit: Edit | bytes) -> None:
    _rewrite_state(root, edit)
    with pytest.raises(CheckpointError):
        ckptd.load({}, str(root))
    problems = Run(LocalStore(root)).verify(STEP)
    assert [(p.array, p.key) for p in problems] == [("state tree", "state.json")], (name, problems)
    rc, text = cli("verify", "--quiet", str(root))
    assert rc == 1 and "CORRUPT state tree" in text and "Traceback" not in text, text


def test_verify_refuses_a_bad_v1_state_tree(root_v1: Path) -> None:
    """Format v1 keeps the tree in the manifest itself; the same check names it."""
    path = root_v1 / step_dir(STEP) / "manifest.json"
    doc = load_doc(path)
    doc["state"]["x"] = {"$ckptd": "pickle"}
    path.write_bytes(sealed_json(doc))
    with pytest.raises(CheckpointError, match="unknown node tag"):
        ckptd.load({}, str(root_v1))
    problems = Run(LocalStore(root_v1)).verify(STEP)
    assert [(p.array, p.key) for p in problems] == [("state tree", "manifest.json")]
    assert "unknown node tag 'pickle'" in problems[0].message


class _Counter:
    def __init__(self) -> None:
        self.n = torch.tensor([3, 4])

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "label": "c"}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]


def test_every_tag_load_accepts_verifies_clean(tmp_path: Path) -> None:
    """The valid edge cases: every tag, ties, empty and 0-d tensors, non-finite floats, int keys."""
    w = torch.arange(6.0).reshape(2, 3)
    state = {
        "model": {"w": w, "tied": w, "empty": torch.zeros(0, 4), "zero_d": torch.tensor(2.5)},
        "opt": {0: {"lr": 1e-3}, 1: (1, "two", None)},
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 1e308],
        "dtype": torch.bfloat16,
        "weird": {"$ckptd": "a user key that looks like a tag"},
        "counter": _Counter(),
    }
    root = tmp_path / "run"
    ckptd.save(state, str(root), step=1)
    assert Run(LocalStore(root)).verify(1) == []
    out: dict[str, Any] = {"counter": _Counter()}
    ckptd.load(out, str(root))
    assert torch.equal(out["model"]["tied"], w) and out["opt"][1] == (1, "two", None)
    assert out["dtype"] is torch.bfloat16 and out["weird"] == state["weird"]
    assert torch.equal(out["counter"].n, torch.tensor([3, 4]))
