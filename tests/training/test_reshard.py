"""Canonical state moves between layouts through the state-dict adapter, in memory (no storage).

The dp2-tp2-pp2 ZeRO-1 run's canonical shards (fused QKV unfused, vocabulary unpadded, ZeRO and
TP shards assembled) are loaded into other layouts, which continue training: the next-step loss
must match an uninterrupted run — exactly in the same layout, within 1e-5 in another.
The same moves through real checkpoints written and read by ``ckptd train`` are in
test_checkpointing.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import Result, reference, rel_diff, train_config

from ckptd.training.adapter import read_boxes
from ckptd.training.mesh import ParallelContext
from ckptd.training.trainer import Trainer

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[list[float], dict[str, torch.Tensor], Any]:
    return reference({}, steps=4)


def test_resume_same_layout_is_bit_exact(world8: dict[str, Result]) -> None:
    resumed, straight = world8["resume-dp2-tp2-pp2"], world8["uninterrupted-dp2-tp2-pp2"]
    assert resumed["losses"][0] == straight["losses"][3]
    assert resumed["state"].keys() == straight["state"].keys()
    for path, t in straight["state"].items():
        assert torch.equal(resumed["state"][path], t), path


def test_resume_at_dp4_pp2_zero3_matches_uninterrupted(world8: dict[str, Result], uninterrupted: Any) -> None:
    ref_losses, ref_state, _ = uninterrupted
    got = world8["resume-dp4-tp1-pp2-zero3"]
    assert abs(got["losses"][0] - ref_losses[3]) <= 1e-5 * abs(ref_losses[3])
    assert int(got["state"]["optim/step"]) == 4
    assert rel_diff(got["state"]["model/tok_embed.weight"], ref_state["model/tok_embed.weight"]) <= 1e-5


def test_resume_single_process_from_dp2_tp2_pp2(world8: dict[str, Result], uninterrupted: Any) -> None:
    ref_losses, _, _ = uninterrupted
    trainer = Trainer(train_config({}), ParallelContext())
    state = world8["dp2-tp2-pp2"]["state"]
    trainer.adapter.from_canonical(read_boxes(state, trainer.adapter.specs()))
    trainer.step = int(state["optim/step"])
    loss = trainer.train_step().loss
    assert abs(loss - ref_losses[3]) <= 1e-5 * abs(ref_losses[3])
    # The loaded optimizer state matters: dropping the Adam moments changes the next step.
    fresh = Trainer(train_config({}), ParallelContext())
    no_moments = {
        p: (t if p.startswith("model/") or p == "optim/step" else torch.zeros_like(t))
        for p, t in read_boxes(state, fresh.adapter.specs()).items()
    }
    fresh.adapter.from_canonical(no_moments)
    fresh.step = 3
    fresh.train_step()
    trained = trainer.adapter.to_canonical()["model/blocks.0.mlp.fc1.weight"].data
    assert rel_diff(fresh.adapter.to_canonical()["model/blocks.0.mlp.fc1.weight"].data, trained) > 1e-4
