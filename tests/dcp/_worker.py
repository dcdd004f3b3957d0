"""One rank of the DCP tests: an FSDP2 model + AdamW on a CPU gloo mesh.

Usage: _worker.py RANK WORLD PORT JOB OUT_DIR

Jobs
- ``save``: train one step, then save the same state with ``dcp.save`` through
  ``ckptd.dcp.StorageWriter`` (step 1), with ``dcp.async_save`` through it (step 2) and with
  plain DCP (``OUT/native``); load step 1 back into a fresh FSDP2 model with
  ``dcp.load`` through ``ckptd.dcp.StorageReader``. Rank 0 writes the full tensors as
  reference (``OUT/reference.pt``); every rank writes what it loaded back (``OUT/loaded_<rank>.pt``).
- ``load_export``: ``dcp.load`` the directory ``OUT/exported`` (written by
  ``ckptd export --format dcp``) into a fresh FSDP2 model; write the full tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

import ckptd.dcp


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # Odd sizes: FSDP2 shards 5 and 7 rows over 2 ranks unevenly (3+2, 4+3).
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.Embedding(9, 4))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(123)
    x = torch.randn(4, 6)
    emb = model[3](torch.tensor([1, 2, 8]))
    loss = model[2](model[1](model[0](x))).square().mean() + emb.square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": 3, "note": {"lr": 1e-2, "tag": "fsdp2"}}


def full(node: Any) -> Any:
    """The state with every DTensor replaced by its full tensor (collective on all ranks)."""
    if isinstance(node, DTensor):
        return node.full_tensor()
    if isinstance(node, torch.Tensor):
        return node.clone()
    if isinstance(node, dict):
        return {k: full(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(full(v) for v in node)
    return node


def fresh_state() -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A differently initialised model whose optimizer state exists (so DCP has places to fill)."""
    model, opt = build(seed=999)
    train_step(model, opt)
    state = state_of(model, opt)
    state["step"], state["note"] = 0, {"lr": 0.0, "tag": ""}
    return model, opt, state


def main() -> None:
    rank, world, port, job, out = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        Path(sys.argv[5]),
    )
    store = dist.TCPStore("127.0.0.1", port, None, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        if job == "save":
            model, opt = build(seed=0)
            train_step(model, opt)
            state = state_of(model, opt)
            run = str(out / "run")
            dcp.save(state, storage_writer=ckptd.dcp.StorageWriter(run, step=1))
            dcp.async_save(state, storage_writer=ckptd.dcp.StorageWriter(run, step=2)).result()
            dcp.save(state, checkpoint_id=str(out / "native"))
            reference = full(state)
            if rank == 0:
                torch.save(reference, out / "reference.pt")
            m2, o2, loaded = fresh_state()
            dcp.load(loaded, storage_reader=ckptd.dcp.StorageReader(run, step=1))
            set_state_dict(m2, o2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            torch.save(full(loaded), out / f"loaded_{rank}.pt")
        elif job == "load_export":
            m2, o2, loaded = fresh_state()
            dcp.load(loaded, checkpoint_id=str(out / "exported"))
            torch.save(full(loaded), out / f"exported_{rank}.pt")
        else:
            raise SystemExit(f"unknown job {job}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
