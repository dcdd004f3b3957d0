"""The committer's promises, seen from the committed checkpoint: what the manifest records, which
incomplete or contradictory writer reports it refuses (with which words), and that a step commits
exactly once. Small states, one process: fast enough for the per-mutant run (docs/mutation.md)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import torch

from ckptd.format.boxes import ShardBox
from ckptd.format.commit import commit
from ckptd.format.errors import CheckpointExistsError, LayoutError, MetadataError
from ckptd.format.run import Run
from ckptd.format.tally import Tally
from ckptd.format.tree import flatten
from ckptd.format.writer import CheckpointWriter, WriterReport
from ckptd.storage import LocalStore

ROWS = [ShardBox((0, 0), (4, 6)), ShardBox((4, 0), (4, 6))]


def _full() -> torch.Tensor:
    return torch.arange(48, dtype=torch.float32).reshape(8, 6)


def _write_rows(run: Run, step: int, ranks: list[int], *,
                dtype: torch.dtype = torch.float32) -> list[WriterReport]:
    """Writers ``ranks`` of a 2-writer row split of ``x`` (8x6, 48-byte chunks: several shards each)."""
    store = run.prepare(step)
    reports = []
    for rank in ranks:
        w = CheckpointWriter(store, rank=rank, chunk_bytes=48, threads=1)
        box = ROWS[rank]
        piece = _full()[box.slices()].to(dtype if rank else torch.float32)
        w.add("x", piece, shape=(8, 6), box=box, boxes=ROWS)
        reports.append(w.finish())
    return reports


def test_two_writers_commit_one_checkpoint_with_exact_totals(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    reports = _write_rows(run, 3, [0, 1])
    skeleton, _ = flatten({"x": _full()})
    m = run.commit(3, reports, state=skeleton, world_size=2, mesh={"dp": 2}, metadata={"lr": 0.5})
    got = run.manifest(3)
    assert (got.step, got.world_size, dict(got.mesh), dict(got.metadata)) == (3, 2, {"dp": 2}, {"lr": 0.5})
    assert got.format_version == 2 and re.fullmatch(r"a-[0-9a-f]{16}", got.attempt)
    assert got.checkpoint_id == m.checkpoint_id and re.fullmatch(r"[0-9a-f]{32}", got.checkpoint_id)
    created = dt.datetime.fromisoformat(got.created_at)
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 600
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", got.created_at)
    assert got.totals is not None
    assert (got.totals.arrays, got.totals.writers, got.totals.nbytes) == (1, 2, 8 * 6 * 4)
    assert got.totals.shards == sum(r.tally.shards for r in reports) >= 2
    assert run.verify(3) == []
    assert torch.equal(run.reader(3).read("x"), _full())


def test_a_missing_writer_is_named_and_nothing_commits(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    reports = _write_rows(run, 1, [0, 1])
    skeleton, _ = flatten({"x": _full()})
    with pytest.raises(LayoutError) as err:
        run.commit(1, reports[:1], state=skeleton)
    assert re.fullmatch(r"x: (\d+) of (\d+) shards were not written \(e\.g\. \(\d+, \d+\)\); "
                        r"a writer is missing from the commit", str(err.value))
    missing, total = map(int, re.findall(r"\d+", str(err.value))[:2])
    assert 0 < missing < total
    assert run.steps() == []


def test_a_shard_reported_twice_is_refused(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    reports = _write_rows(run, 1, [0, 1])
    skeleton, _ = flatten({"x": _full()})
    with pytest.raises(LayoutError, match=r"^x: a shard was written by more than one writer$"):
        run.commit(1, [*reports, reports[1]], state=skeleton)
    assert run.steps() == []


def test_writers_disagreeing_on_the_dtype_are_refused(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    reports = _write_rows(run, 1, [0, 1], dtype=torch.float64)
    skeleton, _ = flatten({"x": _full()})
    with pytest.raises(LayoutError) as err:
        run.commit(1, reports, state=skeleton)
    assert str(err.value) == ("x: writers disagree on dtype/shape/storage "
                              "(float32[8, 6] regular vs float64[8, 6] regular)")


def test_a_scalar_written_by_two_writers_is_refused(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    store = run.prepare(1)
    reports = []
    for rank in (0, 1):
        w = CheckpointWriter(store, rank=rank, threads=1)
        w.add("s", torch.tensor(2.5))
        reports.append(w.finish())
    skeleton, _ = flatten({"s": torch.tensor(2.5)})
    with pytest.raises(LayoutError, match=r"^s: scalar array was not written exactly once$"):
        run.commit(1, reports, state=skeleton)
    m = run.commit(1, reports[:1], state=skeleton)
    assert m.totals is not None and (m.totals.arrays, m.totals.shards, m.totals.writers) == (1, 1, 1)
    assert torch.equal(run.reader(1).read("s"), torch.tensor(2.5))


def test_a_state_naming_an_unwritten_array_is_refused(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    reports = _write_rows(run, 1, [0, 1])
    skeleton, _ = flatten({"x": _full(), "y": torch.zeros(2)})
    with pytest.raises(LayoutError, match=r"^the state refers to arrays that no writer wrote: \['y'\]$"):
        run.commit(1, reports, state=skeleton)
    with pytest.raises(LayoutError, match=r"^the state refers to arrays that no writer wrote: \['y'\]$"):
        commit(run.checkpoint_store(1), step=1, reports=reports, state=skeleton)  # format v1
    assert run.steps() == []


def test_a_step_commits_exactly_once(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    skeleton, _ = flatten({"x": _full()})
    first = run.commit(1, _write_rows(run, 1, [0, 1]), state=skeleton)
    with pytest.raises(CheckpointExistsError):
        run.prepare(1)
    store = run.checkpoint_store(1)
    w = CheckpointWriter(store.child("a-0123456789abcdef"), threads=1)
    w.add("x", _full())
    with pytest.raises(CheckpointExistsError):
        commit(store, step=1, reports=[w.finish()], state=skeleton, attempt="a-0123456789abcdef")
    assert run.manifest(1).checkpoint_id == first.checkpoint_id


def test_format_v1_commit_reads_back(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    store = run.checkpoint_store(2)
    w = CheckpointWriter(store, threads=1)
    w.add("x", _full())
    skeleton, _ = flatten({"x": _full()})
    commit(store, step=2, reports=[w.finish()], state=skeleton, mesh={"tp": 1}, metadata={"k": "v"})
    m = run.manifest(2)
    assert (m.format_version, m.step, dict(m.mesh), dict(m.metadata)) == (1, 2, {"tp": 1}, {"k": "v"})
    assert torch.equal(run.reader(2).read("x"), _full())


def test_a_planned_commit_refuses_a_tally_that_does_not_match_the_plan(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    reports = _write_rows(run, 1, [0, 1])
    arrays = {p: a for r in reports for p, a in r.lead_records().items()}
    skeleton, _ = flatten({"x": _full()})
    short = reports[0].tally
    with pytest.raises(LayoutError) as err:
        run.commit_planned(1, arrays=arrays, tally=short, writers=1, state=skeleton, world_size=2)
    want = sum(r.tally.shards for r in reports)
    assert str(err.value) == (f"the writers wrote {short.shards} shard objects but the storage plan "
                              f"has {want}: a writer is missing from the commit, "
                              "or ranks disagree about the layout")
    doubled = reports[0].tally + reports[0].tally
    assert doubled.shards == want  # the same count, the wrong shards
    twice = rf"plan has {want} \(a shard was written twice or at the wrong place\): "
    with pytest.raises(LayoutError, match=twice):
        run.commit_planned(1, arrays=arrays, tally=doubled, writers=2, state=skeleton, world_size=2)
    total = sum((r.tally for r in reports), Tally())
    m = run.commit_planned(1, arrays=arrays, tally=total, writers=2, state=skeleton, world_size=2)
    assert m.totals is not None and (m.totals.shards, m.totals.writers) == (want, 2)
    assert torch.equal(run.reader(1).read("x"), _full())


def test_writers_planning_one_part_differently_are_refused(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    store = run.prepare(1)
    reports = []
    for rank, chunk_bytes in ((0, 48), (1, 96)):  # different chunk sizes: different storage plans
        w = CheckpointWriter(store, rank=rank, chunk_bytes=chunk_bytes, threads=1)
        w.add("x", _full()[ROWS[rank].slices()], shape=(8, 6), box=ROWS[rank], boxes=ROWS)
        reports.append(w.finish())
    skeleton, _ = flatten({"x": _full()})
    with pytest.raises(LayoutError, match=r"^x: writers planned part 0 differently$"):
        run.commit(1, reports, state=skeleton)


def test_a_piece_reported_twice_is_refused(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    store = run.prepare(1)
    # cells of one element would be needed (gcd of the edges is 1): stored as pieces
    boxes = [ShardBox((0,), (1000,)), ShardBox((1000,), (1,)), ShardBox((1001,), (999,))]
    full = torch.arange(2000, dtype=torch.int32)
    reports = []
    for rank, box in enumerate(boxes):
        w = CheckpointWriter(store, rank=rank, threads=1)
        w.add("p", full[box.slices()], shape=(2000,), box=box, boxes=boxes)
        reports.append(w.finish())
    skeleton, _ = flatten({"p": full})
    with pytest.raises(LayoutError, match=r"^p: piece 1 has 2 shards, expected 1$"):
        run.commit(1, [*reports, reports[1]], state=skeleton)
    run.commit(1, reports, state=skeleton)
    assert torch.equal(run.reader(1).read("p"), full)


def test_a_state_tree_of_a_hundred_kilobytes_commits_and_reads_back(tmp_path: Path) -> None:
    """Far below the 128 MiB limit of the state tree: it must never be refused."""
    run = Run(LocalStore(tmp_path))
    history = [{"step": i, "loss": i / 7} for i in range(3000)]
    skeleton, tensors = flatten({"x": _full(), "history": history})
    store = run.prepare(1)
    w = CheckpointWriter(store, threads=1)
    w.add("x", tensors["x"])
    tags = {f"tag{i}": "v" * 20 for i in range(400)}  # 12 KB of metadata, below its 256 KiB limit
    run.commit(1, [w.finish()], state=skeleton, metadata=tags)
    m = run.manifest(1)
    assert m.state["history"] == history and dict(m.metadata) == tags
    assert "x" in m.arrays and "y" not in m.arrays and 1 not in m.arrays


def test_an_open_attempt_holds_its_lease_where_the_spec_says(tmp_path: Path) -> None:
    run = Run(LocalStore(tmp_path))
    run.prepare(5)
    attempt = run.open_attempt(5)
    assert attempt is not None and (tmp_path / f"step_0000000005/{attempt}.meta/lease").is_file()
    run.abandon(5)


def test_a_malformed_attempt_name_is_refused_with_the_whole_message(tmp_path: Path) -> None:
    store = LocalStore(tmp_path).child("step_0000000001")
    skeleton, _ = flatten({"x": _full()})
    w = CheckpointWriter(store.child("a-0123456789abcdef"), threads=1)
    w.add("x", _full())
    with pytest.raises(MetadataError) as err:
        commit(store, step=1, reports=[w.finish()], state=skeleton, attempt="a-XYZ")
    assert str(err.value) == "attempt 'a-XYZ' is not a-<16 hex digits>"


def test_the_metadata_documents_name_their_format_as_the_spec_says(tmp_path: Path) -> None:
    """SPEC §8: other implementations tell the documents apart by their ``format`` field."""
    run = Run(LocalStore(tmp_path))
    skeleton, _ = flatten({"x": _full()})
    m = run.commit(1, _write_rows(run, 1, [0, 1]), state=skeleton)
    meta = tmp_path / f"step_0000000001/{m.attempt}.meta"
    page = json.loads((meta / "tables/t-00000.json").read_bytes())
    state = json.loads((meta / "state.json").read_bytes())
    assert (page["format"], page["attempt"], page["page"], sorted(page["arrays"])) == (
        "ckptd-arrays", m.attempt, 0, ["x"])
    assert (state["format"], state["attempt"], state["state"]) == ("ckptd-state", m.attempt, skeleton)
