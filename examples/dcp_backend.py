"""Keep your ``torch.distributed.checkpoint`` code; store ckptd checkpoints. One line changes.

Run on CPU (gloo) or CUDA (NCCL):

    torchrun --nproc-per-node 2 examples/dcp_backend.py --ckpt /tmp/dcp_backend_run

An FSDP2 model and AdamW train for a few steps and checkpoint the way torchtitan does —
``dcp.async_save``, waiting for the previous save before starting the next — except that the
storage writer is ``ckptd.dcp.StorageWriter``. The run then restores the last step with
``dcp.load`` through ``ckptd.dcp.StorageReader``. Afterwards the checkpoints are ordinary ckptd
checkpoints::

    ckptd ls /tmp/dcp_backend_run
    ckptd verify /tmp/dcp_backend_run --all
    python -c "import ckptd; s = {}; ckptd.load(s, '/tmp/dcp_backend_run'); print(sorted(s['model']))"
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import init_device_mesh

import ckptd.dcp


def build(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def state_of(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd, "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default="/tmp/dcp_backend_run", help="ckptd run root (path or fsspec URL)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, optim = build(device)
    # As torchtitan does: saves run in a background thread, so their collectives get a gloo
    # group of their own instead of interleaving with the training's all-gathers.
    ckpt_group = dist.new_group(backend="gloo")

    pending: Future[Any] | None = None
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 64, device=device)
        loss = (model(x) - x).square().mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % args.every == 0:
            if pending is not None:
                pending.result()  # as torchtitan does: one save in flight at a time
            pending = dcp.async_save(
                state_of(model, optim, step),
                # Before: storage_writer=dcp.FileSystemWriter(f"{args.ckpt}/step-{step}")
                storage_writer=ckptd.dcp.StorageWriter(args.ckpt, step=step, overwrite=True),
                process_group=ckpt_group,
            )
            if dist.get_rank() == 0:
                print(f"step {step}: loss {loss.item():.4f}, checkpoint started", flush=True)
    if pending is not None:
        pending.result()

    # Restore the newest checkpoint into the sharded model and optimizer in place.
    state = state_of(model, optim, 0)
    # Before: storage_reader=dcp.FileSystemReader(f"{args.ckpt}/step-{args.steps}")
    dcp.load(state, storage_reader=ckptd.dcp.StorageReader(args.ckpt))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if dist.get_rank() == 0:
        print(f"restored step {state['step']} from {args.ckpt}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
