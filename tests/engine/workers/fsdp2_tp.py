"""One rank of a gloo job training a small FSDP2 x tensor-parallel model, checkpointed by ckptd.

Run as ``python -P fsdp2_tp.py MODE RUN_DIR OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (what torchrun sets). Modes:

``source`` (4 ranks, dp=2 x tp=2)
    trains K steps with ``Checkpointer(every=K)``, dumps every tensor's ``full_tensor()`` at
    step K (``full-K.pt``), trains on to K+M and records the losses (the uninterrupted run);
``resume4`` (4 ranks)
    restores the checkpoint at dp=2 x tp=2 and trains M steps (losses must equal ``source``'s),
    then at FSDP 4;
``resume2`` (2 ranks)
    restores at FSDP 2;
``resume1`` (1 process, no process group)
    restores into the plain model;
``lazy`` (2 ranks, FSDP 2)
    the optimizer steps right after a lazy snapshot; then a Partial DTensor is refused.

Every restore reports its ``full_tensor()``s and, after training M steps, its losses together
with those of a reference run in the same layout whose state comes from ``full-K.pt`` through
torch's own full-state-dict loading (the layout's uninterrupted continuation; at dp=2 x tp=2
the source job's own continuation is the reference).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ckptd
from ckptd.engine.dtensor_state import TrainState

K, M, BATCH, D, H = 3, 3, 8, 6, 22


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)  # 22 rows: uneven shards at tp=2 x dp=2 and at FSDP 4
        self.down = nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)  # FSDP only: a DTensor on the dp sub-mesh, copied over tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))  # type: ignore[no-any-return]


def build(layout: tuple[int, int] | None, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """(model, AdamW, dp mesh or None) for dp x tp = ``layout`` (tp 1: FSDP only); None: one process."""
    torch.manual_seed(seed)
    model = Mlp()
    dp_mesh = None
    if layout is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        dp, tp = layout
        if tp > 1:
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
            dp_mesh = mesh["dp"]
        else:
            dp_mesh = init_device_mesh("cpu", (dp,), mesh_dim_names=("dp",))
        fully_shard(model, mesh=dp_mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01), dp_mesh


def train_step(model: nn.Module, opt: torch.optim.Optimizer, dp_mesh: Any, step: int) -> float:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, D, generator=g), torch.randn(BATCH, D, generator=g)
    dp = dp_mesh.size() if dp_mesh is not None else 1
    r = dp_mesh.get_local_rank() if dp_mesh is not None else 0
    rows = slice(r * BATCH // dp, (r + 1) * BATCH // dp)
    loss = nn.functional.mse_loss(model(x[rows]), y[rows])
    loss.backward()
    opt.step()
    opt.zero_grad()
    report = loss.detach().clone()
    if dp_mesh is not None:
        dist.all_reduce(report, group=dp_mesh.get_group())
    return float(report) / dp


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state, gathered whole (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    out: dict[str, torch.Tensor] = {}
    for k, v in msd.items():
        out[f"model/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone()
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            out[f"optim/{fqn}/{name}"] = v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone()
    return out


def reference(layout: tuple[int, int] | None, full: dict[str, torch.Tensor]) -> list[float]:
    """The layout's uninterrupted continuation: step-K state from ``full`` via torch, M steps."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt, dp_mesh = build(layout, seed=7)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, {k[len("model/"):]: v for k, v in full.items() if k.startswith("model/")},
                         options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)  # creates the state, learns the groups
    for key, v in full.items():
        if key.startswith("optim/"):
            fqn, name = key[len("optim/"):].rsplit("/", 1)
            osd["state"][fqn][name] = v.clone()
    set_optimizer_state_dict(model, opt, osd, options=opts)
    return [train_step(model, opt, dp_mesh, s) for s in range(K, K + M)]


def restore_and_continue(layout: tuple[int, int] | None, run: str, out: Path, tag: str) -> None:
    model, opt, dp_mesh = build(layout, seed=123)  # other weights: only the restore can make them right
    with ckptd.Checkpointer(run, state={"train": TrainState(model, opt)}, optimizers=[opt],
                            handle_signals=False) as ckpt:
        start = ckpt.restore(K)
        restored = full_state(model, opt)
        losses = [train_step(model, opt, dp_mesh, s) for s in range(start, start + M)]
    # at dp=2 x tp=2 the reference is the source job itself (torch's full-state loading cannot
    # build an uneven _StridedShard in this torch: an AssertionError in distribute_tensor)
    ref = reference(layout, torch.load(out / f"full-{K}.pt", weights_only=True)) if layout != (2, 2) else []
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(restored, out / f"restored-{tag}.pt")
        (out / f"{tag}.json").write_text(json.dumps({"start": start, "losses": losses, "reference": ref}))


def save_and_load(layout: tuple[int, int], run: str, out: Path) -> None:
    """``ckptd.save`` / ``ckptd.load`` of DTensor states on every rank (no Checkpointer)."""
    model, opt, _ = build(layout, seed=5)
    with ckptd.Checkpointer(run, state={"train": TrainState(model, opt)}, handle_signals=False) as ckpt:
        ckpt.restore(K)
    ckptd.save({"train": TrainState(model, opt), "note": "plain"}, str(out / "saved"), step=K)
    fresh, fresh_opt, _ = build(layout, seed=6)
    state: dict[str, Any] = {"train": TrainState(fresh, fresh_opt), "note": None}
    step = ckptd.load(state, str(out / "saved"))
    got, want = full_state(fresh, fresh_opt), full_state(model, opt)
    same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if dist.get_rank() == 0:
        (out / "save_load.json").write_text(json.dumps({"step": step, "note": state["note"], "same": same}))


def source(run: str, out: Path) -> None:
    model, opt, dp_mesh = build((2, 2), seed=0)
    losses = []
    with ckptd.Checkpointer(run, state={"train": TrainState(model, opt)}, optimizers=[opt], every=K,
                            handle_signals=False) as ckpt:
        for step in range(K + M):
            losses.append(train_step(model, opt, dp_mesh, step))
            ckpt.step(step + 1)
            if step + 1 == K:
                full = full_state(model, opt)
                if dist.get_rank() == 0:
                    torch.save(full, out / f"full-{K}.pt")
    if dist.get_rank() == 0:
        placements = {k: str(v.placements) for k, v in model.state_dict().items()}
        (out / "source.json").write_text(json.dumps({"losses": losses, "placements": placements}))


def lazy(run: str, out: Path) -> None:
    """FSDP 2: the optimizer steps right after ``save()`` returns; the checkpoint holds pre-step values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.Linear(2048, 512))  # ~2M params: copies take a while
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with ckptd.Checkpointer(run, state={"train": TrainState(model, opt)}, optimizers=[opt], memory_keep=0,
                            handle_signals=False) as ckpt:
        for step in range(2):
            model(torch.randn(4, 512)).square().mean().backward()
            if step == 1:
                before = full_state(model, opt)
                ckpt.save(1)
            opt.step()  # right away: the pre-step hook must wait for the lazy copies of the shards
            opt.zero_grad()
        ckpt.wait()
        after = full_state(model, opt)
        waited = ckpt.stager.hook_wait_s
    partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    try:
        ckptd.save({"x": partial}, run, step=9)
        refused = "no error"
    except ckptd.LayoutError as e:
        refused = str(e)
    if dist.get_rank() == 0:
        torch.save({"before": before, "after": after}, out / "lazy.pt")
        (out / "lazy.json").write_text(json.dumps({"hook_wait_s": waited, "partial": refused}))


def main() -> None:
    mode, run, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "resume1":
        restore_and_continue(None, run, out, "fsdp1")
        return
    dist.init_process_group("gloo")
    try:
        if mode == "source":
            source(run, out)
        elif mode == "resume4":
            restore_and_continue((2, 2), run, out, "dp2tp2")
            restore_and_continue((4, 1), run, out, "fsdp4")
        elif mode == "resume2":
            restore_and_continue((2, 1), run, out, "fsdp2")
            save_and_load((2, 1), run, out)
        elif mode == "lazy":
            lazy(run, out)
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
