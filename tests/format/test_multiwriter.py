"""Eight concurrent writer processes write their boxes of the same arrays; a reader in any
other layout reads boxes that straddle the writers' boxes. Local disk and S3."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fmt_helpers import assert_bits_equal
from multiwriter_proc import full_array

import ckptd
from ckptd.format import LayoutError, Run, ShardBox, TensorLayout
from ckptd.format.boxes import split_evenly
from ckptd.format.writer import report_from_json
from ckptd.storage import open_store
from tests import zygote

WORLD = 8
PROC = Path(__file__).with_name("multiwriter_proc.py")


def _grid_boxes(cuts: list[list[int]]) -> list[ShardBox]:
    boxes = []
    for idx in itertools.product(*(range(len(c) - 1) for c in cuts)):
        boxes.append(
            ShardBox(
                tuple(cuts[d][i] for d, i in enumerate(idx)),
                tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx)),
            )
        )
    return boxes


def _even_cuts(size: int, parts: int) -> list[int]:
    return [split_evenly(size, parts, i)[0] for i in range(parts)] + [size]


ARRAYS: list[dict[str, Any]] = [
    # a regular 2x4 grid: writer box == shard
    {
        "path": "model/regular",
        "shape": [64, 96],
        "dtype": "float32",
        "seed": 1,
        "boxes": _grid_boxes([_even_cuts(64, 2), _even_cuts(96, 4)]),
        "kind": "regular",
    },
    # tensor parallel x ZeRO with vocabulary padding (ceil splits, clipped edges)
    {
        "path": "model/embed",
        "shape": [30, 50],
        "dtype": "bfloat16",
        "seed": 2,
        "boxes": TensorLayout(partition=(("tp",), ("dp",)), padded=((0, 32),)).all_boxes(
            (30, 50), {"tp": 2, "dp": 4}
        ),
        "kind": "regular",
    },
    # a flat ZeRO shard whose trailing ranks own nothing
    {
        "path": "optim/flat",
        "shape": [9],
        "dtype": "float8_e4m3fn",
        "seed": 3,
        "boxes": TensorLayout(partition=(("dp",),)).all_boxes((9,), {"dp": 8}),
        "kind": "regular",
    },
    # irregular boxes that a common (gcd) grid still fits: shard grid (2, 9)
    {
        "path": "model/gcd",
        "shape": [40, 30],
        "dtype": "int16",
        "seed": 4,
        "boxes": _grid_boxes([[0, 6, 16, 24, 40], [0, 9, 30]]),
        "kind": "regular",
        "grid": [2, 9],
    },
    # so irregular that no grid fits: stored as pieces
    {
        "path": "model/pieces",
        "shape": [4001, 3],
        "dtype": "float64",
        "seed": 5,
        "boxes": _grid_boxes([[0, 1, 500, 1001, 1999, 2500, 3001, 3500, 4001], [0, 3]]),
        "kind": "pieces",
    },
    {
        "path": "model/pieces2d",
        "shape": [2003, 5],
        "dtype": "int32",
        "seed": 6,
        "boxes": _grid_boxes([[0, 1, 700, 1401, 2003], [0, 2, 5]]),
        "kind": "pieces",
    },
    # replicated: written once, by rank 0
    {
        "path": "meta/replicated",
        "shape": [5],
        "dtype": "uint64",
        "seed": 7,
        "boxes": [ShardBox((0,), (5,))],
        "kind": "regular",
    },
    {
        "path": "meta/scalar",
        "shape": [],
        "dtype": "complex64",
        "seed": 8,
        "boxes": [ShardBox((), ())],
        "kind": "scalar",
    },
]
STEP = 42


def _run_writers(ckpt_uri: str, storage_options: dict[str, Any] | None, cwd: Path) -> list[dict[str, Any]]:
    arrays = [{**a, "boxes": [b.to_json() for b in a["boxes"]]} for a in ARRAYS]
    procs = []
    for rank in range(WORLD):
        job = {
            "rank": rank,
            "uri": ckpt_uri,
            "storage_options": storage_options,
            "chunk_bytes": 512,
            "arrays": arrays,
        }
        p = zygote.spawn(
            ["-P", str(PROC)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            text=True,
        )
        assert p.stdin is not None
        p.stdin.write(json.dumps(job))
        p.stdin.close()
        procs.append(p)
    reports = []
    for rank, p in enumerate(procs):
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        assert p.wait(timeout=180) == 0, f"writer {rank} failed:\n{err}"
        reports.append(json.loads(out))
    return reports


def _straddling_boxes(shape: list[int], boxes: list[ShardBox], rng: np.random.Generator) -> list[ShardBox]:
    """Boxes centred on writer-box corners (so they span several writers) plus random ones."""
    out = [ShardBox.whole(shape)]
    for b in boxes:
        if b.is_empty() or not shape:
            continue
        lo = tuple(max(0, o - 2) for o in b.offset)
        hi = tuple(min(s, o + 3) for o, s in zip(b.offset, shape, strict=True))
        out.append(ShardBox(lo, tuple(h - low for low, h in zip(lo, hi, strict=True))))
    for _ in range(12):
        lo = [int(rng.integers(0, s)) if s else 0 for s in shape]
        out.append(
            ShardBox(
                tuple(lo),
                tuple(int(rng.integers(1, s - o + 1)) if s else 0 for o, s in zip(lo, shape, strict=True)),
            )
        )
    if len(shape) == 2:  # a reader in another layout: a 4x2 grid instead of 2x4
        out += _grid_boxes([_even_cuts(shape[0], 4), _even_cuts(shape[1], 2)])
    return out


def test_eight_writer_processes(run_root: tuple[str, dict[str, Any] | None], tmp_path: Path) -> None:
    uri, opts = run_root
    run = Run(open_store(uri, opts))
    ckpt = run.prepare(STEP)
    reports_json = _run_writers(ckpt.url, opts, tmp_path)
    reports = [report_from_json(r) for r in reports_json]
    assert sorted(r.rank for r in reports) == list(range(WORLD))
    state = {"arrays": {a["path"].replace("/", "."): {"$ckptd": "tensor", "path": a["path"]} for a in ARRAYS}}

    # A missing writer is an error, never a silently partial checkpoint.
    for missing in (0, 3, 7):
        with pytest.raises(LayoutError):
            run.commit(STEP, [r for r in reports if r.rank != missing], state=state, world_size=WORLD)
    # A report delivered twice claims every shard twice.
    with pytest.raises(LayoutError):
        run.commit(STEP, [*reports, report_from_json(reports_json[1])], state=state, world_size=WORLD)
    assert run.steps() == []

    m = run.commit(STEP, reports, state=state, world_size=WORLD)
    assert run.steps() == [STEP]
    assert m.writer_count == WORLD
    for a in ARRAYS:
        rec = m.arrays[a["path"]]
        assert rec.kind == a["kind"], a["path"]
        assert list(rec.shape) == a["shape"]
        if "grid" in a:
            assert list(rec.parts[0].grid) == a["grid"]
        if a["kind"] == "pieces":
            assert len(rec.parts) == len(a["boxes"])
        # every non-empty writer box is written by exactly that writer (format v2 derives the shard
        # list from the grid, so the writers' own reports say who wrote what)
        writers = {r.rank for r in reports if a["path"] in r.arrays
                   for p in r.arrays[a["path"]].parts.values() if p.shards}
        assert writers == {r for r, b in enumerate(a["boxes"]) if not b.is_empty() or not a["shape"]}, a[
            "path"
        ]
    assert run.verify(STEP) == []

    reader = run.reader(STEP)
    rng = np.random.default_rng(0)
    for a in ARRAYS:
        full = full_array(a["shape"], a["dtype"], a["seed"])
        for box in _straddling_boxes(a["shape"], a["boxes"], rng):
            assert_bits_equal(
                reader.read(a["path"], box), full[box.slices()].contiguous(), f"{a['path']} {box}"
            )

    loaded: dict[str, Any] = {}
    assert ckptd.load(loaded, uri, storage_options=opts) == STEP
    for a in ARRAYS:
        assert_bits_equal(
            loaded["arrays"][a["path"].replace("/", ".")],
            full_array(a["shape"], a["dtype"], a["seed"]),
            a["path"],
        )
