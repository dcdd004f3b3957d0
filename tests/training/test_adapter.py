"""The state-dict adapter: canonical names, shapes, boxes and round trips (single process)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import train_config

from ckptd.format.boxes import ShardBox, check_tiling
from ckptd.training.adapter import CanonicalSpec, GPTStateAdapter, assemble_canonical, read_boxes
from ckptd.training.mesh import ParallelContext
from ckptd.training.model import GPTStage
from ckptd.training.trainer import Trainer
from ckptd.training.zero import ZeroAdamW


def rank_specs(
    dp: int, tp: int, pp: int, zero: int, tied: bool
) -> list[tuple[dict[str, int], dict[str, CanonicalSpec]]]:
    """Specs of every rank of a layout, computed without communication (nothing is run)."""
    cfg = train_config({"tp": tp, "pp": pp, "zero": zero, "untied": not tied})
    counts = cfg.parallel.layers_per_stage(cfg.model.n_layers)
    out = []
    for s, d, t in itertools.product(range(pp), range(dp), range(tp)):
        ctx = ParallelContext(world_size=dp * tp * pp, dp=dp, tp=tp, pp=pp, dp_rank=d, tp_rank=t, pp_rank=s)
        first = sum(counts[:s])
        stage = GPTStage(cfg.model, ctx, layers=range(first, first + counts[s]), dtype=torch.float32)
        opt = ZeroAdamW(stage, stage.param_metas(), ctx, cfg.optim, zero_stage=zero)
        out.append((ctx.coords, GPTStateAdapter(opt, ctx, tied_embeddings=tied).specs()))
    return out


LAYOUTS = [
    (2, 2, 2, 1, True),
    (4, 1, 2, 3, True),
    (1, 4, 1, 0, True),
    (2, 1, 4, 3, False),
    (3, 2, 1, 2, False),
]


@pytest.mark.parametrize(("dp", "tp", "pp", "zero", "tied"), LAYOUTS, ids=lambda v: str(v))
def test_writer_boxes_tile_every_canonical_tensor(dp: int, tp: int, pp: int, zero: int, tied: bool) -> None:
    ranks = rank_specs(dp, tp, pp, zero, tied)
    writers: dict[str, list[ShardBox]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for _coords, specs in ranks:
        for path, spec in specs.items():
            shapes[path] = spec.shape
            if spec.writer:
                writers.setdefault(path, []).append(spec.box)
    assert writers.keys() == shapes.keys()
    for path, boxes in writers.items():
        check_tiling(shapes[path], boxes)  # every element written exactly once
    # Non-writers hold a replica of some writer's box.
    for _coords, specs in ranks:
        for path, spec in specs.items():
            if not spec.writer:
                assert spec.box in writers[path], path
    assert ("model/lm_head.weight" in shapes) is not tied


@pytest.mark.parametrize(
    ("dp", "tp", "pp", "zero", "tied"), [x for x in LAYOUTS if x[0] != 3], ids=lambda v: str(v)
)
def test_boxes_agree_with_format_layout(dp: int, tp: int, pp: int, zero: int, tied: bool) -> None:
    """Where dp divides each tp block, the rank's box is exactly ``TensorLayout.box_for`` (a regular grid)."""
    for coords, specs in rank_specs(dp, tp, pp, zero, tied):
        mesh = {"dp": dp, "tp": tp, "pp": pp}
        for path, spec in specs.items():
            assert spec.layout.box_for(spec.shape, mesh, coords) == spec.box, (path, coords)


def test_canonical_tensors_are_unfused_and_unpadded() -> None:
    trainer = Trainer(train_config({}), ParallelContext())
    trainer.init_weights()
    specs = trainer.adapter.specs()
    assert specs["model/tok_embed.weight"].shape == (101, 64)  # padded to 104 inside the model
    assert specs["model/tok_embed.weight"].layout.padded == ((0, 104),)
    assert trainer.stage.embed is not None and trainer.stage.embed.weight.shape == (104, 64)
    assert [specs[f"model/blocks.2.attn.{p}.weight"].shape for p in "qkv"] == [(64, 64), (32, 64), (32, 64)]
    assert "model/lm_head.weight" not in specs  # tied
    fused = specs["model/blocks.2.attn.k.weight"].layout.fused
    assert fused is not None and (fused.index, fused.sizes) == (1, (64, 32, 32))
    canon = trainer.adapter.to_canonical()
    qkv = trainer.stage.blocks["2"].attn.qkv.weight
    torch.testing.assert_close(canon["model/blocks.2.attn.k.weight"].data, qkv[64:96], rtol=0, atol=0)
    torch.testing.assert_close(
        canon["model/tok_embed.weight"].data, trainer.stage.embed.weight[:101], rtol=0, atol=0
    )
    assert trainer.stage.embed.weight[101:].abs().sum() == 0
    assert {
        "optim/exp_avg/blocks.2.attn.q.weight",
        "optim/exp_avg_sq/final_norm.bias",
        "optim/step",
    } <= specs.keys()


def test_same_layout_resume_is_bit_exact() -> None:
    a = Trainer(train_config({"zero": 0}), ParallelContext())
    a.init_weights()
    for _ in range(2):
        a.train_step()
    full = assemble_canonical([a.adapter.to_canonical()])
    b = Trainer(train_config({"zero": 0}), ParallelContext())
    b.adapter.from_canonical(read_boxes(full, b.adapter.specs()))
    b.step = int(full["optim/step"])
    assert b.optimizer.step_count == 2
    assert a.train_step().loss == b.train_step().loss
    for path, t in a.adapter.to_canonical().items():
        assert torch.equal(t.data, b.adapter.to_canonical()[path].data), path


def test_from_canonical_rejects_missing_and_misshapen_boxes() -> None:
    trainer = Trainer(train_config({}), ParallelContext())
    full = {p: torch.zeros(s.shape, dtype=s.dtype) for p, s in trainer.adapter.specs().items()}
    with pytest.raises(KeyError, match=r"model/final_norm\.weight"):
        trainer.adapter.from_canonical({p: t for p, t in full.items() if p != "model/final_norm.weight"})
    full["model/final_norm.weight"] = torch.zeros(63)
    with pytest.raises(ValueError, match=r"final_norm\.weight"):
        trainer.adapter.from_canonical(full)
