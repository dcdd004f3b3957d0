"""Resharding at its edges: scalars and size-1 dimensions, the step it picks, the mesh it accepts, the
layout, codec and provenance it records, the bytes it reports, and the model rule it applies."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.converters import reshard
from ckptd.converters.model_facts import MODEL_FACTS_KEY
from ckptd.format import CheckpointWriter, Run, TensorLayout
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import CheckpointError, CheckpointNotFoundError, LayoutError
from ckptd.storage import LocalStore

# replicated over pp, split over tp: a target mesh without pp must drop pp from the record
ROWS = TensorLayout(partition=(("tp",), ()), replicated=("pp",))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "model/w": torch.randn(12, 8, generator=g),
        "model/row": torch.randn(1, 6, generator=g),  # a dimension of size 1 is still data
        "model/count": torch.tensor(41, dtype=torch.int64),  # a 0-d array: the scalar path
    }


def _source(root: Path, steps: tuple[int, ...] = (5,), facts: dict[str, Any] | None = None) -> Run:
    """One writer saves every array whole; ``model/w`` records the layout ``ROWS``."""
    run = Run(LocalStore(root))
    meta = {MODEL_FACTS_KEY: facts} if facts is not None else {}
    for step in steps:
        store = run.prepare(step)
        w = CheckpointWriter(store, rank=0, chunk_bytes=64)
        for path, t in _tensors().items():
            layout = ROWS if path == "model/w" else None
            w.add(path, t * step if t.is_floating_point() else t + step, layout=layout,
                  mesh={"tp": 1, "pp": 1} if layout else None)
        state = {"model": {p.split("/")[1]: {"$ckptd": "tensor", "path": p} for p in _tensors()}}
        run.commit(step, [w.finish()], state=state, world_size=1, mesh={"tp": 1, "pp": 1}, metadata=meta)
    return run


def _expected(step: int) -> dict[str, torch.Tensor]:
    return {p.split("/")[1]: (t * step if t.is_floating_point() else t + step) for p, t in _tensors().items()}


def _loaded(root: Path, step: int) -> dict[str, torch.Tensor]:
    out: dict[str, Any] = {}
    assert ckptd.load(out, str(root), step=step) == step
    return dict(out["model"])


def _shard_bytes(root: Path) -> int:
    """Bytes of the stored chunk objects: neither JSON documents nor the attempt's bookkeeping."""
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and not f.name.endswith(".json") and not f.parent.name.endswith(".meta"))


def test_scalars_and_size_one_dimensions_survive_a_reshard(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    dst = Run(LocalStore(tmp_path / "dst"))
    seen: list[int] = []
    result = reshard(src, dst, mesh={"tp": 2}, progress=seen.append)
    got = _loaded(tmp_path / "dst", 5)
    for name, want in _expected(5).items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert dst.verify(5) == []
    # progress counts the logical bytes of every non-scalar array, shard by shard
    assert sum(seen) == (12 * 8 + 1 * 6) * 4 and all(isinstance(n, int) for n in seen)
    # what it reports having written is exactly what landed in storage
    assert result.bytes_written == _shard_bytes(tmp_path / "dst") > 0


def test_the_recorded_layout_keeps_only_the_target_axes(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    m = reshard(src, Run(LocalStore(tmp_path / "dst")), mesh={"tp": 2}).manifest
    assert m.arrays["model/w"].layout == TensorLayout(partition=(("tp",), ()), replicated=())
    assert m.arrays["model/row"].layout is None
    kept = reshard(src, Run(LocalStore(tmp_path / "dst2")), mesh={"tp": 2, "pp": 3}).manifest
    assert kept.arrays["model/w"].layout == ROWS
    assert kept.world_size == 6 and kept.mesh == {"tp": 2, "pp": 3}


def test_the_latest_step_is_converted_by_default_and_provenance_is_recorded(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", steps=(3, 8))
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    m = reshard(src, Run(LocalStore(tmp_path / "dst")), mesh={"tp": 1}).manifest
    assert m.step == 8
    got = _loaded(tmp_path / "dst", 8)
    assert torch.equal(got["w"], _expected(8)["w"])
    origin = m.metadata["converted_from"]
    assert origin["uri"] == src.url and origin["step"] == 8 and origin["mesh"] == {"tp": 1, "pp": 1}
    at = dt.datetime.fromisoformat(origin["at"])
    assert at.microsecond == 0 and before <= at <= dt.datetime.now(dt.UTC)
    # an explicit source step and a different target step
    m3 = reshard(src, Run(LocalStore(tmp_path / "dst")), mesh={"tp": 1}, step=3, dst_step=30).manifest
    assert m3.step == 30 and m3.metadata["converted_from"]["step"] == 3
    assert torch.equal(_loaded(tmp_path / "dst", 30)["w"], _expected(3)["w"])


def test_an_empty_source_is_not_found(tmp_path: Path) -> None:
    src = Run(LocalStore(tmp_path / "empty"))
    with pytest.raises(CheckpointNotFoundError, match=r"^no committed checkpoint in \S+empty$"):
        reshard(src, Run(LocalStore(tmp_path / "dst")), mesh={"tp": 1})


@pytest.mark.parametrize("size", [0, -2, "2", 1.0])
def test_a_mesh_axis_must_be_a_positive_integer(tmp_path: Path, size: Any) -> None:
    src = _source(tmp_path / "src")
    with pytest.raises(LayoutError, match=rf"^mesh axis tp={size!r} must be a positive integer$"):
        reshard(src, Run(LocalStore(tmp_path / "dst")), mesh={"dp": 1, "tp": size})
    assert Run(LocalStore(tmp_path / "dst")).latest() is None


def test_converting_onto_an_existing_step_needs_overwrite(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    dst = Run(LocalStore(tmp_path / "dst"))
    reshard(src, dst, mesh={"tp": 1})
    with pytest.raises(CheckpointError, match="already committed"):
        reshard(src, dst, mesh={"tp": 2})
    assert dst.manifest(5).mesh == {"tp": 1}
    reshard(src, dst, mesh={"tp": 2}, overwrite=True)
    assert dst.manifest(5).mesh == {"tp": 2}


def test_a_requested_codec_is_used_for_every_array(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    zstd = CodecSpec("zstd", level=3)
    m = reshard(src, Run(LocalStore(tmp_path / "dst")), mesh={"tp": 2}, codec=zstd).manifest
    assert m.arrays["model/w"].codec == zstd and m.arrays["model/row"].codec == zstd
    assert m.arrays["model/count"].codec == CodecSpec()  # a scalar is stored raw, whatever was asked
    assert torch.equal(_loaded(tmp_path / "dst", 5)["w"], _expected(5)["w"])


def _at_most_two_tp(facts: Any, mesh: Any) -> str | None:
    return f"tp={mesh['tp']} exceeds {facts['max_tp']}" if mesh.get("tp", 1) > facts["max_tp"] else None


def test_the_model_rule_refuses_a_mesh_unless_forced(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", facts={"max_tp": 2})
    dst = Run(LocalStore(tmp_path / "dst"))
    with pytest.raises(LayoutError, match=r"^target mesh tp=4 does not fit the model step 5 records: "
                                          r"tp=4 exceeds 2 \(--force converts anyway\)$"):
        reshard(src, dst, mesh={"tp": 4}, refuse=_at_most_two_tp)
    assert dst.latest() is None
    assert reshard(src, dst, mesh={"tp": 2}, refuse=_at_most_two_tp).manifest.mesh == {"tp": 2}
    forced = reshard(src, dst, mesh={"tp": 4}, refuse=_at_most_two_tp, force=True, dst_step=6).manifest
    assert forced.mesh == {"tp": 4}
    assert torch.equal(_loaded(tmp_path / "dst", 6)["w"], _expected(5)["w"])


def test_the_converted_manifest_counts_what_was_written(tmp_path: Path) -> None:
    """`ckptd info` and the next conversion read the totals: they are the target's, not zeros."""
    src = _source(tmp_path / "src")
    dst = Run(LocalStore(tmp_path / "dst"))
    result = reshard(src, dst, mesh={"tp": 2})
    totals = dst.manifest(5).totals
    source = src.manifest(5).totals
    shard_files = [f for f in (tmp_path / "dst").rglob("*") if f.is_file() and not f.name.endswith(".json")
                   and not f.parent.name.endswith(".meta")]
    assert totals.arrays == 3
    assert totals.shards == len(shard_files)
    assert totals.nbytes == source.nbytes == 12 * 8 * 4 + 6 * 4 + 8  # logical bytes do not change
    assert totals.stored_bytes == result.bytes_written
    assert totals.writers == 1
    # a second conversion reads what the first wrote
    again = reshard(dst, Run(LocalStore(tmp_path / "again")), mesh={"tp": 1})
    assert again.bytes_read == result.bytes_written
