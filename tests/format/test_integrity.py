"""Corruption and hostile metadata: every damaged object is named by ``ckptd verify`` and makes
reads fail with ``IntegrityError``; malformed or hostile manifests produce a ``CheckpointError``,
never another exception, and never a read or write outside the run root."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ckptd.format import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriter,
    CodecSpec,
    IntegrityError,
    MetadataError,
    Run,
    ShardBox,
    UnsafeNameError,
    UnsupportedFormatError,
)
from ckptd.format.run import step_dir
from ckptd.format.writer import shard_key
from fmt_helpers import assert_bits_equal, random_bits

import ckptd
from ckptd.cli.main import main as cli_main
from ckptd.storage import LocalStore

STEP = 5
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- a small but complete checkpoint


def _expected() -> dict[str, torch.Tensor]:
    return {
        "w": random_bits((12, 10), torch.float32, seed=1),  # 2 writers, 2 shards of 3 chunks
        "zstd/x": torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).bfloat16(),
        "p": random_bits((1500, 1), torch.float32, seed=3),  # pieces
        "s": torch.tensor(-12345, dtype=torch.int64),  # 0-d
    }


def _build(root: Path) -> None:
    exp = _expected()
    run = Run(LocalStore(root))
    ckpt = run.prepare(STEP)
    w0, w1 = (CheckpointWriter(ckpt, rank=r, chunk_bytes=80) for r in (0, 1))
    wb = [ShardBox((0, 0), (6, 10)), ShardBox((6, 0), (6, 10))]
    pb = [ShardBox((0, 0), (1, 1)), ShardBox((1, 0), (1499, 1))]
    for w, b, p in ((w0, wb[0], pb[0]), (w1, wb[1], pb[1])):
        w.add("w", exp["w"][b.slices()], shape=(12, 10), box=b, boxes=wb)
        w.add("p", exp["p"][p.slices()], shape=(1500, 1), box=p, boxes=pb)
    w0.add("s", exp["s"])
    wz = CheckpointWriter(ckpt, rank=2, codec=CodecSpec("zstd"), chunk_bytes=64)
    wz.add("zstd/x", exp["zstd/x"])
    state = {
        "model": {"w": {"$ckptd": "tensor", "path": "w"}, "x": {"$ckptd": "tensor", "path": "zstd/x"}},
        "p": {"$ckptd": "tensor", "path": "p"},
        "s": {"$ckptd": "tensor", "path": "s"},
        "lr": 0.5,
    }
    m = run.commit(STEP, [w0.finish(), w1.finish(), wz.finish()], state=state, world_size=3)
    assert m.arrays["p"].kind == "pieces" and m.arrays["s"].kind == "scalar"
    assert len(m.arrays["w"].parts[0].shards) == 2


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "run"
    _build(root)
    return root


@pytest.fixture()
def root(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the checkpoint at ``<tmp>/outer/run``, with a sentinel next to the run root."""
    outer = tmp_path / "outer"
    shutil.copytree(template, outer / "run")
    (outer / "secret").write_bytes(b"do not touch")
    return outer / "run"


def _cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main(list(args))
        except SystemExit as e:  # argparse errors
            rc = int(e.code or 0)
    return rc, out.getvalue() + err.getvalue()


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- corruption targets


@dataclass(frozen=True)
class Target:
    array: str
    key: str  # relative to the checkpoint directory
    pos: int
    what: str
    chunk: str | None = None  # "i/j" for chunk-level damage


def _targets(root: Path) -> list[Target]:
    """Byte positions in every kind of stored object, found from the format's layout (SPEC.md)."""
    m = Run(LocalStore(root)).manifest(STEP)
    ckpt = root / step_dir(STEP)
    out: list[Target] = []
    for a in m.arrays.values():
        for i, part in enumerate(a.parts):
            for rec in part.shards:
                if a.kind == "scalar":
                    key = f"{a.part_key(i)}/c"
                    n = (ckpt / key).stat().st_size
                    out += [
                        Target(a.path, key, 0, "scalar body", "c"),
                        Target(a.path, key, n - 1, "scalar crc", "c"),
                    ]
                    continue
                key = shard_key(a.part_key(i), rec.coords)
                blob = (ckpt / key).read_bytes()
                per_shard = tuple(g // c for g, c in zip(part.grid, part.chunks, strict=True))
                idx_n = math.prod(per_shard) * 16 + 4
                index = np.frombuffer(blob[-idx_n:-4], "<u8").reshape(-1, 2)
                for flat, (off, n) in enumerate(index.tolist()):
                    if off == 2**64 - 1:
                        continue
                    label = "/".join(map(str, np.unravel_index(flat, per_shard)))
                    out += [
                        Target(a.path, key, off, "chunk body (first byte)", label),
                        Target(a.path, key, off + n - 5, "chunk body (last byte)", label),
                        Target(a.path, key, off + n - 1, "chunk crc32c", label),
                    ]
                out += [
                    Target(a.path, key, len(blob) - idx_n, "shard index entry"),
                    Target(a.path, key, len(blob) - idx_n + 9, "shard index entry (length)"),
                    Target(a.path, key, len(blob) - 2, "shard index crc32c"),
                ]
    return out


def test_targets_cover_every_stored_shard(root: Path) -> None:
    targets = _targets(root)
    kinds = {t.what for t in targets}
    assert {
        "chunk body (first byte)",
        "chunk crc32c",
        "shard index entry",
        "shard index crc32c",
        "scalar body",
        "scalar crc",
    } <= kinds
    shard_files = {
        str(p.relative_to(root / step_dir(STEP)))
        for p in (root / step_dir(STEP)).rglob("*")
        if p.is_file() and p.name not in ("zarr.json", "manifest.json")
    }
    assert {t.key for t in targets} == shard_files
    assert len({(t.key, t.chunk) for t in targets if t.chunk}) >= 12


def test_flipped_byte_in_any_chunk_or_index_is_named_and_fails_reads(root: Path) -> None:
    exp = _expected()
    for t in _targets(root):
        path = root / step_dir(STEP) / t.key
        original = path.read_bytes()
        _flip(path, t.pos)
        try:
            run = Run(LocalStore(root))
            problems = run.verify(STEP)
            assert problems, t
            assert {p.key for p in problems} == {t.key}, (t, problems)
            if t.chunk is not None and t.chunk != "c":
                assert any(f"chunk {t.chunk}" in p.message for p in problems), (t, problems)
            rc, text = _cli("verify", str(root), "--step", str(STEP))
            assert rc != 0 and t.key in text, (t, text)
            with pytest.raises(IntegrityError):
                run.reader(STEP).read(t.array)
            with pytest.raises(IntegrityError):
                ckptd.load({}, str(root))
            if t.array == "w" and t.chunk is not None:
                # partial reads touch only their own chunks: the other writer's rows still read
                first = t.key == shard_key("w", (0, 0))
                other = ShardBox((6, 0), (6, 10)) if first else ShardBox((0, 0), (6, 10))
                assert_bits_equal(run.reader(STEP).read("w", other), exp["w"][other.slices()])
        finally:
            path.write_bytes(original)
    assert Run(LocalStore(root)).verify(STEP) == []


def _zarr_json_targets(root: Path) -> list[tuple[str, int, str]]:
    """(key, position, what) of meaningful bytes in the Zarr metadata documents."""
    ckpt = root / step_dir(STEP)
    out = []
    for key, needles in {
        "w/zarr.json": [
            '"shape": [\n    12',
            '"data_type": "float32"',
            '"crc32c"',
            '"chunk_shape": [\n',
            "{",
        ],
        "zstd/x/zarr.json": ['"logical_dtype": "bfloat16"', '"zstd"', '"uint16"'],
        "p/piece-00001/zarr.json": ['"offset": [\n', '"shape": [\n'],
        "s/zarr.json": ['"int64"'],
        "zarr.json": ['"group"', '"step"'],
        "zstd/zarr.json": ['"group"'],
        "p/zarr.json": ['"group"'],
    }.items():
        text = (ckpt / key).read_text()
        for needle in needles:
            i = text.index(needle)
            # the last character of the needle: a digit, a letter of a name, a brace
            pos = i + len(needle.rstrip('"\n ')) - 1
            out.append((key, pos, needle))
    return out


def test_flipped_byte_in_zarr_metadata_is_named_by_verify(root: Path) -> None:
    for key, pos, what in _zarr_json_targets(root):
        path = root / step_dir(STEP) / key
        original = path.read_bytes()
        _flip(path, pos)
        try:
            problems = Run(LocalStore(root)).verify(STEP)
            assert key in {p.key for p in problems}, (key, what, problems)
            rc, text = _cli("verify", str(root), "--step", str(STEP))
            assert rc != 0 and key in text, (key, what, text)
        finally:
            path.write_bytes(original)


def test_missing_and_truncated_shards(root: Path) -> None:
    ckpt = root / step_dir(STEP)
    scalar = next(t.key for t in _targets(root) if t.array == "s")
    for array, key, damage in [
        ("w", shard_key("w", (1, 0)), lambda b: b[: len(b) // 2]),
        ("w", shard_key("w", (0, 0)), lambda b: b[:-1]),
        ("p", shard_key("p/piece-00001", (0, 0)), lambda b: b""),
        ("zstd/x", shard_key("zstd/x", (0, 0)), lambda b: b + b"\0"),
        ("s", scalar, lambda b: b[:3]),
        ("w", shard_key("w", (1, 0)), None),
        ("p", shard_key("p/piece-00000", (0, 0)), None),
        ("s", scalar, None),
        ("w", "w/zarr.json", None),
    ]:
        path = ckpt / key
        original = path.read_bytes()
        if damage is None:
            path.unlink()
        else:
            path.write_bytes(damage(original))
        try:
            problems = Run(LocalStore(root)).verify(STEP)
            assert key in {p.key for p in problems}, (key, problems)
            rc, text = _cli("verify", str(root))
            assert rc != 0 and key in text
            # (bytes appended after a shard leave every byte the reader uses intact: only verify objects)
            if not key.endswith("zarr.json") and not (
                damage is not None and len(damage(original)) > len(original)
            ):
                with pytest.raises(IntegrityError):
                    Run(LocalStore(root)).reader(STEP).read(array)
        finally:
            path.write_bytes(original)
    assert Run(LocalStore(root)).verify(STEP) == []


def test_missing_manifest_means_not_committed(root: Path) -> None:
    (root / step_dir(STEP) / "manifest.json").unlink()
    run = Run(LocalStore(root))
    assert run.steps() == [] and run.uncommitted() == [STEP]
    with pytest.raises(CheckpointNotFoundError):
        ckptd.load({}, str(root), step=STEP)
    rc, _ = _cli("verify", str(root))
    assert rc != 0


def test_verify_cli_as_a_subprocess(root: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-P", "-m", "ckptd", "verify", str(root), "--step", str(STEP)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    t = next(t for t in _targets(root) if t.array == "zstd/x" and t.what == "chunk crc32c")
    _flip(root / step_dir(STEP) / t.key, t.pos)
    bad = subprocess.run(
        [sys.executable, "-P", "-m", "ckptd", "verify", str(root), "--step", str(STEP)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert bad.returncode != 0
    lines = [line for line in bad.stdout.splitlines() if t.key in line]
    assert len(lines) == 1 and f"chunk {t.chunk}" in lines[0], bad.stdout


@pytest.mark.s3
def test_flipped_byte_on_s3(
    s3_url: str, s3_storage_options: dict[str, Any], s3_env: str, tmp_path: Path
) -> None:
    from ckptd.storage import open_store

    local = tmp_path / "run"
    _build(local)
    store = open_store(s3_url, s3_storage_options)
    for p in local.rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            store.write(str(p.relative_to(local)), [p.read_bytes()])
    store.write_atomic(
        f"{step_dir(STEP)}/manifest.json", (local / step_dir(STEP) / "manifest.json").read_bytes()
    )
    run = Run(store)
    assert run.verify(STEP) == []
    assert _cli("verify", s3_url)[0] == 0
    t = next(t for t in _targets(local) if t.array == "w" and t.what == "chunk body (last byte)")
    key = f"{step_dir(STEP)}/{t.key}"
    blob = bytearray(store.read(key))
    blob[t.pos] ^= 0x01
    store.write(key, [bytes(blob)])
    assert {p.key for p in run.verify(STEP)} == {t.key}
    rc, text = _cli("verify", s3_url)
    assert rc != 0 and t.key in text
    with pytest.raises(IntegrityError):
        ckptd.load({}, s3_url, storage_options=s3_storage_options)


# ---------------------------------------------------------------------- manifest damage


def test_every_flipped_manifest_byte_gives_a_checkpoint_error_or_a_checked_result(root: Path) -> None:
    """Whatever a single bit flip does to the manifest, nothing but CheckpointError escapes."""
    path = root / step_dir(STEP) / "manifest.json"
    original = path.read_bytes()
    positions = range(0, len(original), max(1, len(original) // 250))
    for pos in positions:
        _flip(path, pos)
        try:
            _exercise(root)
        finally:
            path.write_bytes(original)


def test_flipped_byte_in_manifest_state_is_detected(root: Path) -> None:
    # The manifest ends with its own crc32c, so even a flip inside a JSON value is caught.
    path = root / step_dir(STEP) / "manifest.json"
    text = path.read_bytes()
    pos = text.index(b'"lr":0.5') + len(b'"lr":0.')
    _flip(path, pos)  # 0.5 -> 0.4
    with pytest.raises(IntegrityError, match="crc32c"):
        ckptd.load({}, str(root))


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


def _exercise(root: Path) -> list[BaseException]:
    """Everything a user does with a checkpoint; returns the CheckpointErrors raised (anything else fails)."""
    errors: list[BaseException] = []

    def attempt(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except CheckpointError as e:
            errors.append(e)

    run = Run(LocalStore(root))
    attempt(lambda: run.manifest(STEP))
    attempt(lambda: run.verify(STEP))
    attempt(lambda: ckptd.load({}, str(root)))
    attempt(
        lambda: ckptd.load(
            {"model": {"w": torch.zeros(12, 10)}, "s": torch.zeros((), dtype=torch.int64)}, str(root)
        )
    )

    def read_all() -> None:
        reader = run.reader(STEP)
        for path, a in reader.manifest.arrays.items():
            attempt(lambda p=path: reader.read(p))
            if a.shape and all(a.shape):
                attempt(lambda p=path, s=a.shape: reader.read(p, ShardBox((0,) * len(s), (1,) * len(s))))

    attempt(read_all)
    rc, text = _cli("verify", str(root), "--step", str(STEP))
    assert "Traceback" not in text
    if rc == 0:
        assert not errors or all(isinstance(e, IntegrityError | CheckpointError) for e in errors)
    return errors


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
        errors = _exercise(root)
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
        rc, text = _cli("verify", str(root))
        assert rc != 0 and "Traceback" not in text, name


# ---------------------------------------------------------------------- nothing unpickles

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _source_files() -> list[Path]:
    folders = ["ckptd", "format", "converters", "api", "training"]
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def _unpickling_calls(source: str, filename: str) -> list[str]:
    """Calls that would run code from data: pickle-family loads, torch.load without
    weights_only=True, numpy.load with allow_pickle, eval/exec."""
    offences = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
            offences += [
                f"{where}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in ("load", "loads", "Unpickler", "open")
            ]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        kwargs = {k.arg: k.value for k in node.keywords}
        if owner in _PICKLE_MODULES and name in ("load", "loads", "Unpickler", "open"):
            offences.append(f"{where}: {owner}.{name}(...)")
        if owner == "torch" and name == "load":
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                offences.append(f"{where}: torch.load without weights_only=True")
        if name == "load" and owner in ("np", "numpy"):
            ap = kwargs.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                offences.append(f"{where}: numpy.load with allow_pickle")
        if name in ("eval", "exec") and not owner:
            offences.append(f"{where}: {name}(...)")
    return offences


def test_no_module_unpickles() -> None:
    files = _source_files()
    assert any(p.parts[-2:] == ("format", "reader.py") for p in files)
    offences = [o for p in files for o in _unpickling_calls(p.read_text(), str(p.relative_to(REPO)))]
    assert not offences, "\n".join(offences)


def test_the_scan_catches_what_it_looks_for() -> None:
    src = (
        "import pickle, torch, numpy as np\n"
        "from pickle import loads\n"
        "pickle.loads(b'')\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\n"
        "np.load('x', allow_pickle=True)\n"
        "np.load('x')\n"
        "eval('1')\n"
    )
    found = _unpickling_calls(src, "sample.py")
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5", "7", "9"], found
