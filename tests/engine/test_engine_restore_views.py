"""Restoring a checkpoint whose committed state tree is another rank's view of the state.

The committer (rank 0) records its own state tree; a later pipeline stage holds tensors
rank 0 never had. Restoring must fill those too — or refuse — never skip them silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptd.engine.config import TierConfig
from ckptd.engine.coordination import LocalCoordinator
from ckptd.engine.tiers import StoreTier
from ckptd.format import CheckpointWriter, LayoutError, Run
from ckptd.storage import open_store


def _commit_two_rank_checkpoint(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.randn(4, 3), torch.randn(5)
    run = Run(open_store(str(root)))
    store = run.prepare(10)
    w0 = CheckpointWriter(store, rank=0)
    w0.add("model/a", a)
    w1 = CheckpointWriter(store, rank=1)
    w1.add("model/b", b)
    rank0_view = {"model": {"a": {"$ckptd": "tensor", "path": "model/a"}}}
    run.commit(10, [w0.finish(), w1.finish()], state=rank0_view, world_size=2)
    return a, b


def test_tensors_missing_from_the_committed_tree_are_still_restored(tmp_path: Path) -> None:
    a, b = _commit_two_rank_checkpoint(tmp_path / "run")
    tier = StoreTier(TierConfig(kind="local", uri=str(tmp_path / "run")), LocalCoordinator())
    state = {"model": {"a": torch.zeros(4, 3), "b": torch.zeros(5)}}
    tier.load(10, state, {})
    assert torch.equal(state["model"]["a"], a)
    assert torch.equal(state["model"]["b"], b)


def test_a_tensor_the_checkpoint_lacks_is_an_error(tmp_path: Path) -> None:
    _commit_two_rank_checkpoint(tmp_path / "run")
    tier = StoreTier(TierConfig(kind="local", uri=str(tmp_path / "run")), LocalCoordinator())
    with pytest.raises(LayoutError, match="model/extra"):
        tier.load(10, {"model": {"a": torch.zeros(4, 3), "extra": torch.zeros(2)}}, {})
