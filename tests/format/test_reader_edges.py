"""The box reader at its edges: the requests it makes (whole shards in one request, a small box as
index plus coalesced ranges, indexes cached), its errors for bad requests and damaged objects (with
their exact messages), destinations of another dtype or layout, pieces, and format v1 records."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from damaged import STEP, build_checkpoint, expected, load_doc, sealed_json

import ckptd
from ckptd.format import CheckpointWriter, Run, ShardBox
from ckptd.format.errors import IntegrityError, LayoutError, MetadataError, StorageError
from ckptd.format.reader import CheckpointReader
from ckptd.storage import LocalStore

CUBE = torch.arange(4 * 4 * 8, dtype=torch.float32).reshape(4, 4, 8)  # chunks of one (i, j) row of 8


class CountingStore:
    """The real store, recording each read request a reader makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, key: str) -> bytes:
        self.calls.append(("read", key, None))
        data: bytes = self.inner.read(key)
        return data

    def read_ranges(self, key: str, ranges: Any) -> list[bytes]:
        self.calls.append(("ranges", key, [tuple(r) for r in ranges]))
        data: list[bytes] = self.inner.read_ranges(key, ranges)
        return data

    def read_tail(self, key: str, n: int) -> bytes:
        self.calls.append(("tail", key, n))
        data: bytes = self.inner.read_tail(key, n)
        return data


@pytest.fixture(scope="module")
def cube_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cube") / "run"
    state = {"cube": CUBE, "s": torch.tensor(-7, dtype=torch.int64), "w": torch.arange(6.0).reshape(2, 3)}
    ckptd.save(state, str(root), step=1, chunk_bytes=32)
    return root


@pytest.fixture()
def cube(cube_template: Path, tmp_path: Path) -> Path:
    shutil.copytree(cube_template, tmp_path / "run")
    return tmp_path / "run"


def _counting_reader(root: Path, step: int = 1) -> tuple[CheckpointReader, CountingStore]:
    run = Run(LocalStore(root))
    store = CountingStore(run.reader(step).store)
    return CheckpointReader(store, run.manifest(step)), store


def _object(root: Path, array: str, name: str) -> Path:
    (found,) = [p for p in root.rglob(name) if p.parent.name == array and ".meta" not in str(p)]
    return found


def test_a_whole_shard_is_one_request_and_a_small_box_reads_index_and_one_coalesced_range(cube: Path) -> None:
    reader, store = _counting_reader(cube)
    assert torch.equal(reader.read("cube"), CUBE)
    assert [c[0] for c in store.calls] == ["ranges"] and len(store.calls[0][2]) == 1
    size = _object(cube, "cube", "c.0.0.0").stat().st_size
    assert store.calls[0][2][0][0] == 0 and store.calls[0][2][0][1] > size
    reader, store = _counting_reader(cube)  # exactly half of the chunks: still one whole request
    assert torch.equal(reader.read("cube", ShardBox((0, 0, 0), (2, 4, 8))), CUBE[:2])
    assert [c[0] for c in store.calls] == ["ranges"] and store.calls[0][2][0][1] > size

    reader, store = _counting_reader(cube)
    box = ShardBox((1, 0, 2), (2, 1, 3))  # chunks (1, 0) and (2, 0): apart, fetched in one request
    assert torch.equal(reader.read("cube", box), CUBE[1:3, 0:1, 2:5])
    assert [c[0] for c in store.calls] == ["tail", "ranges"]
    (ranges,) = [c[2] for c in store.calls if c[0] == "ranges"]
    assert len(ranges) == 1 and ranges[0][1] - ranges[0][0] < size // 2
    # the index is cached: the next small read of the same shard fetches its data only
    assert torch.equal(reader.read("cube", ShardBox((3, 3, 0), (1, 1, 8))), CUBE[3:4, 3:4])
    assert [c[0] for c in store.calls] == ["tail", "ranges", "ranges"]


@pytest.mark.parametrize("corner", [(0, 0, 0), (3, 2, 5), (2, 3, 1)])
def test_boxes_not_at_the_shard_start_read_their_own_values(cube: Path, corner: tuple[int, int, int]) -> None:
    reader = Run(LocalStore(cube)).reader(1)
    shape = (min(2, 4 - corner[0]), min(2, 4 - corner[1]), 3)
    box = ShardBox(corner, shape)
    assert torch.equal(reader.read("cube", box), CUBE[box.slices()])
    whole = reader.read("cube", ShardBox((1, 0, 0), (3, 4, 8)))  # most chunks: the whole-shard path
    assert torch.equal(whole, CUBE[1:])


def test_bad_requests_are_layout_errors_with_exact_messages(cube: Path) -> None:
    reader = Run(LocalStore(cube)).reader(1)
    with pytest.raises(LayoutError, match=r"^checkpoint step 1 has no array 'nope'$"):
        reader.read("nope")
    with pytest.raises(LayoutError, match=r"^cube: requested box .* lies outside shape \[4, 4, 8\]$"):
        reader.read("cube", ShardBox((3, 0, 0), (2, 4, 8)))
    with pytest.raises(LayoutError, match=r"^cube: checkpoint holds shape \[4, 4, 8\] but the destination "
                                          r"tensor has shape \[4, 8\]$"):
        reader.read("cube", out=torch.zeros(4, 8))
    with pytest.raises(LayoutError, match=r"^w: checkpoint holds shape \[2, 3\] but the destination "
                                          r"tensor has shape \[3, 2\]$"):
        reader.restore({"w": torch.zeros(3, 2)})


def test_destinations_of_another_dtype_or_layout_receive_the_values(cube: Path) -> None:
    reader = Run(LocalStore(cube)).reader(1)
    as_double = torch.zeros(4, 4, 8, dtype=torch.float64)
    assert reader.read("cube", out=as_double) is as_double
    assert torch.equal(as_double, CUBE.double())
    transposed = torch.zeros(8, 4, 4).permute(2, 1, 0)  # not contiguous: filled through a copy
    assert reader.read("cube", out=transposed) is transposed
    assert torch.equal(transposed, CUBE)
    contiguous = torch.zeros(2, 3)
    assert reader.read("w", out=contiguous) is contiguous
    assert torch.equal(contiguous, torch.arange(6.0).reshape(2, 3))
    state: dict[str, Any] = {"s": torch.zeros((), dtype=torch.int64), "w": torch.zeros(2, 3)}
    reader.restore(state)
    assert int(state["s"]) == -7 and torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))


def test_a_shape_no_memory_can_hold_is_a_metadata_error(cube: Path) -> None:
    run = Run(LocalStore(cube))
    m = run.manifest(1)
    huge = dataclasses.replace(m.arrays["w"], shape=(2**40, 2**40))
    hostile = dataclasses.replace(m, arrays={**m.arrays, "w": huge})
    reader = CheckpointReader(run.reader(1).store, hostile)
    with pytest.raises(MetadataError, match=r"^w: cannot allocate \[1099511627776, 1099511627776\] float32 "
                                            r"elements to read into: "):
        reader.read("w")


def test_a_damaged_scalar_is_an_integrity_error(cube: Path) -> None:
    reader = Run(LocalStore(cube)).reader(1)
    obj = _object(cube, "s", "c")
    good = obj.read_bytes()
    obj.write_bytes(good + b"\0")
    with pytest.raises(IntegrityError, match=r"^s: scalar value has 13 bytes, not 12$"):
        reader.read("s")
    obj.write_bytes(good[:3] + bytes([good[3] ^ 1]) + good[4:])
    with pytest.raises(IntegrityError, match=r"^s: scalar value fails its crc32c check$"):
        reader.read("s")
    obj.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=r"^s: scalar value fails its crc32c check$"):
        reader.read("s")
    obj.unlink()
    with pytest.raises(IntegrityError, match=r"^s: s/c is missing from storage \(\S+\)$"):
        reader.read("s")
    obj.mkdir()  # a directory where the object was: an OS error, not a missing object
    with pytest.raises(StorageError, match=r"^reading s/c from \S+ failed: "):
        reader.read("s")


def test_a_damaged_shard_is_an_integrity_error_on_both_read_paths(cube: Path) -> None:
    reader = Run(LocalStore(cube)).reader(1)
    obj = _object(cube, "cube", "c.0.0.0")
    good = obj.read_bytes()
    small = ShardBox((0, 0, 0), (1, 1, 8))
    obj.write_bytes(good[:100])  # shorter than its index
    with pytest.raises(IntegrityError, match=r"^cube shard cube/c\.0\.0\.0: 100 bytes, smaller than "
                                             r"its index$"):
        reader.read("cube")
    with pytest.raises(IntegrityError, match=r"^cube shard cube/c\.0\.0\.0: the shard is truncated "
                                             r"\(its index is incomplete\)$"):
        Run(LocalStore(cube)).reader(1).read("cube", small)
    obj.write_bytes(good + bytes(64 * 1024))  # grown past any shard of this geometry
    with pytest.raises(IntegrityError, match=r"^cube shard cube/c\.0\.0\.0: more than \d+ bytes, larger than "
                                             r"a shard of this array can be \(replaced or damaged\)$"):
        reader.read("cube")
    obj.unlink()
    with pytest.raises(IntegrityError, match=r"^shard cube/c\.0\.0\.0 is missing from storage \(\S+\)$"):
        reader.read("cube")
    obj.mkdir()
    with pytest.raises(StorageError, match=r"^reading cube/c\.0\.0\.0 from \S+ failed: "):
        reader.read("cube", small)


def _rewrite_index(obj: Path, entry: int, offset: int, nbytes: int) -> None:
    """Point index entry ``entry`` at (offset, nbytes), resealing the index with a valid crc32c."""
    from ckptd.format.codecs import crc32c

    data = bytearray(obj.read_bytes())
    nchunks = 16
    start = len(data) - (nchunks * 16 + 4)
    at = start + entry * 16
    data[at : at + 16] = offset.to_bytes(8, "little") + nbytes.to_bytes(8, "little")
    data[-4:] = crc32c(bytes(data[start:-4])).to_bytes(4, "little")
    obj.write_bytes(bytes(data))


def test_an_index_that_lies_is_an_integrity_error(cube: Path) -> None:
    obj = _object(cube, "cube", "c.0.0.0")
    good = obj.read_bytes()
    _rewrite_index(obj, 4, 2**64 - 1, 2**64 - 1)  # chunk (1, 0) marked absent
    with pytest.raises(IntegrityError, match=r"^cube shard cube/c\.0\.0\.0: chunk \[1, 0, 0\] is missing "
                                             r"from the shard index$"):
        Run(LocalStore(cube)).reader(1).read("cube", ShardBox((1, 0, 0), (1, 1, 8)))
    obj.write_bytes(good)
    data_end = len(good) - (16 * 16 + 4)
    _rewrite_index(obj, 15, data_end - 40, 4000)  # the last chunk runs past the end of the object
    with pytest.raises(IntegrityError, match=r"^shard cube/c\.0\.0\.0 is truncated \(wanted bytes "
                                             r"\d+\.\.\d+, got \d+\)$"):
        Run(LocalStore(cube)).reader(1).read("cube", ShardBox((3, 3, 0), (1, 1, 8)))


def _bits(t: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
    """Shape and raw bytes: NaN payloads compare equal only bit for bit."""
    return tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("version", [1, 2])
def test_pieces_and_both_format_versions_read_every_box(tmp_path: Path, version: int) -> None:
    build_checkpoint(tmp_path / "run", version=version)
    reader = Run(LocalStore(tmp_path / "run")).reader(STEP)
    exp = expected()
    for path, want in exp.items():
        assert _bits(reader.read(path)) == _bits(want), path
    p = exp["p"]
    for start, n in [(0, 3), (1, 5), (700, 800), (1499, 1)]:  # across and inside the two pieces
        got = reader.read("p", ShardBox((start, 0), (n, 1)))
        assert _bits(got) == _bits(p[start : start + n]), (start, n)
    for box in [ShardBox((5, 2), (2, 3)), ShardBox((0, 0), (1, 10)), ShardBox((11, 9), (1, 1))]:
        assert _bits(reader.read("w", box)) == _bits(exp["w"][box.slices()]), box


def test_a_v1_shard_whose_index_disagrees_with_its_record_is_an_integrity_error(tmp_path: Path) -> None:
    build_checkpoint(tmp_path / "run", version=1)
    (obj,) = [f for f in (tmp_path / "run").rglob("c.0.0") if f.parent.name == "w"]
    data = bytearray(obj.read_bytes())
    data[-5] ^= 1  # inside the index, before its own crc: the record's index checksum no longer matches
    obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"shard index does not match the manifest checksum$"):
        Run(LocalStore(tmp_path / "run")).reader(STEP).read("w", ShardBox((0, 0), (1, 1)))


@pytest.mark.parametrize(("n", "nranges"), [(2**18 - 1, 1), (2**18 + 2, 2)])
def test_chunks_more_than_a_mebibyte_apart_are_fetched_as_separate_ranges(
    tmp_path: Path, n: int, nranges: int
) -> None:
    # n floats and a 4-byte crc32c a chunk: a gap of exactly 1 MiB is merged, 1 MiB + 12 bytes is not
    far = torch.arange(3 * 2 * n, dtype=torch.float32).reshape(3, 2, n)
    run = Run(LocalStore(tmp_path / "run", fsync=False))  # durability is not what is tested: fast
    w = CheckpointWriter(run.prepare(1), rank=0, chunk_bytes=4 * n)
    w.add("far", far)
    run.commit(1, [w.finish()], state={"far": {"$ckptd": "tensor", "path": "far"}})
    reader, store = _counting_reader(tmp_path / "run")
    # chunks (0, 0) and (1, 0), with chunk (0, 1) between them
    assert torch.equal(reader.read("far", ShardBox((0, 0, 5), (2, 1, 3))), far[0:2, 0:1, 5:8])
    (ranges,) = [c[2] for c in store.calls if c[0] == "ranges"]
    assert len(ranges) == nranges
    if nranges == 2:
        assert ranges[1][0] - ranges[0][1] == 4 * n + 4
    else:
        assert ranges[0][1] - ranges[0][0] == 3 * (4 * n + 4)


def test_a_shard_of_exactly_the_largest_size_is_read_one_byte_more_is_refused(cube: Path) -> None:
    obj = _object(cube, "cube", "c.0.0.0")
    good = obj.read_bytes()
    index = good[-(16 * 16 + 4):]
    obj.write_bytes(good + bytes(64 * 1024))
    with pytest.raises(IntegrityError, match=r"more than (\d+) bytes") as refused:
        Run(LocalStore(cube)).reader(1).read("cube")
    limit = int(refused.value.args[0].split("more than ")[1].split(" ")[0])
    # padding between the data and the index: every chunk is where the index says, the size is the limit
    obj.write_bytes(good[: -len(index)] + bytes(limit - len(good)) + index)
    assert torch.equal(Run(LocalStore(cube)).reader(1).read("cube"), CUBE)
    obj.write_bytes(good[: -len(index)] + bytes(limit + 1 - len(good)) + index)
    with pytest.raises(IntegrityError, match=rf"^cube shard cube/c\.0\.0\.0: more than {limit} bytes, "):
        Run(LocalStore(cube)).reader(1).read("cube")
    # an object that is its index alone: the chunks it lists lie outside it
    obj.write_bytes(index)
    with pytest.raises(IntegrityError, match=r"^cube shard cube/c\.0\.0\.0: chunk \d+ points outside "):
        Run(LocalStore(cube)).reader(1).read("cube")


@pytest.mark.parametrize(("nbytes", "message"), [
    (10, r"^w shard w/c\.0\.0: recorded size 10 is smaller than its index$"),
    # exactly its index: no data at all, so the index is looked for at the start and does not match
    (3 * 16 + 4, r"^w shard w/c\.0\.0: shard index does not match the manifest checksum$"),
])
def test_a_v1_shard_record_smaller_than_its_object_is_an_integrity_error(
    tmp_path: Path, nbytes: int, message: str
) -> None:
    build_checkpoint(tmp_path / "run", version=1)
    (path,) = (tmp_path / "run").glob("step_*/manifest.json")
    doc = load_doc(path)
    doc["arrays"]["w"]["parts"][0]["shards"][0][2] = nbytes
    path.write_bytes(sealed_json(doc))
    with pytest.raises(IntegrityError, match=message):
        Run(LocalStore(tmp_path / "run")).reader(STEP).read("w", ShardBox((0, 0), (1, 1)))


def test_a_shard_record_missing_from_a_v1_part_is_an_integrity_error(tmp_path: Path) -> None:
    """The manifest parser already refuses such a part; the reader does not rely on it."""
    build_checkpoint(tmp_path / "run", version=1)
    run = Run(LocalStore(tmp_path / "run"))
    m = run.manifest(STEP)
    part = m.arrays["w"].parts[0]
    short = dataclasses.replace(part, shards=part.shards[:1])
    w = dataclasses.replace(m.arrays["w"], parts=(short,))
    forged = dataclasses.replace(m, arrays={**m.arrays, "w": w})
    reader = CheckpointReader(run.reader(STEP).store, forged)
    assert torch.equal(reader.read("w", ShardBox((0, 0), (6, 10))), expected()["w"][:6])
    with pytest.raises(IntegrityError, match=r"^w: shard \[1, 0\] is missing from the manifest$"):
        reader.read("w", ShardBox((5, 0), (2, 10)))


def test_a_flipped_chunk_byte_names_the_shard_and_the_chunk(cube: Path) -> None:
    obj = _object(cube, "cube", "c.0.0.0")
    data = bytearray(obj.read_bytes())
    data[0] ^= 1  # the first byte of chunk (0, 0, 0)
    obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"^cube shard cube/c\.0\.0\.0 chunk \[0, 0, 0\]: crc32c "):
        Run(LocalStore(cube)).reader(1).read("cube", ShardBox((0, 0, 0), (1, 1, 8)))
