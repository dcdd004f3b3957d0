"""The strict manifest parser at its edges: a format v1 manifest and the array records both format
versions share, every field read back and each refusal with its whole message, ranges at both
ends. Documents are written by hand, as another writer would write them."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from ckptd.format import MetadataError, UnsupportedFormatError, manifest_parse
from ckptd.format import manifest as manifest_module
from ckptd.format.manifest import Manifest, Totals
from ckptd.format.manifest_parse import loads, loads_document, parse, parse_array
from ckptd.format.strict_json import dumps_sealed

CODEC = {"compressor": "none", "level": 1, "shuffle": "byte"}


def regular() -> dict[str, Any]:
    """A 4x6 float32 array in two shards of 2x6 (inner chunks 1x3), written by ranks 0 and 1."""
    return {"dtype": "float32", "storage_dtype": "float32", "shape": [4, 6], "kind": "regular",
            "codec": {"compressor": "zstd", "level": 3, "shuffle": "byte"},
            "layout": {"partition": [["dp"], []]}, "nbytes": 96, "stored_bytes": 96,
            "parts": [{"offset": [0, 0], "shape": [4, 6], "grid": [2, 6], "chunks": [1, 3],
                       "shards": [[[0, 0], 0, 48, 5], [[1, 0], 1, 48, 2**32 - 1]]}]}


def pieces() -> dict[str, Any]:
    """A 5x1 array in two pieces (2 and 3 rows), one shard each."""
    part = {"grid": [8, 1], "chunks": [8, 1]}
    return {"dtype": "int64", "shape": [5, 1], "kind": "pieces", "codec": CODEC, "layout": None, "nbytes": 40,
            "parts": [{**part, "offset": [0, 0], "shape": [2, 1], "shards": [[[0, 0], 0, 16, 1]]},
                      {**part, "offset": [2, 0], "shape": [3, 1], "shards": [[[0, 0], 1, 24, 2]]}]}


def scalar() -> dict[str, Any]:
    return {"dtype": "int64", "shape": [], "kind": "scalar", "codec": CODEC, "layout": None, "nbytes": 8,
            "parts": [{"offset": [], "shape": [], "grid": [], "chunks": [], "shards": [[[], 0, 8, 0]]}]}


def manifest(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": "ckptd", "format_version": 1, "step": 0, "checkpoint_id": "ck", "world_size": 1,
        "created_at": "2026-12-02T00:00:00+00:00", "writers": [0, 1], "mesh": {"dp": 1}, "nbytes": 0,
        "stored_bytes": 0, "arrays": {"w": regular(), "p": pieces(), "s": scalar()}, "state": {"lr": 0.5},
        "metadata": {"note": "x"},
    }
    doc.update(over)
    return doc


def test_a_v1_manifest_reads_back_every_field() -> None:
    m = loads(dumps_sealed(manifest()))
    assert (m.step, m.checkpoint_id, m.created_at, m.world_size) == (0, "ck", "2026-12-02T00:00:00+00:00", 1)
    assert (dict(m.mesh), dict(m.metadata), m.state, m.format_version) == ({"dp": 1}, {"note": "x"},
                                                                           {"lr": 0.5}, 1)
    w, p, s = m.arrays["w"], m.arrays["p"], m.arrays["s"]
    assert (w.dtype.name, w.shape, w.kind) == ("float32", (4, 6), "regular")
    assert (w.codec.compressor, w.codec.level) == ("zstd", 3)
    assert w.layout is not None and w.layout.partition == (("dp",), ())
    assert p.layout is None
    (part,) = w.parts
    assert (part.offset, part.shape, part.grid, part.chunks, part.listed) == ((0, 0), (4, 6), (2, 6), (1, 3),
                                                                              True)
    assert [(r.coords, r.writer, r.nbytes, r.index_crc32c) for r in part.shards] == [
        ((0, 0), 0, 48, 5), ((1, 0), 1, 48, 2**32 - 1)]
    assert [(q.offset, q.shape, [r.writer for r in q.shards]) for q in p.parts] == [
        ((0, 0), (2, 1), [0]), ((2, 0), (3, 1), [1])]
    assert (s.shape, s.kind, s.parts[0].shards[0].nbytes) == ((), "scalar", 8)
    assert m.writers == [0, 1]


def test_a_v2_array_record_lists_no_shards() -> None:
    doc = regular()
    del doc["parts"][0]["shards"]
    rec = parse_array("w", doc, listed=False)
    assert rec.parts[0].listed is False and rec.parts[0].shards == () and rec.parts[0].ncells == 2
    doc["parts"][0]["shards"] = []
    with pytest.raises(MetadataError) as e:
        parse_array("w", doc, listed=False)
    assert str(e.value) == "array w: format v2 derives shards from the grid; none are listed"


@pytest.mark.parametrize(("raw", "error", "message"), [
    (dumps_sealed(manifest(format="torch")), MetadataError, "M: not a ckptd manifest (format='torch')"),
    (dumps_sealed(manifest(format_version=0)), MetadataError, "M: format_version=0 is out of range"),
    (dumps_sealed(manifest(format_version=3)), UnsupportedFormatError,
     "M: checkpoint format version 3 is newer than this ckptd supports (2); upgrade ckptd"),
    (dumps_sealed(manifest(format_version=2)), MetadataError,
     "M: format v2 commit records are read through Run.manifest()"),
])
def test_a_document_of_another_format_or_version_is_refused_with_the_whole_message(
        raw: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as e:
        loads(raw, "M")
    assert str(e.value) == message


def test_the_v1_parser_takes_only_a_v1_object() -> None:
    with pytest.raises(MetadataError) as e:
        parse([])
    assert str(e.value) == "manifest must be a JSON object, got list"
    with pytest.raises(MetadataError) as e:
        parse(manifest(format_version=2))
    assert str(e.value) == "format_version=2 is out of range"
    assert parse(manifest()).format_version == 1


def test_the_document_versions_this_ckptd_reads() -> None:
    assert loads_document(dumps_sealed(manifest(format_version=1)), "M")[0] == 1
    assert loads_document(dumps_sealed(manifest(format_version=2)), "M")[0] == 2


def _drop(key: str) -> dict[str, Any]:
    doc = manifest()
    del doc[key]
    return doc


@pytest.mark.parametrize(("doc", "message"), [
    (manifest(arrays=[]), "arrays must be a JSON object, got list"),
    (manifest(writers=[-1]), "writers=-1 is out of range"),
    (manifest(writers={}), "writers must be a JSON list, got dict"),
    (manifest(nbytes=-1), "nbytes=-1 is out of range"),
    (manifest(stored_bytes=-1), "stored_bytes=-1 is out of range"),
    (manifest(step=-1), "step=-1 is out of range"),
    (_drop("step"), "step must be an integer, got None"),
    (manifest(checkpoint_id=1), "checkpoint_id must be a string, got int"),
    (manifest(created_at=None), "created_at must be a string, got NoneType"),
    (manifest(world_size=0), "world_size=0 is out of range"),
    (_drop("state"), "state must be a JSON object, got NoneType"),
    (manifest(mesh=[]), "mesh must be a JSON object, got list"),
    (manifest(mesh={"dp": 0}), "mesh.dp=0 is out of range"),
    (manifest(metadata=[]), "metadata must be a JSON object, got list"),
])
def test_a_v1_field_out_of_its_range_is_refused_with_the_whole_message(doc: dict[str, Any],
                                                                      message: str) -> None:
    with pytest.raises(MetadataError) as e:
        loads(dumps_sealed(doc), "M")
    assert str(e.value) == f"M: {message}"


def test_the_ends_of_the_v1_ranges_are_accepted() -> None:
    m = loads(dumps_sealed(manifest(writers=[0], nbytes=0, stored_bytes=0, step=0, world_size=1,
                                    mesh={"dp": 1}, arrays={})))
    assert (m.step, m.world_size, dict(m.mesh), len(m.arrays)) == (0, 1, {"dp": 1}, 0)
    absent = manifest(arrays={})
    for key in ("writers", "nbytes", "stored_bytes", "mesh", "metadata"):
        del absent[key]
    m = loads(dumps_sealed(absent))
    assert (dict(m.mesh), dict(m.metadata)) == ({}, {})


def changed(make: Any, path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(make() if callable(make) else make)
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()
P0 = ["parts", 0]
S0 = [*P0, "shards", 0]
ARRAY_CASES = [
    ([], "array w must be a JSON object, got list"),
    (changed(regular, ["dtype"], None), "w.dtype must be a string, got NoneType"),
    (changed(regular, ["storage_dtype"], 5), "w.storage_dtype must be a string, got int"),
    (changed(regular, ["storage_dtype"], "int32"), "array w: storage dtype 'int32' does not store float32"),
    (changed(regular, ["shape"], None), "w.shape must be a JSON list, got NoneType"),
    (changed(regular, ["kind"], "evil"), "array w: unknown kind 'evil'"),
    (changed(regular, ["kind"], _DELETE), "array w: unknown kind None"),
    (changed(regular, ["kind"], "scalar"), "array w: kind 'scalar' does not fit shape [4, 6]"),
    (changed(scalar, ["kind"], "regular"), "array w: kind 'regular' does not fit shape []"),
    (changed(regular, ["nbytes"], -1), "w.nbytes=-1 is out of range"),
    (changed(regular, ["stored_bytes"], -1), "w.stored_bytes=-1 is out of range"),
    (changed(regular, ["nbytes"], 95), "array w: nbytes 95 does not match its shape and dtype"),
    (changed(regular, ["parts"], None), "w.parts must be a JSON list, got NoneType"),
    (changed(regular, ["parts"], []), "array w: a regular array has exactly one part, got 0"),
    ({**regular(), "parts": regular()["parts"] * 2}, "array w: a regular array has exactly one part, got 2"),
    (changed(changed(regular, [*P0, "offset"], [1, 0]), [*P0, "shape"], [3, 6]),
     "array w: a regular array's only part covers the whole array: part 0 is [3, 6] at [1, 0], "
     "the array [4, 6]"),
    (changed(regular, [*P0, "shape"], [3, 6]),
     "array w: a regular array's only part covers the whole array: part 0 is [3, 6] at [0, 0], "
     "the array [4, 6]"),
    (changed(pieces, ["parts", 1, "offset"], [3, 0]),
     "array w: part 1 ([3, 1] at [3, 0]) lies outside shape [5, 1]"),
    ({**pieces(), "parts": pieces()["parts"][1:]}, "array w: its pieces do not tile it: "),
    (changed(regular, P0, 3), "w part must be a JSON object, got int"),
    (changed(regular, [*P0, "offset"], None), "w.offset must be a JSON list, got NoneType"),
    (changed(regular, [*P0, "shape"], None), "w.part.shape must be a JSON list, got NoneType"),
    (changed(regular, [*P0, "grid"], [0, 6]), "w.grid=0 is out of range"),
    (changed(regular, [*P0, "chunks"], [0, 3]), "w.chunks=0 is out of range"),
    (changed(regular, [*P0, "offset"], [0]),
     "array w: offset/shape/grid/chunks disagree in rank with shape [4, 6]"),
    (changed(regular, [*P0, "chunks"], [1, 4]), "array w: inner chunks [1, 4] do not divide shards [2, 6]"),
    (changed(changed(regular, [*P0, "grid"], [2**24 + 1, 1]), [*P0, "chunks"], [1, 1]),
     "array w: more than 2**24 inner chunks per shard"),
    (changed(regular, [*P0, "shards"], None), "w.shards must be a JSON list, got NoneType"),
    (changed(regular, S0, 7), "w shard must be a JSON list, got int"),
    (changed(regular, S0, [[0, 0], 0, 48]), "array w: shard record [[0, 0], 0, 48] must have 4 fields"),
    (changed(regular, [*S0, 0], 0), "w coords must be a JSON list, got int"),
    (changed(regular, [*S0, 0], [-1, 0]), "w shard coordinate=-1 is out of range"),
    (changed(regular, [*S0, 0], [2, 0]), "array w: shard coordinates [2, 0] outside the grid [2, 1]"),
    (changed(regular, [*S0, 0], [0]), "array w: shard coordinates [0] outside the grid [2, 1]"),
    (changed(regular, [*S0, 0], [1, 0]), "array w: shard [1, 0] listed twice"),
    (changed(regular, [*S0, 1], -1), "writer=-1 is out of range"),
    (changed(regular, [*S0, 2], -1), "nbytes=-1 is out of range"),
    (changed(regular, [*S0, 3], -1), "index_crc32c=-1 is out of range"),
    (changed(regular, [*S0, 3], 2**32), "index_crc32c=4294967296 is out of range"),
]


@pytest.mark.parametrize(("doc", "message"), ARRAY_CASES, ids=[m for _, m in ARRAY_CASES])
def test_an_array_record_out_of_its_range_is_refused_with_the_whole_message(doc: Any, message: str) -> None:
    with pytest.raises(MetadataError) as e:
        parse_array("w", doc, listed=True)
    if message.endswith(": "):
        assert str(e.value).startswith(message)
    else:
        assert str(e.value) == message


def test_the_ends_of_the_array_ranges_are_accepted() -> None:
    # a writer's report holds only its own pieces; shard fields at their lower and upper ends
    report = {**pieces(), "parts": pieces()["parts"][1:]}
    assert parse_array("p", report, listed=True, whole=False).parts[0].offset == (2, 0)
    edge = changed(regular, [*P0, "grid"], [1, 6])
    edge["parts"][0]["shards"] = [[[i, 0], 0, 0, 2**32 - 1 - i] for i in range(4)]
    rec = parse_array("w", edge, listed=True)
    assert [(s.coords, s.nbytes, s.index_crc32c) for s in rec.parts[0].shards][-1] == ((3, 0), 0, 2**32 - 4)
    empty = changed(changed(regular, ["shape"], [0, 6]), [*P0, "shape"], [0, 6])
    empty.update(nbytes=0, stored_bytes=0)
    empty["parts"][0]["shards"] = []
    assert parse_array("w", empty, listed=True).shape == (0, 6)
    many = {**pieces(), "shape": [60, 1], "nbytes": 480,
            "parts": [{"offset": [i, 0], "shape": [1, 1], "grid": [1, 1], "chunks": [1, 1],
                       "shards": [[[0, 0], 0, 8, 0]]} for i in range(60)]}
    assert len(parse_array("p", many, listed=True).parts) == 60


@pytest.mark.parametrize(("shape", "grid", "chunks", "refused"), [
    ([4, 6], [2**12, 2**12], [1, 1], None),
    ([2**24, 1], [1, 1], [1, 1], None),
    ([2**24 + 1, 1], [1, 1], [1, 1], "array w: more than 2**24 shards"),
    ([3, 2**23 + 1], [2, 1], [1, 1], "array w: more than 2**24 shards"),
])
def test_the_grid_limits_hold_at_the_count(shape: list[int], grid: list[int], chunks: list[int],
                                           refused: str | None) -> None:
    doc = {"dtype": "uint8", "shape": shape, "kind": "regular", "codec": CODEC, "layout": None,
           "parts": [{"offset": [0, 0], "shape": shape, "grid": grid, "chunks": chunks}]}
    if refused is None:
        assert parse_array("w", doc, listed=False).parts[0].grid == tuple(grid)
    else:
        with pytest.raises(MetadataError) as e:
            parse_array("w", doc, listed=False)
        assert str(e.value) == refused


@pytest.mark.parametrize(("arrays", "message"), [
    ({"p": changed(pieces, ["parts", 0, "shards"], [])}, "array p: every piece has exactly one shard"),
    ({"p": changed(pieces, ["parts", 1], {"offset": [2, 0], "shape": [3, 1], "grid": [1, 1], "chunks": [1, 1],
                                          "shards": [[[0, 0], 1, 8, 2], [[1, 0], 1, 8, 3]]})},
     "array p: every piece has exactly one shard"),
    ({"w": changed(regular, [*P0, "shards"], regular()["parts"][0]["shards"][:1])},
     "array w: the manifest lists 1 of its 2 shards"),
    ({"s": changed(scalar, [*P0, "shards"], [])}, "array s: the manifest lists 0 of its 1 shards"),
    ({"r": {"dtype": "uint8", "shape": [1, 6], "kind": "regular", "codec": CODEC, "layout": None,
            "parts": [{"offset": [0, 0], "shape": [1, 6], "grid": [1, 3], "chunks": [1, 3],
                       "shards": [[[0, 0], 0, 3, 0]]}]}}, "array r: the manifest lists 1 of its 2 shards"),
])
def test_a_v1_array_missing_a_shard_is_refused(arrays: dict[str, Any], message: str) -> None:
    with pytest.raises(MetadataError) as e:
        loads(dumps_sealed(manifest(arrays=arrays)), "M")
    assert str(e.value) == f"M: {message}"


# ---------------------------------------------------------------- the records (format/manifest.py)


def test_a_v1_manifest_writes_back_the_document_it_was_read_from() -> None:
    empty = {"dtype": "uint8", "storage_dtype": "uint8", "shape": [0, 6], "kind": "regular", "codec": CODEC,
             "layout": None, "nbytes": 0, "stored_bytes": 0,
             "parts": [{"offset": [0, 0], "shape": [0, 6], "grid": [2, 6], "chunks": [1, 3], "shards": []}]}
    arrays = {"w": regular(), "p": pieces(), "s": scalar(), "e": empty}
    doc = manifest(nbytes=144, stored_bytes=144, arrays=arrays)
    m = loads(dumps_sealed(doc))
    want = copy.deepcopy(doc)
    want["arrays"]["p"].update(storage_dtype="int64", stored_bytes=40)
    want["arrays"]["s"].update(storage_dtype="int64", stored_bytes=8)
    assert m.to_json() == want
    assert list(m.to_json()["arrays"]) == ["e", "p", "s", "w"]
    assert loads(m.dumps()) == m
    assert (m.nbytes, m.stored_bytes, m.array_count, m.writer_count) == (144, 144, 4, 2)
    w, p = m.arrays["w"], m.arrays["p"]
    assert (w.part_key(0), p.part_key(0), p.part_key(1)) == ("w", "p/piece-00000", "p/piece-00001")
    assert (w.shard_count, p.shard_count, m.arrays["s"].shard_count) == (2, 2, 1)
    assert list(w.parts[0].cells()) == [(0, 0), (1, 0)] and list(m.arrays["s"].parts[0].cells()) == [()]


def test_a_v2_view_derives_shards_from_the_grid_and_reports_its_totals() -> None:
    five_rows = changed(changed(regular, ["shape"], [5, 6]), [*P0, "shape"], [5, 6])
    five_rows.update(nbytes=120)
    del five_rows["parts"][0]["shards"]
    rec = parse_array("w", five_rows, listed=False)
    assert rec.unlisted() is rec
    assert (rec.stored_bytes, rec.shard_count, rec.parts[0].ncells) == (None, 3, 3)
    assert "stored_bytes" not in rec.to_json() and "shards" not in rec.to_json()["parts"][0]
    assert list(rec.parts[0].cells()) == [(0, 0), (1, 0), (2, 0)]
    part = {"offset": [0], "shape": [5], "grid": [2], "chunks": [1]}
    flat = parse_array("v", {"dtype": "uint8", "shape": [5], "kind": "regular", "codec": CODEC,
                             "layout": None, "parts": [part]}, listed=False)
    assert (flat.shard_count, flat.parts[0].ncells, list(flat.parts[0].cells())) == (3, 3, [(0,), (1,), (2,)])
    listed = loads(dumps_sealed(manifest())).arrays["w"].unlisted()
    assert (listed.parts[0].listed, listed.parts[0].shards, listed.shard_count) == (False, (), 2)
    m = Manifest(step=3, checkpoint_id="ck", created_at="t", world_size=4, arrays={"w": rec}, state={},
                 attempt="a-0123456789abcdef", totals=Totals(arrays=1, shards=3, nbytes=120, stored_bytes=99,
                                                             writers=4))
    doc = m.to_json()
    assert (doc["attempt"], doc["totals"], doc["writers"]) == (
        "a-0123456789abcdef", {"arrays": 1, "shards": 3, "nbytes": 120, "stored_bytes": 99, "writers": 4}, 4)
    assert (m.nbytes, m.stored_bytes, m.array_count, m.writer_count) == (120, 99, 1, 4)


def test_a_manifest_built_without_the_optional_fields_has_their_documented_defaults() -> None:
    m = Manifest(step=1, checkpoint_id="ck", created_at="t", world_size=1, arrays={}, state={})
    assert (dict(m.mesh), dict(m.metadata), m.format_version, m.attempt, m.totals, m.rank_state) == (
        {}, {}, 2, "", None, False)
    doc = m.to_json()
    assert (doc["format"], doc["format_version"], doc["writers"], doc["nbytes"], doc["stored_bytes"]) == (
        "ckptd", 2, [], 0, 0)
    assert "attempt" not in doc and "totals" not in doc


def test_records_read_from_a_manifest_cannot_be_changed() -> None:
    m = loads(dumps_sealed(manifest()))
    w = m.arrays["w"]
    totals = Totals(arrays=1, shards=1, nbytes=1, stored_bytes=1, writers=1)
    for record, name in ((m, "step"), (w, "path"), (w.parts[0], "grid"), (w.parts[0].shards[0], "writer"),
                         (totals, "writers")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, 0)
    assert len({w.parts[0].shards[0], w.parts[0].shards[0]}) == 1
    assert hash(totals) == hash(dataclasses.replace(totals))


def test_a_manifest_larger_than_256_mib_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(MetadataError) as e:
        loads_document(b"x" * (256 * 2**20 + 1), "M")
    assert str(e.value) == "M is 268435457 bytes, larger than the 268435456 limit"
    with pytest.raises(MetadataError) as e:
        loads(dumps_sealed(manifest(format="torch")))
    assert str(e.value) == "manifest.json: not a ckptd manifest (format='torch')"


def test_the_parser_is_still_importable_from_its_old_module() -> None:
    for name in ("loads_document", "loads", "with_context", "parse", "parse_mesh", "check_listed_complete",
                 "parse_array", "parse_part"):
        assert getattr(manifest_module, name) is getattr(manifest_parse, name), name
    with pytest.raises(AttributeError) as e:
        manifest_module.nope  # noqa: B018
    assert str(e.value) == "module 'ckptd.format.manifest' has no attribute 'nope'"

