"""DCP interop on 2 gloo ranks with an FSDP2 model + AdamW (see ``_worker.py`` for the rank side).

- ``dcp.save`` and ``dcp.async_save`` through ``ckptd.dcp.StorageWriter`` give verifiable ckptd
  checkpoints that load bit-exactly with ``ckptd.load`` in one process and with ``dcp.load``
  through ``ckptd.dcp.StorageReader`` into a fresh FSDP2 model;
- a checkpoint written by plain ``dcp.save`` imports, verifies and loads in one process;
- ``ckptd export --format dcp`` output loads with ``dcp.load`` into a 2-rank FSDP2 model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.cli.main import main
from tests.converters.test_convert_dcp import assert_same
from tests.launch import launch as launch_job

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent


def launch(job: str, out: Path, world: int = 2, timeout: float = 300) -> None:
    argv = [str(HERE / "_worker.py"), "{rank}", "{world}", "{port}", job, str(out)]
    launch_job(argv, world, timeout=timeout, parent_store=True, env={"PYTHONWARNINGS": "ignore"}, cwd=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dcp2")
    launch("save", out)
    return out


def reference(out: Path) -> dict[str, Any]:
    ref: dict[str, Any] = torch.load(out / "reference.pt", weights_only=True)
    return ref


def test_storage_writer_checkpoints_load_in_one_process(saved: Path) -> None:
    run = ckptd.open_run(str(saved / "run"))
    assert run.steps() == [1, 2]  # step 1: dcp.save, step 2: dcp.async_save
    for step in (1, 2):
        assert run.verify(step) == []
        assert run.manifest(step).world_size == 2
        state: dict[str, Any] = {}
        assert ckptd.load(state, str(saved / "run"), step=step) == step
        assert_same(state, reference(saved))


def test_storage_reader_fills_a_fresh_fsdp2_model(saved: Path) -> None:
    for rank in (0, 1):
        loaded = torch.load(saved / f"loaded_{rank}.pt", weights_only=True)
        assert_same(loaded, reference(saved))


def test_dcp_checkpoint_of_fsdp2_job_imports_verifies_and_loads(saved: Path, tmp_path: Path) -> None:
    uri = str(tmp_path / "imported")
    assert main(["import", "--from", "dcp", str(saved / "native"), uri, "--step", "5"]) == 0
    assert main(["verify", uri, "--step", "5"]) == 0
    state: dict[str, Any] = {}
    ckptd.load(state, uri)
    assert_same(state, reference(saved))


def test_exported_dcp_loads_into_a_2_rank_fsdp2_model(saved: Path) -> None:
    assert (
        main(["export", "--format", "dcp", str(saved / "run"), str(saved / "exported"), "--step", "2"]) == 0
    )
    launch("load_export", saved)
    for rank in (0, 1):
        loaded = torch.load(saved / f"exported_{rank}.pt", weights_only=True)
        assert_same(loaded, reference(saved))


@pytest.mark.slow
def test_dcp_backend_example_runs_under_torchrun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    example = HERE.parents[1] / "examples" / "dcp_backend.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*torchrun, str(example), "--ckpt", str(run), "--steps", "4", "--every", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "restored step 4" in out.stdout
    assert ckptd.open_run(str(run)).steps() == [2, 4]
    assert main(["verify", str(run), "--all"]) == 0
