"""The Store conformance suite on memory, local disk and S3 (moto server), plus the same
checkpoint-level round trip (save, load, list, delete, GC) over all three backends."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.format.errors import CheckpointExistsError, CheckpointNotFoundError
from ckptd.format.run import Run, step_dir
from ckptd.format.store import Store
from ckptd.storage import FsspecStore, LocalStore, open_store
from ckptd.testing.store_conformance import StoreTests


def _memory_url() -> str:
    return f"memory://ckptd-test-{uuid.uuid4().hex}/run"


@pytest.fixture()
def memory_url() -> Iterator[str]:
    url = _memory_url()
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://").split("/")[0]
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


class TestMemoryStore(StoreTests):
    @pytest.fixture()
    def store(self, memory_url: str) -> Store:
        s = open_store(memory_url)
        assert isinstance(s, FsspecStore)
        return s


class TestLocalStore(StoreTests):
    @pytest.fixture()
    def store(self, tmp_path: Path) -> Store:
        s = open_store(str(tmp_path / "root"))
        assert isinstance(s, LocalStore)
        return s

    def test_file_url_is_local(self, tmp_path: Path) -> None:
        s = open_store(f"file://{tmp_path}/r")
        assert isinstance(s, LocalStore)
        s.write("a", [b"1"])
        assert (tmp_path / "r" / "a").read_bytes() == b"1"

    def test_escaping_keys_touch_nothing_on_disk(self, tmp_path: Path) -> None:
        s = LocalStore(tmp_path / "root" / "inner")
        for key in ["../x", "../../x", "/tmp/x"]:
            with pytest.raises(ckptd.StorageError):
                s.write(key, [b"evil"])
        assert sorted(p.name for p in tmp_path.rglob("*")) == []


@pytest.mark.s3
class TestS3Store(StoreTests):
    @pytest.fixture()
    def store(self, s3_url: str, s3_storage_options: dict[str, Any]) -> Store:
        s = open_store(s3_url, s3_storage_options)
        assert isinstance(s, FsspecStore)
        return s


# ---------------------------------------------------------------------- checkpoint level


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.s3)])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), None
    if request.param == "local":
        return str(tmp_path / "run"), None
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g).bfloat16()},
        "opt": {"step": torch.tensor(seed), "lr": 0.1 * seed, "betas": (0.9, 0.999)},
        "epoch": seed,
    }


def test_checkpoint_round_trip(run_root: tuple[str, dict[str, Any] | None]) -> None:
    uri, opts = run_root
    run = Run(open_store(uri, opts))
    assert run.steps() == []
    with pytest.raises(CheckpointNotFoundError):
        ckptd.load({}, uri, storage_options=opts)

    for step in (10, 2, 30):
        ckptd.save(_state(step), uri, step=step, storage_options=opts, chunk_bytes=1024)
    assert run.steps() == [2, 10, 30]
    assert run.latest() == 30
    assert run.uncommitted() == []

    target = {"model": {"w": torch.zeros(64, 33), "b": torch.zeros(33, dtype=torch.bfloat16)}}
    w = target["model"]["w"]
    assert ckptd.load(target, uri, storage_options=opts) == 30
    assert target["model"]["w"] is w
    ref = _state(30)
    assert torch.equal(w, ref["model"]["w"])
    assert torch.equal(target["model"]["b"].view(torch.int16), ref["model"]["b"].view(torch.int16))
    assert target["opt"]["lr"] == ref["opt"]["lr"] and target["opt"]["betas"] == (0.9, 0.999)
    assert int(target["opt"]["step"]) == 30 and target["epoch"] == 30

    assert ckptd.load(target, uri, step=2, storage_options=opts) == 2
    assert torch.equal(w, _state(2)["model"]["w"])
    for step in run.steps():
        assert run.verify(step) == []

    with pytest.raises(CheckpointExistsError):
        ckptd.save(_state(1), uri, step=10, storage_options=opts)
    ckptd.save(_state(11), uri, step=10, storage_options=opts, overwrite=True)
    ckptd.load(target, uri, step=10, storage_options=opts)
    assert torch.equal(w, _state(11)["model"]["w"])

    run.delete(30)
    assert run.steps() == [2, 10]
    assert run.latest() == 10
    with pytest.raises(CheckpointNotFoundError):
        ckptd.load(target, uri, step=30, storage_options=opts)
    assert ckptd.load(target, uri, storage_options=opts) == 10


def test_gc_collects_only_old_uncommitted_steps(run_root: tuple[str, dict[str, Any] | None]) -> None:
    uri, opts = run_root
    store = open_store(uri, opts)
    run = Run(store)
    ckptd.save(_state(1), uri, step=1, storage_options=opts)
    # a crashed writer's leftovers: shards without a manifest
    store.write(f"{step_dir(2)}/model/w/c/0/0", [b"partial shard"])
    store.write(f"{step_dir(2)}/model/w/zarr.json", [b"{}"])
    assert run.steps() == [1]
    assert run.uncommitted() == [2]
    with pytest.raises(CheckpointNotFoundError):
        run.manifest(2)

    # too young: may still be in progress
    assert run.gc_uncommitted(min_age_s=3600) == []
    assert run.gc_uncommitted(min_age_s=0, dry_run=True) == [2]
    assert run.uncommitted() == [2]
    time.sleep(0.05)
    assert run.gc_uncommitted(min_age_s=0) == [2]
    assert run.uncommitted() == []
    assert store.list_dir(step_dir(2)) == []
    # the committed checkpoint is untouched
    assert run.steps() == [1] and run.verify(1) == []
    # and saving the crashed step again works
    ckptd.save(_state(2), uri, step=2, storage_options=opts)
    assert run.steps() == [1, 2]


def test_save_over_stale_uncommitted_step_replaces_it(run_root: tuple[str, dict[str, Any] | None]) -> None:
    """A crashed attempt's leftovers never join a later save of the step. Format v2: the new save
    writes its own attempt and leaves the old one alone (it might be a live writer's); gc collects
    it once no lease holds it."""
    uri, opts = run_root
    store = open_store(uri, opts)
    crashed = f"{step_dir(5)}/a-00000000deadbeef"
    store.write(f"{crashed}/model/w/c.0.0", [b"junk from a crashed attempt"])
    store.write(f"{crashed}/model/w/zarr.json", [b"{}"])
    ckptd.save(_state(5), uri, step=5, storage_options=opts)
    run = Run(store)
    assert run.verify(5) == [] and run.manifest(5).attempt != "a-00000000deadbeef"
    loaded: dict[str, Any] = {}
    assert ckptd.load(loaded, uri, step=5, storage_options=opts) == 5
    assert torch.equal(loaded["model"]["w"], _state(5)["model"]["w"])
    time.sleep(0.05)
    assert run.gc_uncommitted(min_age_s=0) == [5]
    assert not store.exists(f"{crashed}/model/w/c.0.0") and not store.exists(f"{crashed}/model/w/zarr.json")
    assert run.steps() == [5] and run.verify(5) == []


def test_local_commit_leaves_no_temporary_files(tmp_path: Path) -> None:
    ckptd.save(_state(3), str(tmp_path), step=3)
    names = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    assert os.path.isfile(tmp_path / step_dir(3) / "manifest.json")
