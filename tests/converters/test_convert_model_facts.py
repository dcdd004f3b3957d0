"""``ckptd convert --mesh`` refuses a target layout the trainer would refuse for the model the checkpoint
records (exit 2, one line), converts it with a warning under ``--force``, and converts fitting meshes."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.cli.main import main
from ckptd.converters.model_facts import recorded_facts
from ckptd.format.run import Run
from ckptd.storage import LocalStore
from ckptd.training.config import MODEL_FACTS_KEY
from tests import zygote

FACTS = {"vocab_size": 101, "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of the bundled trainer (one process): 2 layers, 4 heads over 2 kv heads."""
    root = tmp_path_factory.mktemp("trained") / "run"
    cmd = ["-P", "-m", "ckptd.training.trainer", "--ckpt", str(root), "--steps", "2",
           "--every", "2", "--layers", "2", "--width", "32", "--heads", "4", "--kv-heads", "2",
           "--ffn", "128", "--vocab", "101", "--seq-len", "16", "--global-batch", "4", "--micro-batch", "2",
           "--dtype", "fp32"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = zygote.run(cmd, cwd=root.parent, env=env, timeout=300)  # a fork of the warm test zygote
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root


def test_the_trainer_records_its_model_facts(trained: Path) -> None:
    m = Run(LocalStore(trained)).manifest(2)
    assert recorded_facts(m) == FACTS


@pytest.mark.parametrize(("mesh", "why"), [
    ("tp=3", "--tp 3 does not divide n_heads = 4"),
    ("tp=4", "--tp 4 does not divide n_kv_heads = 2"),
    ("pp=3,tp=1", "--pp 3 asks for more pipeline stages than the model has layers (2)"),
])
def test_convert_refuses_a_mesh_the_trainer_refuses(
    trained: Path, tmp_path: Path, mesh: str, why: str
) -> None:
    rc, out, err = cli("convert", str(trained), str(tmp_path / "dst"), "--mesh", mesh, "--quiet")
    assert rc == 2 and out == ""
    assert err.startswith("ckptd: error: target mesh ") and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "dst").exists()  # nothing written


def test_force_converts_with_a_warning(trained: Path, tmp_path: Path) -> None:
    rc, _, err = cli("convert", str(trained), str(tmp_path / "dst"), "--mesh", "tp=3", "--force", "--quiet")
    assert rc == 0, err
    assert err.startswith("ckptd: warning: target mesh tp=3") and "--tp 3 does not divide n_heads" in err
    converted = Run(LocalStore(tmp_path / "dst")).manifest(2)
    assert dict(converted.mesh) == {"tp": 3} and recorded_facts(converted) == FACTS
    assert Run(LocalStore(tmp_path / "dst")).verify(2) == []


def test_a_fitting_mesh_converts_silently_and_keeps_the_facts(trained: Path, tmp_path: Path) -> None:
    rc, _, err = cli("convert", str(trained), str(tmp_path / "dst"), "--mesh", "dp=2,tp=2,pp=2", "--quiet")
    assert rc == 0 and err == "", err
    converted = Run(LocalStore(tmp_path / "dst")).manifest(2)
    assert recorded_facts(converted) == FACTS
    # the converted checkpoint is checked again when converted further
    rc, _, err = cli("convert", str(tmp_path / "dst"), str(tmp_path / "again"), "--mesh", "tp=3", "--quiet")
    assert rc == 2 and "does not divide n_heads" in err


def test_facts_in_metadata_are_checked_and_absent_facts_are_not(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(8, 4)}}
    ckptd.save(state, str(tmp_path / "with"), step=1, metadata={MODEL_FACTS_KEY: FACTS})
    rc, _, err = cli("convert", str(tmp_path / "with"), str(tmp_path / "a"), "--mesh", "tp=3", "--quiet")
    assert rc == 2 and "does not divide n_heads = 4" in err
    ckptd.save(state, str(tmp_path / "without"), step=1)
    rc, _, err = cli("convert", str(tmp_path / "without"), str(tmp_path / "b"), "--mesh", "tp=3", "--quiet")
    assert rc == 0 and err == ""
    ckptd.save(state, str(tmp_path / "bad"), step=1, metadata={MODEL_FACTS_KEY: {**FACTS, "n_heads": "4"}})
    rc, _, err = cli("convert", str(tmp_path / "bad"), str(tmp_path / "c"), "--mesh", "tp=2", "--quiet")
    assert rc == 2 and err.startswith("ckptd: error: ") and "model fact n_heads = '4'" in err
