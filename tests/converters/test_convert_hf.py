"""Hugging Face sharded safetensors: export, index consistency, streaming import, damaged shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptd
from ckptd.cli.main import main
from ckptd.converters.hf import import_safetensors, parse_size

INDEX = "model.safetensors.index.json"


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed_tokens.weight": torch.randn(40, 16, generator=g).bfloat16(),
        "layers.0.attn.weight": torch.randn(16, 16, generator=g),
        "layers.0.attn.bias": torch.randn(16, generator=g),
        "layers.1.attn.weight": torch.randn(16, 16, generator=g).half(),
        "norm.scale": torch.randn(16, generator=g).double(),
        "lm_head.weight": torch.randn(40, 16, generator=g),
        "position_ids": torch.arange(40),
    }


@pytest.fixture()
def run_root(tmp_path: Path) -> str:
    state = {"model": weights(), "optim": {"exp_avg": torch.randn(16, 16)}, "step": 3}
    ckptd.save(state, str(tmp_path / "run"), step=3)
    return str(tmp_path / "run")


def test_export_loads_with_safetensors_and_index_is_consistent(run_root: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    limit = 2500
    assert main(["export", "--format", "hf", run_root, str(out), "--select", "model.",
                 "--max-shard-size", str(limit)]) == 0  # fmt: skip
    index = json.loads((out / INDEX).read_text())
    expected = weights()
    # Every weight exactly once, under the model's own names; nothing outside the selection.
    assert sorted(index["weight_map"]) == sorted(expected)
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for fname in files:
        loaded = load_file(str(out / fname))
        assert sorted(loaded) == sorted(k for k, v in index["weight_map"].items() if v == fname)
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= limit or len(loaded) == 1  # only a tensor larger than the limit stands alone
        for name, t in loaded.items():
            assert t.dtype == expected[name].dtype
            assert torch.equal(t, expected[name])


def test_export_without_select_names_every_tensor_by_its_dotted_path(run_root: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--format", "hf", run_root, str(out)]) == 0
    names = json.loads((out / INDEX).read_text())["weight_map"]
    assert "model.layers.0.attn.weight" in names and "optim.exp_avg" in names
    assert len(set(names.values())) == 1  # everything fits one 5 GB file


def test_import_round_trip_is_bit_exact(run_root: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert (
        main(
            ["export", "--format", "hf", run_root, str(out), "--select", "model.", "--max-shard-size", "3KB"]
        )
        == 0
    )
    assert main(["import", str(out), str(tmp_path / "again"), "--step", "5"]) == 0
    model: dict[str, Any] = {k: torch.zeros_like(v) for k, v in weights().items()}
    assert ckptd.load(model, str(tmp_path / "again")) == 5
    for name, t in weights().items():
        assert model[name].dtype == t.dtype and torch.equal(model[name], t)
    assert ckptd.open_run(str(tmp_path / "again")).verify(5) == []


def test_import_holding_one_tensor_at_a_time_is_bit_exact(exported: Path, tmp_path: Path) -> None:
    import_safetensors(exported, str(tmp_path / "again"), step=1, memory_bytes=1)  # flush after each tensor
    model: dict[str, Any] = {}
    ckptd.load(model, str(tmp_path / "again"))
    assert sorted(model) == sorted(weights())
    assert all(torch.equal(model[k], v) for k, v in weights().items())


def test_import_single_hf_safetensors_file(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in weights().items()}, str(src))
    assert main(["import", str(src), str(tmp_path / "run"), "--step", "1"]) == 0
    state: dict[str, Any] = {}
    ckptd.load(state, str(tmp_path / "run"))
    assert sorted(state) == sorted(weights())
    assert all(torch.equal(state[k], v) for k, v in weights().items())


@pytest.fixture()
def exported(run_root: str, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    assert (
        main(
            ["export", "--format", "hf", run_root, str(out), "--select", "model.", "--max-shard-size", "3KB"]
        )
        == 0
    )
    return out


def _import_fails(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["import", str(src), str(dst), "--step", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ckptd: error:")
    assert ckptd.open_run(str(dst)).steps() == []  # nothing half-imported is committed
    return err


def test_missing_shard_is_a_one_line_error(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (exported / "model-00002-of-00003.safetensors").unlink()
    err = _import_fails(exported, tmp_path / "dst", capsys)
    assert "model-00002-of-00003.safetensors is missing" in err


def test_corrupt_shard_is_a_one_line_error(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = exported / "model-00001-of-00003.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])  # header length now absurd
    err = _import_fails(exported, tmp_path / "dst", capsys)
    assert "model-00001-of-00003.safetensors is unreadable" in err


def test_index_naming_a_weight_its_shard_lacks(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = json.loads((exported / INDEX).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (exported / INDEX).write_text(json.dumps(index))
    err = _import_fails(exported, tmp_path / "dst", capsys)
    assert "'ghost.weight'" in err


def test_shard_file_names_cannot_leave_the_directory(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = json.loads((exported / INDEX).read_text())
    index["weight_map"]["norm.scale"] = "../../etc/passwd"
    (exported / INDEX).write_text(json.dumps(index))
    assert "unsafe shard file" in _import_fails(exported, tmp_path / "dst", capsys)


def test_shards_carry_the_format_tag_transformers_requires(exported: Path) -> None:
    # transformers refuses safetensors files whose metadata lacks {"format": "pt"}.
    for f in exported.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            assert st.metadata()["format"] == "pt"


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("123", 123)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_bad_max_shard_size_is_a_cli_error(
    run_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--format", "hf", run_root, str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "bad size 'lots'" in capsys.readouterr().err
