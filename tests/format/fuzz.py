"""A bounded, seeded fuzzer of committed checkpoints (used by test_fuzz_checkpoints.py).

One case = one seed: copy the small but complete checkpoint of ``damaged.build_checkpoint`` (two
writers, zstd, pieces, a 0-d array), damage one of its objects — the commit record, the table
page, the state tree, a ``zarr.json`` or a shard — with byte mutations (flips, truncation,
insertion, splices) or JSON mutations (a value replaced by a hostile one, a member dropped or
added, then re-sealed and re-pinned so that the parsers behind the seals are reached), and run
every reader on it. ``run_case`` returns what each reader raised; the property (checked by the
tests) is that only ``CheckpointError`` escapes, memory stays bounded and no I/O leaves the case.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confine import confined_to
from damaged import STEP, reseal, unseal

import ckptd
from ckptd.cli.main import main as cli_main
from ckptd.converters.reshard import reshard
from ckptd.format import CheckpointError, Run
from ckptd.format.codecs import crc32c
from ckptd.format.run import step_dir
from ckptd.storage import LocalStore

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1.5, 1e308, -0.0, "", "5", "../x",
    "/etc/passwd", "a/../../b", "zarr.json", "nan", "\u0000", "x" * 300, [], [0], [-1, 2], [2**40, 2**40],
    [1] * 40, {}, {"$ckptd": "tensor", "path": "w"}, {"$ckptd": "alias", "path": "nope"},
    {"$ckptd": "float", "value": "1e999"}, {"$ckptd": "dict", "items": [[1, 2, 3]]}, {"a": {"b": {}}},
]  # fmt: skip
MAX_TRACED_BYTES = 256 * 2**20
"""Peak Python/numpy heap of one case (the checkpoint itself is a few KiB)."""


@dataclass
class Outcome:
    seed: int
    target: str
    mutation: str
    errors: dict[str, str] = field(default_factory=dict)
    """reader -> the CheckpointError it raised or its refusal (readers that succeeded are absent)."""
    peak_bytes: int = 0


def targets(run_root: Path) -> dict[str, Path]:
    """What a case may damage, by a stable name."""
    step = run_root / step_dir(STEP)
    record = json.loads((step / "manifest.json").read_bytes())
    data, meta = step / record["attempt"], step / f"{record['attempt']}.meta"
    return {
        "record": step / "manifest.json",
        "page": meta / "tables" / "t-00000.json",
        "state": meta / "state.json",
        "root zarr.json": data / "zarr.json",
        "array zarr.json": data / "w" / "zarr.json",
        "piece zarr.json": data / "p" / "piece-00001" / "zarr.json",
        "shard w": data / "w" / "c.0.0",
        "shard zstd": data / "zstd" / "x" / "c.0.0",
        "shard piece": data / "p" / "piece-00001" / "c.0.0",
        "scalar": data / "s" / "c",
    }


def _byte_mutation(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "insert", "splice", "zero", "empty", "extend"])
    n = len(raw)
    pos = rng.randrange(n) if n else 0
    if kind == "flip" and n:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, raw[:pos]
    if kind == "insert":
        return kind, raw[:pos] + rng.randbytes(rng.randint(1, 64)) + raw[pos:]
    if kind == "splice" and n:
        a, b = sorted((rng.randrange(n), rng.randrange(n)))
        return kind, raw[:a] + raw[b:]
    if kind == "zero":
        return kind, raw[:pos] + bytes(min(64, n - pos)) + raw[pos + 64 :]
    if kind == "extend":
        return kind, raw + rng.randbytes(rng.randint(1, 4096))
    return "empty", b""


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every member and item of a JSON document (its root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out.append((*path, k))
        out.extend(_nodes(v, (*path, k)))
    return out


def _json_mutation(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    try:
        doc = json.loads(unseal(raw))
    except (ValueError, AssertionError):
        return _byte_mutation(rng, raw)
    paths = _nodes(doc)
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    kind = rng.choice(["replace", "replace", "drop", "add"])
    if kind == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[rng.choice(["x", "$ckptd", "crc32c", "shards", "extra"])] = rng.choice(HOSTILE_VALUES)
    else:
        kind = "replace"
        parent[path[-1]] = rng.choice(HOSTILE_VALUES)
    body = json.dumps(doc, separators=(",", ":")).encode()  # NaN/Infinity allowed: the parser must refuse
    return f"json {kind} {'/'.join(map(str, path))}", reseal(body)


def _repin(run_root: Path) -> None:
    """Make the commit record name the (possibly damaged) page and state by size and crc32c, so that
    their parsers are reached; the record stays as it is if it no longer parses."""
    t = targets(run_root)
    try:
        rec = json.loads(unseal(t["record"].read_bytes()))
        page, state = t["page"].read_bytes(), t["state"].read_bytes()
        rec["tables"][0].update(size=len(page), crc32c=crc32c(page))
        rec["state"] = {"size": len(state), "crc32c": crc32c(state)}
    except (ValueError, AssertionError, KeyError, IndexError, TypeError, AttributeError):
        return
    t["record"].write_bytes(reseal(json.dumps(rec, separators=(",", ":")).encode()))


def mutate(run_root: Path, seed: int) -> tuple[str, str]:
    """Damage one object of the checkpoint at ``run_root``; returns (target, mutation)."""
    rng = random.Random(seed)
    name, path = rng.choice(sorted(targets(run_root).items()))
    raw = path.read_bytes()
    json_doc = path.name.endswith(".json")
    kind, damaged = _json_mutation(rng, raw) if json_doc and rng.random() < 0.7 else _byte_mutation(rng, raw)
    path.write_bytes(damaged)
    if name in ("page", "state") and rng.random() < 0.8:
        _repin(run_root)
    return name, kind


class Refused(Exception):
    """A reader's verdict that is not an exception: verify's problems, a CLI exit status of 1 or 2."""


def _cli(*args: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli_main(list(args))
    if rc not in (0, 1, 2):
        raise AssertionError(f"ckptd {' '.join(args)} exited {rc}: {out.getvalue()[-500:]}")
    if rc:
        raise Refused(f"exit {rc}: {out.getvalue()[-300:]}")


def _verify(run: Run) -> None:
    problems = run.verify(STEP)
    if problems:
        raise Refused(f"{len(problems)} problem(s), e.g. {problems[0]}")


def readers(case: Path) -> dict[str, Callable[[], Any]]:
    """Every way a user reads a checkpoint, each confined to ``case``."""
    root, out = case / "run", case / "out"
    run = Run(LocalStore(root))

    def read_every_array() -> None:
        reader = run.reader(STEP)
        for path in list(reader.manifest.arrays):
            reader.read(path)

    return {
        "steps/latest": lambda: (run.steps(), run.latest()),
        "manifest": lambda: run.manifest(STEP),
        "ckptd.load": lambda: ckptd.load({}, str(root)),
        "reader.read": read_every_array,
        "verify": lambda: _verify(run),
        "reshard": lambda: reshard(run, Run(LocalStore(out / "resharded")), mesh={"tp": 2}),
        "cli ls": lambda: _cli("ls", str(root)),
        "cli inspect": lambda: _cli("inspect", "--json", str(root)),
        "cli verify": lambda: _cli("verify", "--quiet", str(root)),
        "cli convert": lambda: _cli("convert", str(root), str(out / "converted"), "--mesh", "dp=2",
                                    "--quiet"),
    }


def run_case(template: Path, work: Path, seed: int) -> Outcome:
    """Copy, damage and read one case under ``work``; raises anything but a ``CheckpointError``."""
    case = work / f"case-{seed}"
    shutil.copytree(template, case / "run")
    target, mutation = mutate(case / "run", seed)
    outcome = Outcome(seed, target, mutation)
    tracemalloc.start()
    try:
        with confined_to(case):
            for name, read in readers(case).items():
                try:
                    read()
                except (CheckpointError, Refused) as e:
                    outcome.errors[name] = f"{type(e).__name__}: {e}"
        outcome.peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        shutil.rmtree(case, ignore_errors=True)
    return outcome
