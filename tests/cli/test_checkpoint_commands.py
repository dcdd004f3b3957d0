"""``ckptd ls | inspect | verify | rm | gc`` as a user runs them (in-process and as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.cli.main import main
from tests.paths import data_path


@pytest.fixture()
def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for step in (10, 20):
        state = {
            "model": {
                "w": torch.arange(12.0).reshape(3, 4) * step,
                "emb": torch.ones(5, 2, dtype=torch.bfloat16),
            },
            "step": step,
        }
        ckptd.save(state, str(root), step=step, metadata={"metrics": {"loss": 1.0 / step}})
    return root


def test_ls_lists_committed_steps_as_json(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_root / "step_0000000030").mkdir()  # an uncommitted leftover must not be listed
    assert main(["ls", "--json", str(run_root)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert all(r["committed"] for r in rows)
    assert main(["ls", "--all", "--json", str(run_root)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["step"], r["committed"]) for r in rows] == [(10, True), (20, True), (30, False)]


def test_inspect_reports_shapes_dtypes_bytes_and_codecs(
    run_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--json", "--step", "10", str(run_root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 10
    emb = doc["arrays"]["model/emb"]
    assert emb["shape"] == [5, 2] and emb["dtype"] == "bfloat16" and emb["storage_dtype"] == "uint16"
    assert emb["nbytes"] == 20 and emb["codecs"] == "none"
    assert doc["metadata"]["metrics"]["loss"] == pytest.approx(0.1)
    assert main(["inspect", str(run_root)]) == 0
    text = capsys.readouterr().out
    assert "checkpoint step 20" in text and "model/w" in text and "float32" in text


def test_verify_names_the_corrupt_chunk_and_fails(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--all", "--quiet", str(run_root)]) == 0
    shard = data_path(run_root, 20) / "model" / "w" / "c.0.0"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", "--quiet", str(run_root)]) == 1
    out = capsys.readouterr().out
    assert "model/w/c.0.0" in out and "crc32c mismatch" in out
    assert main(["verify", "--quiet", "--step", "10", str(run_root)]) == 0


def test_missing_checkpoint_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no committed checkpoint" in err and "Traceback" not in err


def test_rm_and_gc(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rm", "--step", "10", str(run_root)]) == 0
    assert ckptd.open_run(str(run_root)).steps() == [20]
    (run_root / "step_0000000030" / "x").mkdir(parents=True)
    assert main(["gc", "--min-age", "0", "--dry-run", str(run_root)]) == 0
    assert (run_root / "step_0000000030").exists()
    assert main(["gc", "--min-age", "0", str(run_root)]) == 0
    assert not (run_root / "step_0000000030").exists()
    assert ckptd.open_run(str(run_root)).steps() == [20]


def test_console_script_runs_as_a_subprocess(run_root: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("ckptd")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ckptd"]
    out = subprocess.run(
        [*cmd, "ls", str(run_root)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "10" in out.stdout and "20" in out.stdout
