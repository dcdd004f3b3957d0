"""Import/export: torch.save and safetensors files round-trip through the universal format."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.cli.main import main


@pytest.fixture()
def run_root(tmp_path: Path) -> str:
    state = {"model": {"w": torch.randn(20, 8), "emb": torch.randn(5, 4).bfloat16()}, "step": 3, "lr": 0.1}
    ckptd.save(state, str(tmp_path / "run"), step=3)
    return str(tmp_path / "run")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_then_import_is_bit_exact(run_root: str, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"export{suffix}"
    assert main(["export", run_root, str(out)]) == 0
    assert main(["import", str(out), str(tmp_path / "again"), "--step", "9"]) == 0
    original: dict[str, Any] = {}
    again: dict[str, Any] = {}
    ckptd.load(original, run_root)
    assert ckptd.load(again, str(tmp_path / "again")) == 9
    for k in ("w", "emb"):
        assert again["model"][k].dtype == original["model"][k].dtype
        assert torch.equal(again["model"][k], original["model"][k])
    if suffix == ".pt":
        assert again["step"] == 3 and again["lr"] == 0.1


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("code ran",))


def test_import_refuses_pickled_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    assert main(["import", str(bad), str(tmp_path / "run"), "--step", "1"]) == 2
    captured = capsys.readouterr()
    assert "code ran" not in captured.out
    assert "weights_only" in captured.err
    assert ckptd.open_run(str(tmp_path / "run")).steps() == []
