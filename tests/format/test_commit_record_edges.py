"""Format v2 metadata documents at their edges: every field of the commit record read back, each
refusal with its whole message, the ranges of SPEC §8 at both ends, pinned objects, per-rank state
and the lazy array table. Documents are written by hand (as another writer would), so each case
is exactly the document it names; the hostile-record tests cover the same parsers end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptd.format import IntegrityError, MetadataError
from ckptd.format.codecs import crc32c
from ckptd.format.commit_record import (
    MAX_PAGE_BYTES,
    MAX_STATE_BYTES,
    BlobRef,
    encode_rank_state,
    encode_state,
    load_manifest,
    load_rank_state,
    meta_key,
    page_key,
    parse_record,
    rank_key,
    read_pinned,
)
from ckptd.format.manifest import Totals
from ckptd.format.strict_json import dumps_sealed
from ckptd.storage import LocalStore

ATTEMPT = "a-0123456789abcdef"
WHERE = "rec"


def array_doc(n: int) -> dict[str, Any]:
    return {"dtype": "float32", "storage_dtype": "float32", "shape": [n], "kind": "regular",
            "codec": {"compressor": "none", "level": 1, "shuffle": "byte"}, "layout": None,
            "nbytes": 4 * n, "parts": [{"offset": [0], "shape": [n], "grid": [n], "chunks": [n]}]}


def record(**over: Any) -> dict[str, Any]:
    """A valid record of no arrays (or of the pages ``tables`` names, with matching totals)."""
    doc: dict[str, Any] = {
        "format": "ckptd", "format_version": 2, "step": 7, "checkpoint_id": "ck-7", "attempt": ATTEMPT,
        "created_at": "2026-12-02T00:00:00+00:00", "world_size": 3, "mesh": {"dp": 3},
        "totals": {"arrays": 0, "shards": 1, "nbytes": 2, "stored_bytes": 3, "writers": 4},
        "tables": [], "state": {"size": 2, "crc32c": 0}, "rank_state": True, "metadata": {"lr": 0.5},
    }
    doc.update(over)
    return doc


def page(first: str, last: str, arrays: int, size: int = 2, crc: int = 0) -> dict[str, Any]:
    return {"first": first, "last": last, "arrays": arrays, "size": size, "crc32c": crc}


def with_pages(*pages: dict[str, Any]) -> dict[str, Any]:
    totals = {**record()["totals"], "arrays": sum(p["arrays"] for p in pages if isinstance(p["arrays"], int))}
    return record(tables=list(pages), totals=totals)


def refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(MetadataError) as e:
        parse_record(doc, WHERE)
    assert str(e.value) == f"{WHERE}: {message}"


def put_state(store: LocalStore, raw: bytes, attempt: str = ATTEMPT) -> dict[str, Any]:
    store.write(meta_key(attempt, "state.json"), [raw])
    return {"size": len(raw), "crc32c": crc32c(raw)}


def test_every_field_of_the_record_reads_back(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    pin = put_state(store, encode_state(ATTEMPT, {"lr": 0.25, "epoch": 3}))
    m = load_manifest(store, record(state=pin), WHERE)
    assert (m.step, m.checkpoint_id, m.created_at) == (7, "ck-7", "2026-12-02T00:00:00+00:00")
    assert (m.world_size, dict(m.mesh), dict(m.metadata)) == (3, {"dp": 3}, {"lr": 0.5})
    assert (m.format_version, m.attempt) == (2, ATTEMPT)
    assert m.totals == Totals(arrays=0, shards=1, nbytes=2, stored_bytes=3, writers=4)
    assert m.rank_state is True
    assert m.state == {"lr": 0.25, "epoch": 3}
    assert len(m.arrays) == 0 and list(m.arrays) == []
    assert load_manifest(store, record(state=pin, rank_state=False), WHERE).rank_state is False
    assert load_manifest(store, record(state=pin, rank_state="array"), WHERE).rank_state == "array"


@pytest.mark.parametrize(("change", "message"), [
    ({"attempt": None}, "attempt must be a string, got NoneType"),
    ({"totals": []}, "totals must be a JSON object, got list"),
    ({"totals": {**record()["totals"], "nbytes": -1}}, "totals.nbytes=-1 is out of range"),
    ({"tables": None}, "tables must be a JSON list, got NoneType"),
    ({"state": None}, "state must be a JSON object, got NoneType"),
    ({"state": {"crc32c": 0}}, "state.size must be an integer, got None"),
    ({"state": {"size": 1, "crc32c": 0}}, "state.size=1 is out of range"),
    ({"state": {"size": MAX_STATE_BYTES + 1, "crc32c": 0}}, "state.size=134217729 is out of range"),
    ({"state": {"size": 2}}, "state.crc32c must be an integer, got None"),
    ({"state": {"size": 2, "crc32c": 2**32}}, "state.crc32c=4294967296 is out of range"),
    ({"rank_state": None}, 'rank_state must be true, false or "array"'),
    ({"rank_state": "Array"}, 'rank_state must be true, false or "array"'),
    ({"rank_state": 1}, 'rank_state must be true, false or "array"'),
    ({"step": -1}, "step=-1 is out of range"),
    ({"step": 10**10}, "step=10000000000 is out of range"),
    ({"checkpoint_id": 5}, "checkpoint_id must be a string, got int"),
    ({"created_at": None}, "created_at must be a string, got NoneType"),
    ({"world_size": 0}, "world_size=0 is out of range"),
    ({"world_size": 2**31 + 1}, "world_size=2147483649 is out of range"),
    ({"metadata": []}, "metadata must be a JSON object, got list"),
    ({"tables": [7]}, "table page must be a JSON object, got int"),
])
def test_a_record_field_out_of_its_range_is_refused_with_the_whole_message(change: dict[str, Any],
                                                                         message: str) -> None:
    refused(record(**change), message)


@pytest.mark.parametrize("change", [
    {"step": 0}, {"step": 10**10 - 1}, {"world_size": 1}, {"world_size": 2**31},
    {"state": {"size": 2, "crc32c": 0}}, {"state": {"size": MAX_STATE_BYTES, "crc32c": 2**32 - 1}},
], ids=str)
def test_the_ends_of_each_range_are_accepted(change: dict[str, Any]) -> None:
    r = parse_record(record(**change), WHERE)
    for key, value in change.items():
        got = r.manifest_fields[key] if key != "state" else {"size": r.state.size, "crc32c": r.state.crc32c}
        assert got == value


@pytest.mark.parametrize(("pages", "message"), [
    ([page("a", "b", 1), page("b", "d", 1)], "table pages are not sorted and disjoint ('b' >= 'b')"),
    ([page("b", "a", 1)], "table page 'b'..'a' is empty"),
    ([{**page("a", "b", 1), "first": None}], "table page first must be a string, got NoneType"),
    ([{**page("a", "b", 1), "last": 3}], "table page last must be a string, got int"),
    ([{**page("a", "b", 1), "arrays": None}], "table page arrays must be an integer, got None"),
    ([page("a", "b", 4097)], "table page arrays=4097 is out of range"),
    ([{**page("a", "b", 1), "size": None}], "table page size must be an integer, got None"),
    ([page("a", "b", 1, size=MAX_PAGE_BYTES + 1)], "table page size=8388609 is out of range"),
    ([{**page("a", "b", 1), "crc32c": None}], "table page crc32c must be an integer, got None"),
    ([page("a", "b", 1, crc=2**32)], "table page crc32c=4294967296 is out of range"),
])
def test_a_table_entry_out_of_its_range_is_refused_with_the_whole_message(pages: list[dict[str, Any]],
                                                                         message: str) -> None:
    refused(with_pages(*pages), message)


def test_table_entries_at_the_ends_of_their_ranges_are_accepted() -> None:
    entries = [page("a", "a", 1, size=2, crc=0), page("b", "d", 4096, size=MAX_PAGE_BYTES, crc=2**32 - 1)]
    r = parse_record(with_pages(*entries), WHERE)
    assert [(p.first, p.last, p.arrays, p.size, p.crc32c) for p in r.pages] == [
        ("a", "a", 1, 2, 0), ("b", "d", 4096, MAX_PAGE_BYTES, 2**32 - 1)]


def test_totals_that_disagree_with_the_pages_are_refused_with_the_counts() -> None:
    doc = with_pages(page("a", "b", 2))
    doc["totals"]["arrays"] = 3
    refused(doc, "the table pages hold 2 arrays, totals say 3")


# ---------------------------------------------------------------- pinned objects and the state tree


def test_a_pinned_object_missing_or_different_is_named_with_its_key(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    key = meta_key(ATTEMPT, "state.json")
    with pytest.raises(IntegrityError) as e:
        read_pinned(store, key, BlobRef(10, 0), "the state tree")
    assert str(e.value) == f"the state tree ({store.url}/{key}) is missing"
    store.write(key, [b"0123456789"])
    good = crc32c(b"0123456789")
    assert read_pinned(store, key, BlobRef(10, good), "x") == b"0123456789"
    for ref in (BlobRef(10, good ^ 1), BlobRef(9, crc32c(b"012345678")), BlobRef(8, crc32c(b"01234567"))):
        with pytest.raises(IntegrityError) as e:
            read_pinned(store, key, ref, "the state tree")
        assert str(e.value) == f"the state tree ({store.url}/{key}) does not match the commit record"


def test_a_state_tree_that_does_not_match_its_pin_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    pin = put_state(store, encode_state(ATTEMPT, {"lr": 1}))
    with pytest.raises(IntegrityError) as e:
        load_manifest(store, record(state={**pin, "crc32c": pin["crc32c"] ^ 1}), WHERE)
    key = meta_key(ATTEMPT, "state.json")
    assert str(e.value) == f"the state tree ({store.url}/{key}) does not match the commit record"


@pytest.mark.parametrize(("state_doc", "error", "message"), [
    ({"format": "ckptd-state", "attempt": "a-ffffffffffffffff", "state": {}}, IntegrityError,
     "rec: the state tree belongs to another attempt"),
    ({"format": "ckptd-state", "attempt": ATTEMPT}, MetadataError,
     "rec state must be a JSON object, got NoneType"),
])
def test_a_state_tree_of_another_attempt_or_without_state_is_refused(
        tmp_path: Path, state_doc: dict[str, Any], error: type[Exception], message: str) -> None:
    store = LocalStore(tmp_path)
    pin = put_state(store, dumps_sealed(state_doc))
    with pytest.raises(error) as e:
        load_manifest(store, record(state=pin), WHERE)
    assert str(e.value) == message


def test_an_unsealed_state_tree_is_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    pin = put_state(store, json.dumps({"attempt": ATTEMPT, "state": {}}).encode())
    with pytest.raises(IntegrityError, match=r"^rec state tree: not sealed "):
        load_manifest(store, record(state=pin), WHERE)


# ---------------------------------------------------------------- per-rank state


def test_rank_state_round_trips_in_the_documented_form(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    state = {"rng": list(range(300)), "name": "x" * 1000}
    raw = encode_rank_state(ATTEMPT, 3, state)
    assert json.loads(raw) == {"format": "ckptd-rank", "attempt": ATTEMPT, "rank": 3, "state": state,
                               "crc32c": json.loads(raw)["crc32c"]}
    store.write(rank_key(ATTEMPT, 3), [raw])
    assert load_rank_state(store, ATTEMPT, 3, WHERE) == state
    assert load_rank_state(store, ATTEMPT, 2, WHERE) is None


@pytest.mark.parametrize(("doc", "error", "message"), [
    ({"format": "ckptd-rank", "attempt": ATTEMPT, "rank": 4, "state": {}}, IntegrityError,
     f"rec: {ATTEMPT}.meta/ranks/r-0000003.json belongs to another attempt or rank"),
    ({"format": "ckptd-rank", "attempt": "a-ffffffffffffffff", "rank": 3, "state": {}}, IntegrityError,
     f"rec: {ATTEMPT}.meta/ranks/r-0000003.json belongs to another attempt or rank"),
    ({"format": "ckptd-rank", "attempt": ATTEMPT, "rank": 3, "state": [1]}, MetadataError,
     "rec rank 3 state must be a JSON object, got list"),
])
def test_a_rank_object_of_another_rank_or_shape_is_refused_with_the_whole_message(
        tmp_path: Path, doc: dict[str, Any], error: type[Exception], message: str) -> None:
    store = LocalStore(tmp_path)
    store.write(rank_key(ATTEMPT, 3), [dumps_sealed(doc)])
    with pytest.raises(error) as e:
        load_rank_state(store, ATTEMPT, 3, WHERE)
    assert str(e.value) == message


def test_an_unsealed_rank_object_is_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write(rank_key(ATTEMPT, 3), [json.dumps({"attempt": ATTEMPT, "rank": 3, "state": {}}).encode()])
    with pytest.raises(IntegrityError, match=r"^rec rank 3 state: not sealed "):
        load_rank_state(store, ATTEMPT, 3, WHERE)


# ---------------------------------------------------------------- the lazy array table


def page_doc(index: int, arrays: dict[str, Any], attempt: str = ATTEMPT) -> dict[str, Any]:
    return {"format": "ckptd-arrays", "attempt": attempt, "page": index, "arrays": arrays}


def two_page_checkpoint(store: LocalStore, page0: dict[str, Any] | None = None) -> tuple[Any, list[int]]:
    """Arrays a, b on page 0 and m on page 1; returns the manifest and the pages' sizes."""
    docs = [page0 or page_doc(0, {"a": array_doc(2), "b": array_doc(3)}), page_doc(1, {"m": array_doc(1)})]
    entries, sizes = [], []
    for i, (doc, (first, last, n)) in enumerate(zip(docs, [("a", "b", 2), ("m", "m", 1)], strict=True)):
        raw = dumps_sealed(doc)
        store.write(page_key(ATTEMPT, i), [raw])
        entries.append(page(first, last, n, size=len(raw), crc=crc32c(raw)))
        sizes.append(len(raw))
    pin = put_state(store, encode_state(ATTEMPT, {}))
    return load_manifest(store, {**with_pages(*entries), "state": pin}, WHERE), sizes


def test_the_array_table_finds_each_array_on_its_page_and_counts_what_it_loaded(tmp_path: Path) -> None:
    m, sizes = two_page_checkpoint(LocalStore(tmp_path))
    arrays = m.arrays
    assert arrays.loaded_bytes == 0
    assert arrays["b"].shape == (3,)
    assert arrays.loaded_bytes == sizes[0]
    assert arrays["a"].shape == (2,) and arrays.loaded_bytes == sizes[0]
    assert "m" in arrays and arrays["m"].shape == (1,)
    assert arrays.loaded_bytes == sizes[0] + sizes[1]
    for absent in ("0", "k", "n", "z"):  # before the first page, between pages, after the last
        assert absent not in arrays
        with pytest.raises(KeyError):
            arrays[absent]
    assert 5 not in arrays
    assert list(arrays) == ["a", "b", "m"] and len(arrays) == 3


@pytest.mark.parametrize(("page0", "error", "message"), [
    (page_doc(0, {"a": array_doc(2), "b": array_doc(3)}, attempt="a-ffffffffffffffff"), IntegrityError,
     "rec table page 0 belongs to another attempt or page"),
    (page_doc(1, {"a": array_doc(2), "b": array_doc(3)}), IntegrityError,
     "rec table page 0 belongs to another attempt or page"),
    ({**page_doc(0, {}), "arrays": []}, MetadataError,
     "rec table page 0 arrays must be a JSON object, got list"),
    (page_doc(0, {"a": array_doc(2), "aa": array_doc(3)}), IntegrityError,
     "rec table page 0 does not hold the arrays the commit record says"),
    (page_doc(0, {"a": array_doc(2), "b": {**array_doc(3), "dtype": "evil"}}), MetadataError, None),
])
def test_a_table_page_that_disagrees_with_its_entry_is_refused_with_the_whole_message(
        tmp_path: Path, page0: dict[str, Any], error: type[Exception], message: str | None) -> None:
    m, _ = two_page_checkpoint(LocalStore(tmp_path), page0)
    assert m.arrays["m"].shape == (1,)  # the other page reads
    with pytest.raises(error) as e:
        m.arrays["a"]
    if message is None:
        assert str(e.value).startswith("rec table page 0: ")
    else:
        assert str(e.value) == message


def test_a_table_page_replaced_after_the_commit_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    m, _ = two_page_checkpoint(store)
    key = page_key(ATTEMPT, 0)
    store.write(key, [dumps_sealed(page_doc(0, {"a": array_doc(2), "b": array_doc(4)}))])
    with pytest.raises(IntegrityError) as e:
        m.arrays["a"]
    assert str(e.value) == f"array table page 0 ({store.url}/{key}) does not match the commit record"
