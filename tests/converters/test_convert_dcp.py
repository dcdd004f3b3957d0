"""DCP import/export in one process: round trips through torch.distributed.checkpoint, hostile metadata."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptd
from ckptd.cli.main import main
from ckptd.converters.dcp_import import import_dcp
from ckptd.converters.dcp_metadata import read_metadata
from ckptd.format.errors import MetadataError
from tests.converters.dcp_helpers import _single_process_dcp, assert_same  # noqa: F401 - autouse


def source_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "model": {
            "layers.0.weight": torch.randn(6, 4, generator=g),
            "layers.0.bias": torch.randn(6, generator=g).bfloat16(),
            "ids": torch.arange(7),
            "scale": torch.tensor(0.5),
        },
        "buffers": [torch.ones(3), torch.zeros(2, dtype=torch.int32)],
        "step": 3,
        "extra": {"lr": 0.1, "name": "run-a", "betas": (0.9, 0.95)},
    }


def zeros_like_state() -> dict[str, Any]:
    def zero(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return torch.zeros_like(node)
        if isinstance(node, dict):
            return {k: zero(v) for k, v in node.items()}
        if isinstance(node, list):
            return [zero(v) for v in node]
        return {int: 0, float: 0.0, str: "", tuple: (0.0, 0.0)}[type(node)]

    return dict(zero(source_state()))




def test_export_loads_with_dcp_load(tmp_path: Path) -> None:
    ckptd.save(source_state(), str(tmp_path / "run"), step=4)
    assert main(["export", "--format", "dcp", str(tmp_path / "run"), str(tmp_path / "dcp")]) == 0
    target = zeros_like_state()
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert_same(target, source_state())


def test_export_does_not_replace_a_dcp_checkpoint_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckptd.save(source_state(), str(tmp_path / "run"), step=4)
    args = ["export", "--format", "dcp", str(tmp_path / "run"), str(tmp_path / "dcp")]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a DCP checkpoint (use --overwrite)" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_import_of_dcp_save_output_verifies_and_loads(tmp_path: Path) -> None:
    dcp.save(source_state(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert main(["import", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "8"]) == 0
    assert main(["verify", str(tmp_path / "run"), "--step", "8"]) == 0
    state: dict[str, Any] = {}
    assert ckptd.load(state, str(tmp_path / "run")) == 8
    assert_same(state, source_state())


def test_import_holding_one_chunk_at_a_time_is_bit_exact(tmp_path: Path) -> None:
    dcp.save(source_state(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    import_dcp(tmp_path / "dcp", str(tmp_path / "run"), step=1, memory_bytes=1)  # flush after every chunk
    assert ckptd.open_run(str(tmp_path / "run")).verify(1) == []
    state: dict[str, Any] = {}
    ckptd.load(state, str(tmp_path / "run"))
    assert_same(state, source_state())


def test_export_then_import_round_trip(tmp_path: Path) -> None:
    ckptd.save(source_state(), str(tmp_path / "a"), step=1)
    assert main(["export", "--format", "dcp", str(tmp_path / "a"), str(tmp_path / "dcp")]) == 0
    assert main(["import", str(tmp_path / "dcp"), str(tmp_path / "b"), "--step", "1"]) == 0  # detected
    state: dict[str, Any] = {}
    ckptd.load(state, str(tmp_path / "b"))
    assert_same(state, source_state())


class _Payload:
    """Pickles as a call that would create ``marker`` when unpickled."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind, self.marker = kind, marker

    def __reduce__(self) -> tuple[Any, ...]:
        if self.kind == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.kind == "builtins.eval":
            return (eval, (f"open({str(self.marker)!r}, 'w').close()",))
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["whole file", "inside real metadata"])
def test_hostile_metadata_is_refused_and_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, where: str
) -> None:
    src = tmp_path / "dcp"
    dcp.save(source_state(), checkpoint_id=str(src), no_dist=True)
    marker = tmp_path / "pwned"
    payload = _Payload(kind, marker)
    if where == "whole file":
        doc: Any = payload
    else:
        doc = read_metadata(src)
        doc.planner_data = {"step": payload}  # a real Metadata with a payload deep inside
    (src / ".metadata").write_bytes(pickle.dumps(doc))
    assert main(["import", "--from", "dcp", str(src), str(tmp_path / "run"), "--step", "1"]) == 2
    err = capsys.readouterr().err
    name = kind.rpartition(".")[2]
    assert "refusing to load it" in err and name in err
    assert not marker.exists()
    assert ckptd.open_run(str(tmp_path / "run")).steps() == []


def test_oversized_metadata_is_refused_before_unpickling(tmp_path: Path) -> None:
    dcp.save(source_state(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    with pytest.raises(MetadataError, match="more than the 64 a DCP metadata file may have"):
        read_metadata(tmp_path / "dcp", max_bytes=64)


def test_garbage_metadata_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    assert main(["import", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "1"]) == 2
    assert "is not a readable DCP metadata file" in capsys.readouterr().err


def test_missing_data_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dcp.save(source_state(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for f in (tmp_path / "dcp").glob("*.distcp"):
        f.unlink()
    assert main(["import", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "1"]) == 2
    err = capsys.readouterr().err
    assert "data file" in err and "is missing" in err
    assert ckptd.open_run(str(tmp_path / "run")).steps() == []


class Opaque:
    def __init__(self) -> None:
        self.x = 1


def test_pickled_objects_in_dcp_items_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = source_state()
    state["extra"]["obj"] = Opaque()
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert main(["import", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "1"]) == 2
    err = capsys.readouterr().err
    assert "'extra.obj'" in err and "not a plain tensor or value record" in err


def test_not_a_checkpoint_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), str(tmp_path / "run"), "--step", "1"]) == 2
    assert "neither a DCP checkpoint" in capsys.readouterr().err
