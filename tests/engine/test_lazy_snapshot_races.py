"""Lazy snapshots against an optimizer that steps at once (CPU).

``Checkpointer.step()`` returns before optimizer-owned tensors are copied; the optimizer's
pre-step hook is all that stops ``opt.step()`` from changing a tensor the copy thread is still
reading. Here the copy is throttled (tiny ``copy_chunk_bytes``: thousands of small copies per
tensor), the optimizer steps immediately after ``step()``, and the stored checkpoint must hold
exactly the values of the step boundary, bit for bit, for several optimizers, their foreach and
fused kernels, and several param groups.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.engine.config import CheckpointerConfig

WIDTH = 256  # 256 KiB per weight: with 512-byte copy chunks, 512 copies per tensor
COPY_CHUNK_BYTES = 512

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2, foreach=False),
    "adamw-foreach": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=True),
}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.Linear(WIDTH, 1),
    )


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Three param groups with their own hyperparameters (the hook must guard all of them)."""
    first, second, head = model[0], model[2], model[3]
    return [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": 3e-3},
        {"params": list(head.parameters()), "lr": 1e-3, "weight_decay": 0.0},
    ]


def _backward(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, WIDTH, generator=g)
    model.zero_grad()
    model(x).square().mean().backward()


def _values(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint holds for model and optimizer, cloned, by a stable name."""
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{i}/{k}"] = v.detach().clone()
    return out


def _assert_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    changed = [
        k
        for k in want
        if not torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
    ]
    assert not changed, f"{what}: the stored checkpoint differs from the step boundary in {changed}"


def _stored(run: Path, step: int, factory: OptimizerFactory) -> dict[str, torch.Tensor]:
    """The checkpoint of ``step`` loaded into a fresh model and optimizer of the same structure."""
    model = _model(seed=123)
    opt = factory(_groups(model))
    _backward(model, seed=0)
    opt.step()  # the optimizer's state tensors exist before they are loaded into
    ckptd.load({"model": model, "optim": opt}, str(run), step=step)
    return _values(model, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_stored_checkpoint_holds_the_values_of_the_step_boundary(tmp_path: Path, name: str) -> None:
    factory = OPTIMIZERS[name]
    model = _model(seed=1)
    opt = factory(_groups(model))
    _backward(model, seed=0)
    opt.step()  # moments and momentum buffers exist: they are lazily copied too
    config = CheckpointerConfig(
        uri=str(tmp_path / "run"),
        every=1,
        copy_chunk_bytes=COPY_CHUNK_BYTES,
        handle_signals=False,
        save_rng=False,
    )
    expected: dict[int, dict[str, torch.Tensor]] = {}
    with ckptd.Checkpointer(config.uri, state={"model": model, "optim": opt}, config=config) as ck:
        for step in (1, 2):
            _backward(model, seed=step)  # gradients are ready before the boundary, as in a real loop
            expected[step] = _values(model, opt)
            ck.step(step)
            opt.step()  # at once: the copies of this very step are still running
            ck.wait()  # only now (a busy slow tier would otherwise skip to the newest snapshot)
        after = _values(model, opt)
        waited = ck.stager.hook_wait_s
    for step, want in expected.items():
        _assert_bits(_stored(tmp_path / "run", step, factory), want, f"{name} step {step}")
    # the optimizer really changed every tensor after the boundary (so a torn copy would show) ...
    assert all(not torch.equal(after[k], expected[2][k]) for k in after if k.startswith("model/")), name
    # ... and it did find copies still pending: the race was exercised, not avoided
    assert waited > 0, f"{name}: the optimizer never had to wait, the copies finished first"


def test_the_memory_tier_rolls_back_to_the_boundary_despite_the_immediate_step(tmp_path: Path) -> None:
    """The in-process rollback snapshot is the same host copy: it must hold the boundary too."""
    model = _model(seed=2)
    opt = OPTIMIZERS["adamw-foreach"](_groups(model))
    _backward(model, seed=0)
    opt.step()
    config = CheckpointerConfig(
        uri=str(tmp_path / "run"),
        every=1,
        memory_keep=1,
        copy_chunk_bytes=COPY_CHUNK_BYTES,
        handle_signals=False,
        save_rng=False,
    )
    with ckptd.Checkpointer(config.uri, state={"model": model, "optim": opt}, config=config) as ck:
        _backward(model, seed=1)
        at_boundary = _values(model, opt)
        ck.step(1)
        opt.step()
        opt.step()
        assert ck.rollback() == 1
        _assert_bits(_values(model, opt), at_boundary, "rollback")


def test_a_state_without_optimizer_step_is_unchanged_by_the_race_guard(tmp_path: Path) -> None:
    """Tensors no optimizer owns are copied before step() returns: changing them at once is safe."""
    model = _model(seed=3)
    opt = OPTIMIZERS["adam"](_groups(model))
    buffer = torch.arange(WIDTH * WIDTH, dtype=torch.float32)
    config = CheckpointerConfig(
        uri=str(tmp_path / "run"),
        every=1,
        copy_chunk_bytes=COPY_CHUNK_BYTES,
        handle_signals=False,
        save_rng=False,
    )
    with ckptd.Checkpointer(
        config.uri, state={"model": model, "optim": opt, "buf": buffer}, config=config
    ) as ck:
        want = buffer.clone()
        ck.step(1)
        buffer.mul_(-1.0)  # not optimizer-owned: must already be copied
        ck.wait()
    got: dict[str, Any] = {}
    ckptd.load(got, str(tmp_path / "run"), step=1)
    assert torch.equal(got["buf"], want)
