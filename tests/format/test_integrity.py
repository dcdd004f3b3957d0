"""Corruption: every damaged stored object is named by ``ckptd verify`` and makes reads fail with
``IntegrityError``; a damaged manifest is an integrity or metadata error, never a different state."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from damaged import STEP, build_checkpoint, cli, exercise, expected, flip
from fmt_helpers import assert_bits_equal

import ckptd
from ckptd.format import (
    CheckpointNotFoundError,
    IntegrityError,
    Run,
    ShardBox,
)
from ckptd.format.run import step_dir
from ckptd.format.writer import shard_key
from ckptd.storage import LocalStore
from tests.paths import data_path, meta_path

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
    ckpt = data_path(root, STEP)
    out: list[Target] = []
    for a in m.arrays.values():
        for i, part in enumerate(a.parts):
            for coords in part.cells():  # format v2 lists no shards: every cell of the grid is one
                if a.kind == "scalar":
                    key = f"{a.part_key(i)}/c"
                    n = (ckpt / key).stat().st_size
                    out += [
                        Target(a.path, key, 0, "scalar body", "c"),
                        Target(a.path, key, n - 1, "scalar crc", "c"),
                    ]
                    continue
                key = shard_key(a.part_key(i), coords)
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
    data = data_path(root, STEP)
    shard_files = {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file() and p.name != "zarr.json"}
    assert {t.key for t in targets} == shard_files
    assert len({(t.key, t.chunk) for t in targets if t.chunk}) >= 12


def _one_of_each(targets: list[Target]) -> list[Target]:
    """The first target of each kind in each array (the fast tier's sample of the campaign)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for t in targets:
        if (t.array, t.what) not in seen:
            seen.add((t.array, t.what))
            out.append(t)
    return out


# every byte position of every kind in `make test-slow`; one of each kind per array in `make test`
@pytest.mark.parametrize("exhaustive", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["each-kind", "every-target"])
def test_flipped_byte_in_any_chunk_or_index_is_named_and_fails_reads(root: Path, exhaustive: bool) -> None:
    exp = expected()
    data = data_path(root, STEP)
    targets = _targets(root)
    for t in targets if exhaustive else _one_of_each(targets):
        path = data / t.key
        original = path.read_bytes()
        flip(path, t.pos)
        try:
            run = Run(LocalStore(root))
            problems = run.verify(STEP)
            assert problems, t
            assert {p.key for p in problems} == {t.key}, (t, problems)
            if t.chunk is not None and t.chunk != "c":
                assert any(f"chunk {t.chunk}" in p.message for p in problems), (t, problems)
            rc, text = cli("verify", str(root), "--step", str(STEP))
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
    ckpt = data_path(root, STEP)
    out = []
    for key, needles in {
        "w/zarr.json": [
            '"shape":[12',
            '"data_type":"float32"',
            '"crc32c"',
            '"chunk_shape":[',
            "{",
        ],
        "zstd/x/zarr.json": ['"logical_dtype":"bfloat16"', '"zstd"', '"uint16"'],
        "p/piece-00001/zarr.json": ['"offset":[', '"shape":['],
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
    data = data_path(root, STEP)
    for key, pos, what in _zarr_json_targets(root):
        path = data / key
        original = path.read_bytes()
        flip(path, pos)
        try:
            problems = Run(LocalStore(root)).verify(STEP)
            assert key in {p.key for p in problems}, (key, what, problems)
            rc, text = cli("verify", str(root), "--step", str(STEP))
            assert rc != 0 and key in text, (key, what, text)
        finally:
            path.write_bytes(original)


def test_missing_and_truncated_shards(root: Path) -> None:
    ckpt = data_path(root, STEP)
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
            rc, text = cli("verify", str(root))
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
    rc, _ = cli("verify", str(root))
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
    flip(data_path(root, STEP) / t.key, t.pos)
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
    build_checkpoint(local)
    store = open_store(s3_url, s3_storage_options)
    for p in local.rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            store.write(str(p.relative_to(local)), [p.read_bytes()])
    store.write_atomic(
        f"{step_dir(STEP)}/manifest.json", (local / step_dir(STEP) / "manifest.json").read_bytes()
    )
    run = Run(store)
    assert run.verify(STEP) == []
    assert cli("verify", s3_url)[0] == 0
    t = next(t for t in _targets(local) if t.array == "w" and t.what == "chunk body (last byte)")
    key = f"{data_path(local, STEP).relative_to(local)}/{t.key}"
    blob = bytearray(store.read(key))
    blob[t.pos] ^= 0x01
    store.write(key, [bytes(blob)])
    assert {p.key for p in run.verify(STEP)} == {t.key}
    rc, text = cli("verify", s3_url)
    assert rc != 0 and t.key in text
    with pytest.raises(IntegrityError):
        ckptd.load({}, s3_url, storage_options=s3_storage_options)


# ---------------------------------------------------------------------- manifest damage


def test_every_flipped_v1_manifest_byte_gives_a_checkpoint_error_or_a_checked_result(root_v1: Path) -> None:
    """Whatever a single bit flip does to a format v1 manifest, nothing but CheckpointError escapes."""
    path = root_v1 / step_dir(STEP) / "manifest.json"
    original = path.read_bytes()
    positions = range(0, len(original), max(1, len(original) // 250))
    for pos in positions:
        flip(path, pos)
        try:
            exercise(root_v1)
        finally:
            path.write_bytes(original)


def _sealed_documents(root: Path) -> list[Path]:
    """The commit record and every document it pins (table pages, state tree)."""
    meta = meta_path(root, STEP)
    docs = [root / step_dir(STEP) / "manifest.json", *sorted((meta / "tables").iterdir())]
    docs.append(meta / "state.json")
    assert len(docs) == 3
    return docs


def test_every_flipped_metadata_byte_is_an_integrity_error(root: Path) -> None:
    """Format v2: a bit flipped anywhere in the commit record, a table page or the state tree — the
    seal included, every position — is an IntegrityError, never a silently different checkpoint."""
    for path in _sealed_documents(root):
        original = path.read_bytes()
        for pos in range(len(original)):
            flip(path, pos)
            try:
                run = Run(LocalStore(root))
                with pytest.raises(IntegrityError):
                    run.manifest(STEP).arrays["w"]  # the record and state load here, the page on access
                if pos % 97 == 0:  # everything a user does (slower): only CheckpointErrors, at least one
                    assert any(isinstance(e, IntegrityError) for e in exercise(root)), (path.name, pos)
            finally:
                path.write_bytes(original)
    assert Run(LocalStore(root)).verify(STEP) == []


def test_flipped_byte_in_manifest_state_is_detected(root: Path, root_v1: Path) -> None:
    # Every metadata document ends with its own crc32c, so even a flip inside a JSON value is caught:
    # in the v1 manifest, and in the v2 state tree (pinned by the commit record as well).
    for run_root, path, match in [
        (root_v1, root_v1 / step_dir(STEP) / "manifest.json", "crc32c"),
        (root, meta_path(root, STEP) / "state.json", "state tree"),
    ]:
        text = path.read_bytes()
        pos = text.index(b'"lr":0.5') + len(b'"lr":0.')
        flip(path, pos)  # 0.5 -> 0.4
        with pytest.raises(IntegrityError, match=match):
            ckptd.load({}, str(run_root))
