"""ZeRO-3 holds 1/dp of the parameters plus a few gathered modules, not the whole model.

The trainer counts the bytes held in parameter tensors on each rank (``ZeroAdamW.meter``:
compute parameters or shards, plus every gathered weight while it is alive). At dp 4 with an
8-layer model, ZeRO-2 holds the full model on every rank; ZeRO-3's peak over three training
steps must stay within 1/dp of the model plus two layers. The single-process test shows why:
without re-gathering, autograd keeps every gathered weight from forward to backward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Result, train_config

from ckptd.training.mesh import ParallelContext
from ckptd.training.model import GPTStage
from ckptd.training.trainer import Trainer
from ckptd.training.zero import ZeroAdamW


def layer_bytes(layers: int) -> tuple[int, int]:
    """(model bytes, bytes of one transformer block) of the test model, fp32 compute."""
    stage = Trainer(train_config({"layers": layers}), ParallelContext()).stage
    model = sum(p.numel() * p.element_size() for p in stage.parameters())
    block = sum(p.numel() * p.element_size() for p in stage.blocks["0"].parameters())
    return model, block


@pytest.mark.distributed
def test_zero3_peak_parameter_bytes_stay_near_one_dp_share(world4: dict[str, Result]) -> None:
    unpadded, block = layer_bytes(8)
    stage2, stage3 = world4["zero2-dp4-8layers"], world4["zero3-dp4-8layers"]
    # ZeRO-2 computes with full weights everywhere: the model, its vocabulary padded for dp 4.
    model = stage2["param_bytes_peak"][0]
    assert stage2["param_bytes_peak"] == [model] * 4 and unpadded < model < unpadded * 1.05
    for peak in stage3["param_bytes_peak"]:
        assert model / 4 < peak <= model / 4 + 2 * block, (peak, model, block)
    assert max(stage3["param_bytes_peak"]) < model / 2


def _train_once(regather: bool, recompute: bool = False) -> tuple[int, int, dict[str, torch.Tensor]]:
    cfg = train_config({"layers": 8, "zero": 3})
    ctx = ParallelContext()
    stage = GPTStage(cfg.model, ctx, layers=range(8), dtype=torch.float32, recompute=recompute)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in stage.parameters():
            p.normal_(0.0, 0.02)
    opt = ZeroAdamW(
        stage, stage.param_metas(), ctx, cfg.optim, zero_stage=3,
        regather=lambda module: regather and not stage.recomputed(module),
    )  # fmt: skip
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1))
    opt.meter.reset_peak()
    loss = stage.loss(stage(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    opt.buckets.finish()
    grads = {name: torch.cat(st.grad) for name, st in opt.states.items()}
    return opt.meter.fixed, opt.meter.peak, grads


def test_regathering_frees_weights_between_forward_and_backward() -> None:
    model, block = layer_bytes(8)
    fixed, kept_peak, kept_grads = _train_once(regather=False)
    _, regather_peak, regather_grads = _train_once(regather=True)
    assert fixed == model  # dp 1: the shard is the whole model
    # Without re-gathering, the saved weights of all 8 layers are alive together at the turn.
    assert kept_peak >= fixed + 8 * block
    assert regather_peak <= fixed + 2 * block
    # Recomputed blocks gather again in backward and free the weights with the recomputed graph.
    _, recompute_peak, recompute_grads = _train_once(regather=True, recompute=True)
    assert recompute_peak <= fixed + 2 * block
    for name, g in kept_grads.items():  # the re-gathered weights give the very same gradients
        assert torch.equal(regather_grads[name], g), name
        assert torch.equal(recompute_grads[name], g), name
