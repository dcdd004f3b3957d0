"""Format v2: hostile commit records, array table pages, state trees and rank objects produce a
``CheckpointError`` — never another exception, never a read or write outside the run root.

Each mutated document gets a forged seal and the commit record forged pins (size, crc32c) of
the pages and state it names, so what is checked is the parser behind them; the ``verbatim``
cases damage the seals and pins themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from confine import confined_to
from damaged import STEP, exercise, expected, load_doc, reseal, sealed_json, unseal
from fmt_helpers import assert_bits_equal

import ckptd
from ckptd.format import (
    CheckpointError,
    IntegrityError,
    MetadataError,
    Run,
    UnsafeNameError,
    UnsupportedFormatError,
)
from ckptd.format.codecs import crc32c
from ckptd.format.commit_record import MAX_RANK_OBJECT_BYTES, MAX_RECORD_BYTES
from ckptd.format.run import step_dir
from ckptd.storage import LocalStore

Docs = dict[str, Any]  # {"record": {...}, "pages": [{...}, ...], "state": {...}}
OTHER_ATTEMPT = "a-0123456789abcdef"


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Docs], None]
    error: type[CheckpointError]
    verbatim: tuple[str, Callable[[bytes], bytes]] | None = None  # ("record" | "page" | "state", damage)
    repin: bool = True


def _set(doc: str, path: list[Any], value: Any) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        node = docs[doc] if doc != "page" else docs["pages"][0]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return mutate


def _pages(swap: bool) -> Callable[[Docs], None]:
    """Split the one table page in two (in order, or listed in the wrong order)."""

    def mutate(docs: Docs) -> None:
        page = docs["pages"][0]
        names = sorted(page["arrays"])
        halves = [names[:2], names[2:]]
        if swap:
            halves.reverse()
        docs["pages"] = [{**page, "page": i, "arrays": {n: page["arrays"][n] for n in h}}
                         for i, h in enumerate(halves)]
        docs["record"]["tables"] = [{"first": h[0], "last": h[-1], "arrays": len(h), "size": 0, "crc32c": 0}
                                    for h in halves]

    return mutate


def _rename_everywhere(new: str) -> Callable[[Docs], None]:
    """Rename array ``w`` consistently (page, table entry, state): only the name is hostile."""

    def mutate(docs: Docs) -> None:
        arrays = docs["pages"][0]["arrays"]
        arrays[new] = arrays.pop("w")
        names = sorted(arrays)
        docs["record"]["tables"][0].update(first=names[0], last=names[-1])
        docs["state"]["state"]["model"]["w"]["path"] = new

    return mutate


def _nothing(docs: Docs) -> None:
    pass


_PAGE_W = ["arrays", "w"]
_DEEP = b"[" * 200_000 + b"]" * 200_000
CASES = [
    # the commit record
    Case("record seal removed", _nothing, IntegrityError, ("record", unseal)),
    Case("record truncated", _nothing, IntegrityError, ("record", lambda raw: raw[: len(raw) // 2])),
    Case("record empty", _nothing, IntegrityError, ("record", lambda raw: b"")),
    Case("record sealed but truncated", _nothing, MetadataError, ("record", lambda raw: reseal(raw[:80]))),
    Case("record sealed but not an object", _nothing, MetadataError,
         ("record", lambda raw: reseal(b"[1, 2"))),
    Case("record deeply nested", _nothing, MetadataError,
         ("record", lambda raw: reseal(unseal(raw)[:-1] + b',"x":' + _DEEP + b"}"))),
    Case("record oversize", _set("record", ["metadata", "pad"], "x" * (MAX_RECORD_BYTES + 1)), MetadataError),
    Case("future format version", _set("record", ["format_version"], 3), UnsupportedFormatError),
    Case("not a ckptd record", _set("record", ["format"], "torch"), MetadataError),
    Case("attempt missing", lambda d: d["record"].pop("attempt"), MetadataError),
    Case("attempt is a number", _set("record", ["attempt"], 7), MetadataError),
    Case("attempt escapes", _set("record", ["attempt"], "../../secret"), MetadataError),
    Case("attempt not hex", _set("record", ["attempt"], "a-0123456789abcdeg"), MetadataError),
    Case("attempt of nothing", _set("record", ["attempt"], OTHER_ATTEMPT), IntegrityError),
    Case("step is a string", _set("record", ["step"], "5"), MetadataError),
    Case("step is a float", _set("record", ["step"], 5.0), MetadataError),
    Case("step is a bool", _set("record", ["step"], True), MetadataError),
    Case("NaN step", _set("record", ["step"], float("nan")), MetadataError),
    Case("negative step", _set("record", ["step"], -1), MetadataError),
    Case("step disagrees with directory", _set("record", ["step"], 6), CheckpointError),
    Case("world size zero", _set("record", ["world_size"], 0), MetadataError),
    Case("mesh axis with a slash", _set("record", ["mesh"], {"a/b": 2}), MetadataError),
    Case("metadata is a list", _set("record", ["metadata"], []), MetadataError),
    Case("rank_state is a string", _set("record", ["rank_state"], "yes"), MetadataError),
    Case("totals missing", lambda d: d["record"].pop("totals"), MetadataError),
    Case("negative total", _set("record", ["totals", "nbytes"], -1), MetadataError),
    Case("totals disagree with the pages", _set("record", ["totals", "arrays"], 5), MetadataError),
    Case("tables is an object", _set("record", ["tables"], {}), MetadataError),
    Case("no table pages", _set("record", ["tables"], []), MetadataError),
    Case("table entry first after last", _set("record", ["tables", 0, "first"], "zzz"), MetadataError),
    Case("table entry with zero arrays", _set("record", ["tables", 0, "arrays"], 0), MetadataError),
    Case("table entry name escapes", _set("record", ["tables", 0, "first"], "../p"), UnsafeNameError),
    Case("table page pinned wrong", _set("record", ["tables", 0, "crc32c"], 1), IntegrityError, repin=False),
    Case("table page size pinned wrong", _set("record", ["tables", 0, "size"], 3), IntegrityError,
         repin=False),
    Case("table page size above the limit", _set("record", ["tables", 0, "size"], 2**40), MetadataError,
         repin=False),
    Case("state pinned wrong", _set("record", ["state", "crc32c"], 1), IntegrityError, repin=False),
    Case("state size is a string", _set("record", ["state", "size"], "249"), MetadataError, repin=False),
    Case("state size above the limit", _set("record", ["state", "size"], 2**40), MetadataError, repin=False),
    Case("table pages out of order", _pages(swap=True), MetadataError),
    # array table pages
    Case("page seal removed", _nothing, IntegrityError, ("page", unseal)),
    Case("page empty", _nothing, IntegrityError, ("page", lambda raw: b""), repin=False),
    Case("page sealed but truncated", _nothing, MetadataError, ("page", lambda raw: reseal(raw[:100]))),
    Case("page of another attempt", _set("page", ["attempt"], OTHER_ATTEMPT), IntegrityError),
    Case("page numbered as another page", _set("page", ["page"], 1), IntegrityError),
    Case("page lacks an array of its entry", lambda d: d["pages"][0]["arrays"].pop("s"), IntegrityError),
    Case("page holds an array outside its entry",
         lambda d: d["pages"][0]["arrays"].__setitem__("zz", d["pages"][0]["arrays"]["s"]), IntegrityError),
    Case("page arrays is a list", _set("page", ["arrays"], []), MetadataError),
    Case("array is null", _set("page", _PAGE_W, None), MetadataError),
    Case("unknown dtype", _set("page", [*_PAGE_W, "dtype"], "__class__"), MetadataError),
    Case("negative shape", _set("page", [*_PAGE_W, "shape"], [-12, 10]), MetadataError),
    Case("huge shape", _set("page", [*_PAGE_W, "shape"], [2**40, 2**40]), MetadataError),
    Case("too many dims", _set("page", [*_PAGE_W, "shape"], [1] * 100), MetadataError),
    Case("unknown kind", _set("page", [*_PAGE_W, "kind"], "evil"), MetadataError),
    Case("part shape disagrees", _set("page", [*_PAGE_W, "parts", 0, "shape"], [12, 11]), MetadataError),
    Case("chunks do not divide shards", _set("page", [*_PAGE_W, "parts", 0, "chunks"], [4, 10]),
         MetadataError),
    Case("zero chunk", _set("page", [*_PAGE_W, "parts", 0, "chunks"], [0, 10]), MetadataError),
    Case("codec unknown", _set("page", [*_PAGE_W, "codec", "compressor"], "pickle"), MetadataError),
    Case("layout alias escapes",
         _set("page", [*_PAGE_W, "layout"], {"partition": [], "alias_of": "../../secret"}), MetadataError),
    Case("pieces leave a gap", lambda d: d["pages"][0]["arrays"]["p"]["parts"].pop(0), CheckpointError),
    Case("grid disagrees with stored shards", _set("page", [*_PAGE_W, "parts", 0, "grid"], [4, 10]),
         IntegrityError),
    Case("array name escapes", _rename_everywhere("../../secret"), UnsafeNameError),
    Case("array name absolute", _rename_everywhere("/etc/passwd"), UnsafeNameError),
    Case("array name reserved", _rename_everywhere("zarr.json"), UnsafeNameError),
    # the state tree
    Case("state seal removed", _nothing, IntegrityError, ("state", unseal)),
    Case("state of another attempt", _set("state", ["attempt"], OTHER_ATTEMPT), IntegrityError),
    Case("state is a list", _set("state", ["state"], []), MetadataError),
    Case("NaN in state", _set("state", ["state", "lr"], float("nan")), MetadataError),
    Case("deep state", _set("state", ["state", "deep"], json.loads("[" * 900 + "]" * 900)), MetadataError),
    Case("state refers outside", _set("state", ["state", "model", "w", "path"], "../../secret"),
         UnsafeNameError),
    Case("state refers to a missing array", _set("state", ["state", "s", "path"], "nope"), CheckpointError),
    Case("unknown state tag", _set("state", ["state", "x"], {"$ckptd": "pickle", "data": "gASV"}),
         MetadataError),
]


def apply(root: Path, case: Case) -> None:
    record_path = root / step_dir(STEP) / "manifest.json"
    rec = load_doc(record_path)
    meta = root / step_dir(STEP) / f"{rec['attempt']}.meta"
    tables, state_path = meta / "tables", meta / "state.json"
    docs: Docs = {"record": rec, "pages": [load_doc(tables / "t-00000.json")], "state": load_doc(state_path)}
    case.mutate(docs)
    raws = {"page": [sealed_json(p) for p in docs["pages"]], "state": sealed_json(docs["state"])}
    if case.verbatim is not None and case.verbatim[0] == "page":
        raws["page"][0] = case.verbatim[1](raws["page"][0])
    if case.verbatim is not None and case.verbatim[0] == "state":
        raws["state"] = case.verbatim[1](raws["state"])
    if case.repin:
        for entry, raw in zip(rec["tables"] if isinstance(rec.get("tables"), list) else [], raws["page"],
                              strict=False):
            entry.update(size=len(raw), crc32c=crc32c(raw))
        rec["state"] = {"size": len(raws["state"]), "crc32c": crc32c(raws["state"])}
    for old in tables.iterdir():
        old.unlink()
    for i, raw in enumerate(raws["page"]):
        (tables / f"t-{i:05d}.json").write_bytes(raw)
    state_path.write_bytes(raws["state"])
    record = sealed_json(rec)
    if case.verbatim is not None and case.verbatim[0] == "record":
        record = case.verbatim[1](record)
    record_path.write_bytes(record)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_commit_record(root: Path, case: Case) -> None:
    apply(root, case)
    outer = root.parent
    before = {p: p.read_bytes() for p in outer.rglob("*") if p.is_file()}
    with confined_to(root):
        errors = exercise(root)
        run = Run(LocalStore(root))
        assert STEP in run.steps()
        with pytest.raises(ckptd.CheckpointExistsError):
            ckptd.save({"w": torch.ones(2)}, str(root), step=STEP)
    assert errors, f"{case.name}: accepted without any error"
    assert any(isinstance(e, case.error) for e in errors), (case.name, errors)
    assert (outer / "secret").read_bytes() == b"do not touch"
    after = {p: p.read_bytes() for p in outer.rglob("*") if p.is_file()}
    assert after == before, f"{case.name}: files changed"

    with confined_to(root):
        ckptd.save({"w": torch.ones(2)}, str(root), step=STEP, overwrite=True)
        Run(LocalStore(root)).delete(STEP)
        Run(LocalStore(root)).gc_uncommitted(min_age_s=0)
    assert sorted(p.name for p in outer.iterdir()) == ["run", "secret"]
    assert list(root.iterdir()) == []


def test_forged_documents_are_read_when_consistent(root: Path) -> None:
    """The forging above is faithful: re-sealed, re-pinned documents (also split into two pages in
    order) read back bit-exactly, so each hostile case fails for its mutation alone."""
    for case in (Case("unchanged", _nothing, CheckpointError), Case("two pages", _pages(swap=False),
                                                                     CheckpointError)):
        apply(root, case)
        run = Run(LocalStore(root))
        assert run.verify(STEP) == [], case.name
        reader = run.reader(STEP)
        for path, want in expected().items():
            assert_bits_equal(reader.read(path), want, f"{case.name}: {path}")
    assert len(Run(LocalStore(root)).manifest(STEP).arrays) == 4


RANK_CASES: list[tuple[str, Callable[[dict[str, Any]], bytes], type[CheckpointError]]] = [
    ("rank object of another attempt", lambda d: sealed_json({**d, "attempt": OTHER_ATTEMPT}),
     IntegrityError),
    ("rank object of another rank", lambda d: sealed_json({**d, "rank": 1}), IntegrityError),
    ("rank object unsealed", lambda d: unseal(sealed_json(d)), IntegrityError),
    ("rank state is a list", lambda d: sealed_json({**d, "state": []}), MetadataError),
    ("rank object sealed but not JSON", lambda d: reseal(b"\xff\xfe{"), MetadataError),
    ("rank object oversize", lambda d: sealed_json({**d, "pad": "x" * MAX_RANK_OBJECT_BYTES}), MetadataError),
]


@pytest.mark.parametrize(("name", "damage", "error"), RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_hostile_rank_object(root: Path, name: str, damage: Callable[[dict[str, Any]], bytes],
                             error: type[CheckpointError]) -> None:
    """What one rank restores alone (its RNG states) is as guarded as the rest."""
    record_path = root / step_dir(STEP) / "manifest.json"
    rec = load_doc(record_path)
    rec["rank_state"] = True
    record_path.write_bytes(sealed_json(rec))
    ranks = root / step_dir(STEP) / f"{rec['attempt']}.meta" / "ranks"
    ranks.mkdir()
    good = {"format": "ckptd-rank", "attempt": rec["attempt"], "rank": 0, "state": {"rng": [1, 2, 3]}}
    (ranks / "r-0000000.json").write_bytes(sealed_json(good))
    run = Run(LocalStore(root))
    m = run.manifest(STEP)
    assert run.rank_state(STEP, 0, m) == {"rng": [1, 2, 3]}
    assert run.rank_state(STEP, 2, m) is None  # rank 2 saved nothing of its own
    (ranks / "r-0000000.json").write_bytes(damage(good))
    with confined_to(root), pytest.raises(error):
        run.rank_state(STEP, 0, m)
