"""``ckptd import --from dcp DIR URI --mesh ...``: a DCP checkpoint laid out for a mesh on the way in.

Sources are written by real ``torch.distributed.checkpoint.save`` in this process; the restore at the
mesh runs on 2 real gloo ranks (this file, run as a script, is the rank).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptd
from ckptd.cli.main import main
from ckptd.converters.dcp_import import import_dcp
from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping
from ckptd.format.errors import CheckpointExistsError, IntegrityError, LayoutError, StorageError
from ckptd.format.manifest import ArrayRecord

if not __package__:  # run as a gloo rank's script (see the end): the checkout's root holds `tests`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.converters.dcp_helpers import _single_process_dcp, assert_same  # noqa: F401 - autouse


def source_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "model": {
            "w": torch.randn(12, 3, generator=g),
            "emb": torch.randn(8, 2, generator=g).bfloat16(),
            "bias": torch.randn(3, generator=g),  # shorter than a 4-rank mesh
            "scale": torch.tensor(0.25),  # 0-dim
        },
        "ids": torch.arange(10, dtype=torch.int64),  # 10 rows over 4 ranks: 3, 3, 3, 1
        "step": 9,
        "note": {"lr": 0.5, "tag": "dcp"},
    }


def stored_boxes(a: ArrayRecord) -> list[ShardBox]:
    """The boxes of an array's shard objects in global coordinates (empty cells hold no object)."""
    out = []
    for part in a.parts:
        for coords in cells_overlapping(ShardBox.whole(part.shape), part.grid):
            cell = cell_box(coords, part.grid, part.shape)
            if not cell.is_empty():
                out.append(ShardBox(tuple(o + p for o, p in zip(cell.offset, part.offset, strict=True)),
                                    cell.shape))
    return sorted(out, key=lambda b: b.offset)


def rows(*blocks: tuple[int, int], width: int | None = None) -> list[ShardBox]:
    """Row blocks ``(start, stop)`` of a 1-d array, or of a 2-d one ``width`` columns wide."""
    if width is None:
        return [ShardBox((a,), (b - a,)) for a, b in blocks]
    return [ShardBox((a, 0), (b - a, width)) for a, b in blocks]




@pytest.fixture
def source(tmp_path: Path) -> Path:
    dcp.save(source_state(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    return tmp_path / "dcp"


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory the import stages in: must be empty again after every import."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_import_at_a_mesh_is_bit_exact_and_stores_one_box_per_rank(
    source: Path, scratch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "run")
    assert main(["import", "--from", "dcp", str(source), uri, "--step", "3", "--mesh", "dp=2,tp=2"]) == 0
    assert "for mesh {'dp': 2, 'tp': 2}" in capsys.readouterr().out
    got: dict[str, Any] = {}
    assert ckptd.load(got, uri) == 3
    assert_same(got, source_state())
    run = ckptd.open_run(uri)
    m = run.manifest(3)
    assert (dict(m.mesh), m.world_size) == ({"dp": 2, "tp": 2}, 4)
    assert m.metadata["source_format"] == "torch.distributed.checkpoint"
    assert run.verify(3) == []
    # dim 0 split by dp, each half by tp (DTensor (Shard(0), Shard(0))): rank (d, t) reads block 2d+t only
    want = {
        "model/w": rows((0, 3), (3, 6), (6, 9), (9, 12), width=3),
        "model/emb": rows((0, 2), (2, 4), (4, 6), (6, 8), width=2),
        "model/bias": rows((0, 3)),  # 3 rows cannot give 4 ranks one each: whole, replicated
        "model/scale": [ShardBox((), ())],
    }
    assert {p: stored_boxes(m.arrays[p]) for p in want} == want
    w, bias = m.arrays["model/w"].layout, m.arrays["model/bias"].layout
    assert w is not None and (w.partition, w.replicated) == ((("dp", "tp"), ()), ())
    assert bias is not None and (bias.partition, bias.replicated) == ((), ("dp", "tp"))
    assert list(scratch.iterdir()) == []


def test_uneven_rows_are_cut_with_ceil_division_as_torch_chunk(
    source: Path, scratch: Path, tmp_path: Path
) -> None:
    m = import_dcp(source, str(tmp_path / "run"), step=2, mesh={"dp": 4})
    assert stored_boxes(m.arrays["ids"]) == rows((0, 3), (3, 6), (6, 9), (9, 10))
    assert [len(c) for c in torch.arange(10).chunk(4)] == [3, 3, 3, 1]
    got: dict[str, Any] = {}
    ckptd.load(got, str(tmp_path / "run"))
    assert_same(got, source_state())


def test_arrays_too_short_for_the_mesh_stay_whole_and_replicated(source: Path, scratch: Path,
                                                                  tmp_path: Path) -> None:
    m = import_dcp(source, str(tmp_path / "run"), step=1, mesh={"dp": 16})
    assert m.world_size == 16
    for path, a in m.arrays.items():  # nothing has 16 rows: every array is one box, written once
        assert stored_boxes(a) == [ShardBox.whole(a.shape)], path
        assert a.layout is not None and (a.layout.partition, a.layout.replicated) == ((), ("dp",))
    got: dict[str, Any] = {}
    ckptd.load(got, str(tmp_path / "run"))
    assert_same(got, source_state())
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("mesh", ["dp=0", "dp", "dp=two", "dp=2,tp=-1"])
def test_a_bad_mesh_is_a_one_line_error_and_leaves_nothing(
    mesh: str, source: Path, scratch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["import", "--from", "dcp", str(source), str(uri), "--step", "1", "--mesh", mesh])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # exactly what `ckptd convert --mesh` says for the same string
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--mesh", mesh])
    assert err[-1] == capsys.readouterr().err.strip().splitlines()[-1].replace("convert", "import")
    assert f"argument --mesh: invalid parse_mesh value: '{mesh}'" in err[-1]
    assert not uri.exists() and list(scratch.iterdir()) == []


@pytest.mark.parametrize("mesh", [{}, {"dp": 0}, {"dp": True}, {"bad/axis": 2}])
def test_the_python_api_refuses_a_bad_mesh_before_any_work(
    mesh: dict[str, Any], source: Path, scratch: Path, tmp_path: Path
) -> None:
    with pytest.raises(LayoutError):
        import_dcp(source, str(tmp_path / "run"), step=1, mesh=mesh)
    assert not (tmp_path / "run").exists() and list(scratch.iterdir()) == []


def test_mesh_on_a_file_import_is_a_one_line_error(
    tmp_path: Path, scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "w.pt")
    src = tmp_path / "w.pt"
    assert main(["import", str(src), str(tmp_path / "run"), "--step", "1", "--mesh", "dp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ckptd: error: --mesh lays out DCP imports only; {src} is a torch checkpoint "
                   "(import it, then `ckptd convert --mesh`)"]
    assert not (tmp_path / "run").exists()


def test_a_damaged_source_commits_nothing_and_removes_its_scratch(
    source: Path, scratch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = next(source.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    uri = tmp_path / "run"
    assert main(["import", "--from", "dcp", str(source), str(uri), "--step", "1", "--mesh", "dp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckptd: error: DCP item")
    assert not uri.exists() and list(scratch.iterdir()) == []
    with pytest.raises(IntegrityError):
        import_dcp(source, str(uri), step=1, mesh={"dp": 2})


def test_an_existing_step_is_refused_before_importing_and_replaced_with_overwrite(
    source: Path, scratch: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "run")
    ckptd.save({"old": torch.zeros(2)}, uri, step=5)
    with pytest.raises(CheckpointExistsError):
        import_dcp(source, uri, step=5, mesh={"dp": 2})
    assert list(scratch.iterdir()) == []  # refused before the first pass staged anything
    m = import_dcp(source, uri, step=5, mesh={"dp": 2}, overwrite=True)
    assert dict(m.mesh) == {"dp": 2} and stored_boxes(m.arrays["ids"]) == rows((0, 5), (5, 10))
    got: dict[str, Any] = {}
    ckptd.load(got, uri, step=5)
    assert_same(got, source_state())


def test_a_destination_that_cannot_be_written_fails_after_staging_and_removes_the_scratch(
    source: Path, scratch: Path, tmp_path: Path
) -> None:
    (tmp_path / "blocker").write_text("a file where the run root's parent should be")
    with pytest.raises(StorageError, match="Not a directory"):
        import_dcp(source, str(tmp_path / "blocker" / "run"), step=1, mesh={"dp": 2})
    assert list(scratch.iterdir()) == []


@pytest.mark.distributed
def test_a_trainer_at_the_mesh_restores_its_dtensors_bit_exactly(source: Path, tmp_path: Path) -> None:
    from tests.launch import launch

    uri = str(tmp_path / "run")
    import_dcp(source, uri, step=4, mesh={"dp": 2})
    # each rank asserts its local shards and full tensors; launch raises with their output otherwise
    launch([__file__, "{rank}", "{world}", "{port}", uri], 2, timeout=120, parent_store=True,
           env={"PYTHONWARNINGS": "ignore"}, cwd=None)


def _restore_at_mesh(rank: int, world: int, port: int, uri: str) -> None:
    """One rank of a dp=2 job: DTensors as fully_shard lays them out, filled by ``ckptd.load``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, None, is_master=False),
                            rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        want = source_state()
        tensors = {"model": want["model"], "top": {"ids": want["ids"]}}

        def placed(t: torch.Tensor, fill: torch.Tensor) -> DTensor:
            placement = Shard(0) if t.dim() and t.shape[0] >= world else Replicate()
            return distribute_tensor(fill, mesh, [placement])

        state = {"model": {k: placed(v, torch.zeros_like(v)) for k, v in want["model"].items()},
                 "ids": placed(want["ids"], torch.zeros_like(want["ids"]))}
        assert ckptd.load(state, uri) == 4
        for group in tensors.values():
            for k, v in group.items():
                got = state["model"][k] if k in state["model"] else state[k]
                assert torch.equal(got.to_local(), placed(v, v).to_local()), (rank, k)
                assert torch.equal(got.full_tensor(), v), (rank, k)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _restore_at_mesh(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
