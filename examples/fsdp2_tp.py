"""FSDP2 + tensor parallelism wrapped in ckptd.Checkpointer, resumed at another mesh.

Train 20 steps on 4 processes (dp=2 x tp=2), then go on to step 30 on 2 (FSDP only):

    torchrun --nproc-per-node 4 examples/fsdp2_tp.py /tmp/ckptd-fsdp2 --dp 2 --tp 2 --steps 20
    torchrun --nproc-per-node 2 examples/fsdp2_tp.py /tmp/ckptd-fsdp2 --dp 2 --tp 1 --steps 30

gloo on CPU, NCCL on CUDA. The lines marked ``# ckptd`` are all that checkpointing adds: the
state is the model and optimizer as ``torch.distributed.checkpoint.state_dict`` sees them
(DTensors), so each rank writes the shards it owns and, at any other mesh, reads exactly its
new ones. Kill a run at any point and start it again: it continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ckptd  # ckptd

DIM, HIDDEN, LAYERS, BATCH = 64, 256, 4, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.down(torch.relu(self.up(x))))  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run root: a path or any fsspec URL (s3://...)")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = "cuda" if cuda else "cpu"
    mesh = init_device_mesh(device, (args.dp, args.tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)
    model = nn.Sequential(*(Block() for _ in range(LAYERS))).to(device)
    for block in model:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp_rank, dp = mesh["dp"].get_local_rank(), args.dp

    with ckptd.Checkpointer(args.run, state={"train": ckptd.TrainState(model, opt)},  # ckptd
                            optimizers=[opt], every=args.every) as ckpt:  # ckptd
        start = ckpt.restore()  # ckptd
        for step in range(start, args.steps):
            g = torch.Generator().manual_seed(step)  # the same global batch at any mesh
            x = torch.randn(BATCH, DIM, generator=g)[dp_rank * BATCH // dp:(dp_rank + 1) * BATCH // dp]
            loss = (model(x.to(device)) - x.to(device).roll(1, dims=-1)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            ckpt.step(step + 1, metrics={"loss": loss.item()})  # ckptd
            if dist.get_rank() == 0:
                print(f"step {step + 1} loss {loss.item():.5f} (dp={args.dp} tp={args.tp})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
