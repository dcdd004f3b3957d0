"""CUDA paths: pinned pool reuse, copy stream ordered by events, per-optimizer GPU-side waits.

Skipped without a CUDA device; run by benchmarks/gpu_check.sh on a GPU machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import ckptd

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _model(width: int = 2048, depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]).cuda()


def test_snapshot_holds_the_values_of_its_step_while_training_goes_on(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(512, 2048, device="cuda")
    state = {"model": model, "optim": opt}
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=3, memory_keep=1) as ck:
        expected = {}
        for step in range(1, 10):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if step % 3 == 0:
                expected[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            ck.step(step)
        ck.wait()
        assert ck.pool.pin and all(s.arena.is_pinned() for s in ck.pool._slots)
        assert ck.pool.allocations <= ck.pool.max_slots + 1  # reused, not reallocated per snapshot
    for step in (6, 9):
        out: dict = {}
        ckptd.load(out, str(tmp_path / "run"), step=step)
        for k, v in expected[step].items():
            assert torch.equal(out["model"][k], v), (step, k)


def test_step_does_not_block_the_cpu_on_device_copies(tmp_path: Path) -> None:
    big = torch.nn.Linear(8192, 8192, bias=False).cuda()  # 256 MiB of fp32 + 512 MiB of Adam state
    opt = torch.optim.AdamW(big.parameters(), lr=1e-3, fused=True)
    big(torch.randn(64, 8192, device="cuda")).sum().backward()
    opt.step()
    with ckptd.Checkpointer(str(tmp_path / "run"), state={"m": big, "o": opt}, every=1, memory_keep=1) as ck:
        ck.step(1)  # warm-up: allocates the pinned slots
        ck.wait()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ck.step(2)
        issued = time.perf_counter() - t0
        torch.cuda.synchronize()
        copied = time.perf_counter() - t0
        ck.wait()
    assert ck.stager.hook_wait_s == 0.0  # the CPU never waited in the optimizer hook
    assert issued < max(0.5 * copied, 0.02), (issued, copied)


def test_optimizer_hook_orders_the_update_after_the_copy_on_the_gpu(tmp_path: Path) -> None:
    lin = torch.nn.Linear(4096, 4096, bias=False).cuda()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    with ckptd.Checkpointer(str(tmp_path / "run"), state={"m": lin, "o": opt}, every=1, memory_keep=1) as ck:
        with torch.no_grad():
            lin.weight.fill_(1.0)
        ck.step(1)
        lin.weight.grad = torch.full_like(lin.weight, 1.0)
        opt.step()  # launched right away; the GPU runs it only after the copy of step 1
        ck.wait()
        assert ck.memory is not None
        snap = ck.memory.get(1)
        assert snap is not None
        assert torch.equal(snap.host["m/weight"], torch.ones(4096, 4096))
    assert torch.equal(lin.weight, torch.zeros(4096, 4096, device="cuda"))


def test_restore_into_cuda_tensors(tmp_path: Path) -> None:
    model = _model(256, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    opt.step()
    with ckptd.Checkpointer(str(tmp_path / "run"), state={"m": model, "o": opt}, every=1) as ck:
        ck.step(1)
    fresh = _model(256, 2)
    torch.nn.init.zeros_(fresh[0].weight)
    opt2 = torch.optim.Adam(fresh.parameters())
    with ckptd.Checkpointer(str(tmp_path / "run"), state={"m": fresh, "o": opt2}, every=1) as ck:
        assert ck.restore() == 1
    assert fresh[0].weight.is_cuda and torch.equal(fresh[0].weight, model[0].weight)
    assert opt2.state[fresh[0].weight]["exp_avg"].is_cuda
