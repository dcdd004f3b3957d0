"""Malformed or hostile manifests produce a ``CheckpointError`` — never another exception, and never a
read or write outside the run root (checked with an audit hook)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from confine import confined_to
from damaged import STEP, cli, exercise, load_doc, reseal, sealed_json, unseal

import ckptd
from ckptd.format import (
    CheckpointError,
    IntegrityError,
    MetadataError,
    Run,
    UnsafeNameError,
    UnsupportedFormatError,
)
from ckptd.format.run import step_dir
from ckptd.storage import LocalStore

# ---------------------------------------------------------------------- hostile manifests


def test_confinement_audit_catches_escapes(tmp_path: Path) -> None:
    """The audit used by the hostile-manifest tests is not vacuous."""
    root = tmp_path / "run"
    root.mkdir()
    with pytest.raises(AssertionError, match="outside"), confined_to(root):
        (root / "inside").write_bytes(b"fine")
        (tmp_path / "outside").write_bytes(b"escape")
    with pytest.raises(AssertionError, match=r"os\.remove"), confined_to(root):
        os.remove(tmp_path / "outside")
    with confined_to(root):
        (root / "inside").read_bytes()
        shutil.rmtree(root / "sub", ignore_errors=True)


@dataclass(frozen=True)
class Verbatim:
    """A damage written as is, without forging a seal (the seal is what is under test)."""

    damage: Callable[[bytes], bytes]


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return mutate


def _rename_array(new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["arrays"][new] = doc["arrays"].pop("w")
        doc["state"]["model"]["w"]["path"] = new

    return mutate


def _drop_piece(doc: dict[str, Any]) -> None:
    doc["arrays"]["p"]["parts"].pop(0)


def _overlap_piece(doc: dict[str, Any]) -> None:
    doc["arrays"]["p"]["parts"][0]["offset"] = [1]
    doc["arrays"]["p"]["parts"][0]["offset"] = [1, 0]


_OTHER_SEAL = reseal(b'{"a":1}')[len(b'{"a":1') :]  # ,"crc32c":<crc of another document>}
Mutation = bytes | Verbatim | Callable[[dict[str, Any]], None]

# Format v1 manifests (still read). Every mutated document gets a forged seal, so what is
# checked is the parser behind it; the Verbatim ones check the seal itself.
HOSTILE: list[tuple[str, Mutation, type[CheckpointError]]] = [
    ("seal removed", Verbatim(unseal), IntegrityError),
    ("seal of another document", Verbatim(lambda raw: unseal(raw)[:-1] + _OTHER_SEAL), IntegrityError),
    ("unsealed truncated json", Verbatim(lambda raw: raw[: len(raw) // 2]), IntegrityError),
    ("unsealed empty file", Verbatim(lambda raw: b""), IntegrityError),
    ("truncated json", b'{"format": "ckptd", "format_version": 1, "step": 5, "arr', MetadataError),
    ("empty file", b"", MetadataError),
    ("binary garbage", bytes(range(256)) * 4, MetadataError),
    ("not an object", b"[1, 2, 3]", MetadataError),
    ("deeply nested", b"[" * 200_000 + b"]" * 200_000, MetadataError),
    ("deep state", _set(["state", "deep"], json.loads("[" * 900 + "]" * 900)), MetadataError),
    ("NaN step", lambda d: d.__setitem__("step", float("nan")), MetadataError),
    ("NaN in state", _set(["state", "lr"], float("nan")), MetadataError),
    ("Infinity nbytes", _set(["arrays", "w", "parts", 0, "shards", 0, 2], float("inf")), MetadataError),
    ("step is a string", _set(["step"], "5"), MetadataError),
    ("step is a float", _set(["step"], 5.0), MetadataError),
    ("step is a bool", _set(["step"], True), MetadataError),
    ("step disagrees with directory", _set(["step"], 6), CheckpointError),
    ("negative step", _set(["step"], -1), MetadataError),
    ("arrays is a list", _set(["arrays"], []), MetadataError),
    ("array is null", _set(["arrays", "w"], None), MetadataError),
    ("shape is a string", _set(["arrays", "w", "shape"], "12,10"), MetadataError),
    ("negative shape", _set(["arrays", "w", "shape"], [-12, 10]), MetadataError),
    ("float shape", _set(["arrays", "w", "shape"], [12.0, 10]), MetadataError),
    ("bool shape", _set(["arrays", "w", "shape"], [True, 10]), MetadataError),
    ("huge shape", _set(["arrays", "w", "shape"], [2**40, 2**40]), MetadataError),
    ("too many dims", _set(["arrays", "w", "shape"], [1] * 100), MetadataError),
    ("unknown dtype", _set(["arrays", "w", "dtype"], "float128"), MetadataError),
    ("dtype is an attribute name", _set(["arrays", "w", "dtype"], "__class__"), MetadataError),
    ("storage dtype disagrees", _set(["arrays", "zstd/x", "storage_dtype"], "float32"), MetadataError),
    ("unknown kind", _set(["arrays", "w", "kind"], "evil"), MetadataError),
    ("scalar kind with a shape", _set(["arrays", "w", "kind"], "scalar"), MetadataError),
    ("part shape disagrees", _set(["arrays", "w", "parts", 0, "shape"], [12, 11]), MetadataError),
    ("array shape disagrees", _set(["arrays", "w", "shape"], [12, 11]), MetadataError),
    ("part outside the array", _set(["arrays", "p", "parts", 1, "offset"], [2, 0]), MetadataError),
    (
        "two parts for a regular array",
        lambda d: d["arrays"]["w"]["parts"].append(d["arrays"]["w"]["parts"][0]),
        MetadataError,
    ),
    ("chunks do not divide shards", _set(["arrays", "w", "parts", 0, "chunks"], [4, 10]), MetadataError),
    ("zero chunk", _set(["arrays", "w", "parts", 0, "chunks"], [0, 10]), MetadataError),
    (
        "too many chunks per shard",
        _set(
            ["arrays", "w", "parts", 0],
            {"offset": [0, 0], "shape": [12, 10], "grid": [2**20, 2**20], "chunks": [1, 1], "shards": []},
        ),
        MetadataError,
    ),
    (
        "shard coordinates outside the grid",
        _set(["arrays", "w", "parts", 0, "shards", 0, 0], [5, 0]),
        MetadataError,
    ),
    ("negative shard coordinates", _set(["arrays", "w", "parts", 0, "shards", 0, 0], [-1, 0]), MetadataError),
    (
        "shard listed twice",
        lambda d: d["arrays"]["w"]["parts"][0]["shards"].__setitem__(
            1, d["arrays"]["w"]["parts"][0]["shards"][0]
        ),
        MetadataError,
    ),
    ("shard record too short", _set(["arrays", "w", "parts", 0, "shards", 0], [[0, 0], 0]), MetadataError),
    ("index crc out of range", _set(["arrays", "w", "parts", 0, "shards", 0, 3], 2**40), MetadataError),
    ("negative nbytes", _set(["arrays", "w", "parts", 0, "shards", 0, 2], -1), MetadataError),
    ("writer is a string", _set(["arrays", "w", "parts", 0, "shards", 0, 1], "0"), MetadataError),
    ("codec unknown", _set(["arrays", "w", "codec", "compressor"], "pickle"), MetadataError),
    ("codec is a string", _set(["arrays", "w", "codec"], "none"), MetadataError),
    ("mesh axis with a slash", _set(["mesh"], {"a/b": 2}), MetadataError),
    (
        "layout alias escapes",
        _set(["arrays", "w", "layout"], {"partition": [], "alias_of": "../../secret"}),
        MetadataError,
    ),
    ("layout is a string", _set(["arrays", "w", "layout"], "tp"), MetadataError),
    ("array name with ..", _rename_array("../../secret"), UnsafeNameError),
    ("array name with . segment", _rename_array("./w"), UnsafeNameError),
    ("absolute array name", _rename_array("/etc/passwd"), UnsafeNameError),
    ("array name with backslash", _rename_array("..\\..\\secret"), UnsafeNameError),
    ("array name with NUL", _rename_array("w\x00"), UnsafeNameError),
    ("array name with newline", _rename_array("w\nx"), UnsafeNameError),
    ("array name too long", _rename_array("w" * 1000), UnsafeNameError),
    ("array name too deep", _rename_array("/".join(["d"] * 100)), UnsafeNameError),
    ("array name reserved", _rename_array("zarr.json"), UnsafeNameError),
    ("state refers outside", _set(["state", "model", "w", "path"], "../../secret"), UnsafeNameError),
    ("state refers to an absolute path", _set(["state", "s", "path"], "/etc/passwd"), UnsafeNameError),
    (
        "state alias escapes",
        _set(["state", "alias"], {"$ckptd": "alias", "path": "../secret"}),
        UnsafeNameError,
    ),
    ("state refers to a missing array", _set(["state", "s", "path"], "nope"), CheckpointError),
    ("unknown state tag", _set(["state", "x"], {"$ckptd": "pickle", "data": "gASV"}), MetadataError),
    ("bad float tag", _set(["state", "x"], {"$ckptd": "float", "value": "__import__('os')"}), MetadataError),
    (
        "dtype tag naming a function",
        _set(["state", "x"], {"$ckptd": "dtype", "value": "load"}),
        MetadataError,
    ),
    ("future format version", _set(["format_version"], 3), UnsupportedFormatError),
    ("v1 document claiming version 2", _set(["format_version"], 2), MetadataError),
    ("far future format version", _set(["format_version"], 10**30), UnsupportedFormatError),
    ("format version zero", _set(["format_version"], 0), MetadataError),
    ("not a ckptd manifest", _set(["format"], "torch"), MetadataError),
    # data-dependent lies: the manifest parses but disagrees with what is stored
    (
        "grid disagrees with stored shards",
        lambda d: [
            _set(["arrays", "w", "parts", 0, "grid"], [12, 10])(d),
            _set(["arrays", "w", "parts", 0, "shards"], [d["arrays"]["w"]["parts"][0]["shards"][0]])(d),
        ],
        IntegrityError,
    ),
    (
        "regular array missing a shard",
        lambda d: d["arrays"]["w"]["parts"][0]["shards"].pop(),
        CheckpointError,
    ),
    ("pieces leave a gap", _drop_piece, CheckpointError),
    ("pieces overlap", _overlap_piece, CheckpointError),
    ("huge shard size", _set(["arrays", "w", "parts", 0, "shards", 0, 2], 2**52), IntegrityError),
    (
        "huge array with few shards",
        lambda d: d["arrays"].__setitem__(
            "w",
            {
                **d["arrays"]["w"],
                "shape": [2**26, 2**26],
                "parts": [
                    {
                        "offset": [0, 0],
                        "shape": [2**26, 2**26],
                        "grid": [2**26, 2**26],
                        "chunks": [2**13, 2**13],
                        "shards": [[[0, 0], 0, 100, 0]],
                    }
                ],
            },
        ),
        CheckpointError,
    ),
]


@pytest.mark.parametrize(("name", "mutation", "error"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_manifest(root_v1: Path, name: str, mutation: Any, error: type[CheckpointError]) -> None:
    root = root_v1
    path = root / step_dir(STEP) / "manifest.json"
    if isinstance(mutation, bytes):
        raw = reseal(mutation)
    elif isinstance(mutation, Verbatim):
        raw = mutation.damage(path.read_bytes())
    else:
        doc = load_doc(path)
        mutation(doc)
        raw = sealed_json(doc)  # allow_nan: NaN/Infinity literals on purpose
    path.write_bytes(raw)
    outer = root.parent
    before = {p: p.read_bytes() for p in outer.rglob("*") if p.is_file()}
    with confined_to(root):
        errors = exercise(root)
        # writing over the hostile checkpoint, deleting it and collecting garbage stay inside the run root
        run = Run(LocalStore(root))
        assert STEP in run.steps()
        with pytest.raises(ckptd.CheckpointExistsError):
            ckptd.save({"w": torch.ones(2)}, str(root), step=STEP)
    assert errors, f"{name}: accepted without any error"
    assert any(isinstance(e, error) for e in errors), (name, errors)
    loads = [e for e in errors if isinstance(e, error)]
    assert loads
    assert (outer / "secret").read_bytes() == b"do not touch"
    after = {p: p.read_bytes() for p in outer.rglob("*") if p.is_file()}
    assert after == before, f"{name}: files changed"

    with confined_to(root):
        ckptd.save({"w": torch.ones(2)}, str(root), step=STEP, overwrite=True)
        Run(LocalStore(root)).delete(STEP)
        Run(LocalStore(root)).gc_uncommitted(min_age_s=0)
    assert (outer / "secret").read_bytes() == b"do not touch"
    assert sorted(p.name for p in outer.iterdir()) == ["run", "secret"]


def test_hostile_manifests_raise_from_load(root_v1: Path) -> None:
    """``ckptd.load``, the first thing a user calls, raises the specific error for plainly invalid ones."""
    root = root_v1
    path = root / step_dir(STEP) / "manifest.json"
    cases = {
        "future": (_set(["format_version"], 7), UnsupportedFormatError),
        "escape": (_rename_array("../x"), UnsafeNameError),
        "nan": (_set(["state", "lr"], float("nan")), MetadataError),
    }
    original = path.read_bytes()
    for name, (mutation, error) in cases.items():
        doc = json.loads(original)
        mutation(doc)
        path.write_bytes(sealed_json(doc))
        with pytest.raises(error):
            ckptd.load({}, str(root))
        rc, text = cli("verify", str(root))
        assert rc != 0 and "Traceback" not in text, name
