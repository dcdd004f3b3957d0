"""Malformed or hostile manifests produce a ``CheckpointError`` — never another exception, and never a
read or write outside the run root (checked with an audit hook)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.format import (
    CheckpointError,
    IntegrityError,
    MetadataError,
    Run,
    UnsafeNameError,
    UnsupportedFormatError,
)
from ckptd.format.run import step_dir
from damaged import REPO, STEP, cli, exercise

import ckptd
from ckptd.storage import LocalStore

# ---------------------------------------------------------------------- hostile manifests

_ALLOWED_READ_PREFIXES = tuple(
    {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        str(REPO),
        "/dev/",
        "/proc/",
        "/sys/",
        "/etc/localtime",
        "/usr/",
    }
)
_audit_root: list[Path] = []
_audit_violations: list[str] = []


def _abs(path: Any, dir_fd: Any = None) -> str | None:
    if not isinstance(path, str | bytes | os.PathLike):
        return None
    p = os.fsdecode(path)
    if isinstance(dir_fd, int) and not os.path.isabs(p):
        p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)  # shutil.rmtree works relative to fds
    return os.path.abspath(p)


# event -> indexes of (path, dir_fd) pairs in its arguments (dir_fd index None when the event has none)
_MUTATING_EVENTS: dict[str, list[tuple[int, int | None]]] = {
    "os.remove": [(0, 1)],
    "os.rmdir": [(0, 1)],
    "os.mkdir": [(0, 2)],
    "shutil.rmtree": [(0, 1)],
    "os.rename": [(0, 2), (1, 3)],
    "os.link": [(0, 2), (1, 3)],
    "os.symlink": [(1, 2)],
    "os.truncate": [(0, None)],
    "os.chmod": [(0, 2)],
    "os.utime": [(0, 3)],
}


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _audit_root:
        return
    root = str(_audit_root[0])

    def inside(p: str) -> bool:
        return p == root or p.startswith(root + os.sep)

    if event == "open":
        path, mode, flags = args
        p = _abs(path)
        if p is None:
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        )
        relative_to_fd = not os.path.isabs(os.fsdecode(path)) and not writing  # rmtree's read-only dir opens
        if not inside(p) and not relative_to_fd and (writing or not p.startswith(_ALLOWED_READ_PREFIXES)):
            _audit_violations.append(f"{event} {p} mode={mode} flags={flags}")
    elif event in _MUTATING_EVENTS:
        for pi, fi in _MUTATING_EVENTS[event]:
            p = _abs(args[pi], args[fi] if fi is not None and fi < len(args) else None)
            if p is not None and not inside(p):
                _audit_violations.append(f"{event} {p}")


sys.addaudithook(_audit_hook)  # inert unless _audit_root is set


@contextlib.contextmanager
def _confined_to(root: Path) -> Iterator[None]:
    _audit_root[:] = [root.resolve()]
    _audit_violations.clear()
    try:
        yield
    finally:
        _audit_root.clear()
    assert not _audit_violations, _audit_violations


def test_confinement_audit_catches_escapes(tmp_path: Path) -> None:
    """The audit used by the hostile-manifest tests is not vacuous."""
    root = tmp_path / "run"
    root.mkdir()
    with pytest.raises(AssertionError, match="outside"), _confined_to(root):
        (root / "inside").write_bytes(b"fine")
        (tmp_path / "outside").write_bytes(b"escape")
    with pytest.raises(AssertionError, match=r"os\.remove"), _confined_to(root):
        os.remove(tmp_path / "outside")
    with _confined_to(root):
        (root / "inside").read_bytes()
        shutil.rmtree(root / "sub", ignore_errors=True)


def _doc(root: Path) -> dict[str, Any]:
    return json.loads((root / step_dir(STEP) / "manifest.json").read_bytes())


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


HOSTILE: list[tuple[str, bytes | Callable[[dict[str, Any]], None], type[CheckpointError]]] = [
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
    ("future format version", _set(["format_version"], 2), UnsupportedFormatError),
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
def test_hostile_manifest(root: Path, name: str, mutation: Any, error: type[CheckpointError]) -> None:
    path = root / step_dir(STEP) / "manifest.json"
    if isinstance(mutation, bytes):
        raw = mutation
    else:
        doc = _doc(root)
        mutation(doc)
        raw = json.dumps(doc).encode()  # allow_nan: NaN/Infinity literals on purpose
    path.write_bytes(raw)
    outer = root.parent
    before = {p: p.read_bytes() for p in outer.rglob("*") if p.is_file()}
    with _confined_to(root):
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

    with _confined_to(root):
        ckptd.save({"w": torch.ones(2)}, str(root), step=STEP, overwrite=True)
        Run(LocalStore(root)).delete(STEP)
        Run(LocalStore(root)).gc_uncommitted(min_age_s=0)
    assert (outer / "secret").read_bytes() == b"do not touch"
    assert sorted(p.name for p in outer.iterdir()) == ["run", "secret"]


def test_hostile_manifests_raise_from_load(root: Path) -> None:
    """``ckptd.load``, the first thing a user calls, raises the specific error for plainly invalid ones."""
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
        path.write_bytes(json.dumps(doc).encode())
        with pytest.raises(error):
            ckptd.load({}, str(root))
        rc, text = cli("verify", str(root))
        assert rc != 0 and "Traceback" not in text, name
