"""ckptd.dcp.StorageWriter / StorageReader in one process: dcp.save and dcp.load with one changed line."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import ckptd
import ckptd.dcp
from ckptd.cli.main import main
from tests.converters.test_convert_dcp import assert_same, source_state, zeros_like_state


@pytest.fixture(autouse=True)
def _single_process_dcp() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        yield


def test_dcp_save_writes_a_ckptd_checkpoint(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    dcp.save(source_state(), storage_writer=ckptd.dcp.StorageWriter(uri, step=12), no_dist=True)
    assert main(["verify", uri, "--step", "12"]) == 0
    state: dict[str, Any] = {}
    assert ckptd.load(state, uri) == 12
    assert_same(state, source_state())
    m = ckptd.open_run(uri).manifest(12)
    assert m.metadata["written_by"] == "torch.distributed.checkpoint"
    assert m.arrays["model/layers.0.bias"].shape == (6,)


def test_dcp_load_reads_a_ckptd_checkpoint(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    ckptd.save(source_state(), uri, step=2)  # written by ckptd itself, not through DCP
    target = zeros_like_state()
    dcp.load(target, storage_reader=ckptd.dcp.StorageReader(uri), no_dist=True)
    assert_same(target, source_state())


def test_dcp_load_reads_a_sub_region_into_a_smaller_request(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    dcp.save(source_state(), storage_writer=ckptd.dcp.StorageWriter(uri, step=1), no_dist=True)
    target = {"model": {"layers.0.weight": torch.zeros(6, 4)}}  # a subset of the keys
    dcp.load(target, storage_reader=ckptd.dcp.StorageReader(uri, step=1), no_dist=True)
    assert torch.equal(target["model"]["layers.0.weight"], source_state()["model"]["layers.0.weight"])


def test_existing_step_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    dcp.save(source_state(), storage_writer=ckptd.dcp.StorageWriter(uri, step=1), no_dist=True)
    changed = source_state()
    changed["step"] = 4
    with pytest.raises(CheckpointException, match="CheckpointExistsError: step 1 is already committed"):
        dcp.save(changed, storage_writer=ckptd.dcp.StorageWriter(uri, step=1), no_dist=True)
    dcp.save(changed, storage_writer=ckptd.dcp.StorageWriter(uri, step=1, overwrite=True), no_dist=True)
    state: dict[str, Any] = {}
    ckptd.load(state, uri)
    assert state["step"] == 4


class Opaque:
    pass


def test_non_json_values_are_refused_not_pickled(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    state = source_state()
    state["extra"]["obj"] = Opaque()
    with pytest.raises(
        CheckpointException, match=r"MetadataError: DCP item 'extra.obj' \(Opaque\) is not JSON-able"
    ):
        dcp.save(state, storage_writer=ckptd.dcp.StorageWriter(uri, step=1), no_dist=True)
    assert ckptd.open_run(uri).steps() == []
    # the failed attempt's lease is released: no thread keeps it fresh (gc may collect the attempt)
    deadline = time.monotonic() + 10
    while any(t.name == "ckptd-lease" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "ckptd-lease" for t in threading.enumerate())
