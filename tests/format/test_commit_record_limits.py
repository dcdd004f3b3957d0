"""The size limits of the format v2 metadata documents (SPEC §8), at the byte: a document of
exactly the limit is written, one byte more is refused before anything is published, with the
sizes in the message. Each document is padded with one string until its sealed size is exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ckptd.format import MetadataError
from ckptd.format.commit_record import (
    BlobRef,
    PageRef,
    encode_pages,
    encode_rank_state,
    encode_record,
    encode_state,
)
from ckptd.format.manifest import ArrayRecord, Manifest, Totals
from ckptd.format.manifest_parse import parse_array
from ckptd.format.rank_array import ROW_BYTES, ROW_CODEC, encode_rank_chunk
from ckptd.format.strict_json import dumps_sealed

ATTEMPT = "a-0123456789abcdef"
MIB, KIB = 2**20, 2**10


def pad_to(size: int, measure: Callable[[str], int]) -> str:
    """A padding string that makes ``measure`` (a sealed document's size) exactly ``size``. The
    seal's crc32c has a varying number of digits, so a length can be missed; another fill
    character gives another crc32c."""
    for fill in "xyzw":
        n = max(0, size - measure(""))
        for _ in range(3):
            got = measure(fill * n)
            if got == size:
                return fill * n
            n = max(0, n + size - got)
    raise AssertionError(f"no padding makes the document {size} bytes")


def state_size(pad: str) -> int:
    return len(dumps_sealed({"format": "ckptd-state", "attempt": ATTEMPT, "state": {"pad": pad}}))


def rank_size(pad: str) -> int:
    return len(dumps_sealed({"format": "ckptd-rank", "attempt": ATTEMPT, "rank": 3, "state": {"pad": pad}}))


def test_a_state_tree_of_exactly_128_mib_is_written_and_one_byte_more_is_refused() -> None:
    pad = pad_to(128 * MIB, state_size)
    assert len(encode_state(ATTEMPT, {"pad": pad})) == 128 * MIB
    over = pad_to(128 * MIB + 1, state_size)
    with pytest.raises(MetadataError) as e:
        encode_state(ATTEMPT, {"pad": over})
    assert str(e.value) == ("the state tree would be 134217729 bytes as JSON (limit 134217728): "
                            "large values belong in tensors")


def test_a_rank_state_of_exactly_16_mib_is_written_and_one_byte_more_is_refused() -> None:
    pad = pad_to(16 * MIB, rank_size)
    assert len(encode_rank_state(ATTEMPT, 3, {"pad": pad})) == 16 * MIB
    over = pad_to(16 * MIB + 1, rank_size)
    with pytest.raises(MetadataError) as e:
        encode_rank_state(ATTEMPT, 3, {"pad": over})
    assert str(e.value) == "rank 3's state would be 16777217 bytes (limit 16777216)"


def test_a_rank_state_row_of_exactly_1_mib_is_written_and_one_byte_more_is_refused() -> None:
    """New saves keep a rank's state in one row of the rank-state array: the row is the limit."""
    assert ROW_BYTES == MIB
    pad = pad_to(MIB, rank_size)
    row = bytes(ROW_CODEC.decode(b"".join(encode_rank_chunk(ATTEMPT, 3, {"pad": pad})), MIB, "row"))
    assert len(row) == MIB and row[-1] != 0  # the document fills the row: no padding left
    with pytest.raises(MetadataError) as e:
        encode_rank_chunk(ATTEMPT, 3, {"pad": pad_to(MIB + 1, rank_size)})
    assert str(e.value) == "rank 3's state would be 1048577 bytes (limit 1048576)"


def manifest(checkpoint_id: str = "ck", metadata: dict[str, str] | None = None) -> Manifest:
    return Manifest(step=7, checkpoint_id=checkpoint_id, created_at="2026-12-02T00:00:00+00:00", world_size=2,
                    arrays={}, state={}, metadata=metadata or {}, format_version=2, attempt=ATTEMPT,
                    totals=Totals(arrays=40, shards=40, nbytes=160, stored_bytes=160, writers=2))


PAGES = [PageRef(f"p{i:02d}", f"p{i:02d}z", 20, 100, 7) for i in range(2)]
STATE = BlobRef(100, 7)


def test_metadata_of_exactly_256_kib_is_recorded_and_one_byte_more_is_refused() -> None:
    def measure(pad: str) -> int:
        return len(dumps_sealed({"metadata": {"note": pad}}))

    pad = pad_to(256 * KIB, measure)
    raw = encode_record(manifest(metadata={"note": pad}), PAGES, STATE)
    assert pad in raw.decode()
    over = pad_to(256 * KIB + 1, measure)
    with pytest.raises(MetadataError) as e:
        encode_record(manifest(metadata={"note": over}), PAGES, STATE)
    assert str(e.value) == "checkpoint metadata is 262145 bytes as JSON (limit 262144)"


def test_a_commit_record_of_exactly_1_mib_is_written_and_one_byte_more_is_refused() -> None:
    def measure(pad: str) -> int:
        doc = {"format": "ckptd", "format_version": 2, "step": 7, "checkpoint_id": pad,
               "attempt": ATTEMPT, "created_at": "2026-12-02T00:00:00+00:00", "world_size": 2, "mesh": {},
               "totals": manifest().totals.to_json(), "tables": [p.to_json() for p in PAGES],  # type: ignore[union-attr]
               "state": {"size": 100, "crc32c": 7}, "rank_state": False, "metadata": {}}
        return len(dumps_sealed(doc))

    pad = pad_to(MIB, measure)
    assert len(encode_record(manifest(checkpoint_id=pad), PAGES, STATE)) == MIB
    over = pad_to(MIB + 1, measure)
    with pytest.raises(MetadataError) as e:
        encode_record(manifest(checkpoint_id=over), PAGES, STATE)
    assert str(e.value) == ("the commit record would be 1048577 bytes (limit 1048576): "
                            "40 arrays in 2 table pages")


def noted_array(note: str) -> ArrayRecord:
    """A one-element array whose layout carries a writer's note (``extra``) of any size."""
    codec = {"compressor": "none", "level": 1, "shuffle": "byte"}
    part = {"offset": [0], "shape": [1], "grid": [1], "chunks": [1]}
    return parse_array("w", {"dtype": "uint8", "shape": [1], "kind": "regular", "codec": codec,
                             "layout": {"partition": [[]], "extra": {"note": note}}, "parts": [part]},
                       listed=False)


def test_an_array_table_page_of_exactly_8_mib_is_written_and_one_byte_more_is_refused() -> None:
    def measure(pad: str) -> int:
        arrays = {"w": noted_array(pad).to_json()}
        doc = {"format": "ckptd-arrays", "attempt": ATTEMPT, "page": 0, "arrays": arrays}
        return len(dumps_sealed(doc))

    pad = pad_to(8 * MIB, measure)
    ((ref, raw),) = encode_pages(ATTEMPT, {"w": noted_array(pad)})
    assert len(raw) == ref.size == 8 * MIB
    over = pad_to(8 * MIB + 1, measure)
    with pytest.raises(MetadataError) as e:
        encode_pages(ATTEMPT, {"w": noted_array(over)})
    assert str(e.value) == "array table page 0 would be 8388609 bytes (limit 8388608)"
