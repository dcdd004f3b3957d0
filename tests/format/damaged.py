"""A small but complete damaged-checkpoint fixture set, shared by the integrity and hostile-manifest
tests: two writers, a compressed array, pieces and a 0-d array; helpers to run the CLI and flip bytes."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fmt_helpers import random_bits

import ckptd
from ckptd.cli.main import main as cli_main
from ckptd.format import (
    CheckpointError,
    CheckpointWriter,
    CodecSpec,
    IntegrityError,
    Run,
    ShardBox,
)
from ckptd.format.codecs import crc32c
from ckptd.format.commit import commit
from ckptd.storage import LocalStore

STEP = 5
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- a small but complete checkpoint


def expected() -> dict[str, torch.Tensor]:
    return {
        "w": random_bits((12, 10), torch.float32, seed=1),  # 2 writers, 2 shards of 3 chunks
        "zstd/x": torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).bfloat16(),
        "p": random_bits((1500, 1), torch.float32, seed=3),  # pieces
        "s": torch.tensor(-12345, dtype=torch.int64),  # 0-d
    }


def build_checkpoint(root: Path, *, version: int = 2) -> None:
    """The checkpoint at ``STEP``: as ckptd writes it today (format v2), or as a format v1 fixture
    (data at the step directory's root, one self-contained manifest) to keep the v1 reader honest."""
    exp = expected()
    run = Run(LocalStore(root))
    ckpt = run.prepare(STEP) if version == 2 else run.checkpoint_store(STEP)
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
    reports = [w0.finish(), w1.finish(), wz.finish()]
    if version == 2:
        m = run.commit(STEP, reports, state=state, world_size=3)
        assert m.format_version == 2 and m.attempt
        assert m.totals is not None and m.totals.writers == 3
    else:
        m = commit(run.checkpoint_store(STEP), step=STEP, reports=reports, state=state, world_size=3)
        assert m.format_version == 1 and not m.attempt
        assert len(m.arrays["w"].parts[0].shards) == 2
    assert m.arrays["p"].kind == "pieces" and m.arrays["s"].kind == "scalar"
    assert m.arrays["w"].parts[0].ncells == 2


def cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main(list(args))
        except SystemExit as e:  # argparse errors
            rc = int(e.code or 0)
    return rc, out.getvalue() + err.getvalue()


def flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def exercise(root: Path) -> list[BaseException]:
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
    rc, text = cli("verify", str(root), "--step", str(STEP))
    assert "Traceback" not in text
    if rc == 0:
        assert not errors or all(isinstance(e, IntegrityError | CheckpointError) for e in errors)
    return errors


# ---------------------------------------------------------------------- sealed documents, forged


def unseal(raw: bytes) -> bytes:
    """A sealed document without its seal member (what an editor that drops it would leave)."""
    m = re.search(rb',"crc32c":\d+\}\s*$', raw)
    assert m is not None, raw[-40:]
    return raw[: m.start()] + b"}"


def reseal(body: bytes) -> bytes:
    """``body`` with a valid seal appended, whatever it holds: the hostile-document tests forge
    seals so that what they check is the parser behind the seal, not the seal itself."""
    head = body[:-1] if body.endswith(b"}") else body
    return head + b',"crc32c":' + str(crc32c(head + b"}")).encode() + b"}"


def sealed_json(doc: Any) -> bytes:
    """``doc`` (its old seal member dropped) as JSON with NaN/Infinity allowed, sealed."""
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k != "crc32c"}
    return reseal(json.dumps(doc, separators=(",", ":")).encode())


def load_doc(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    doc.pop("crc32c")
    return doc
