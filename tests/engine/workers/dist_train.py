"""One rank of a gloo data-parallel job with a sharded tensor, checkpointed by ckptd.

Run as ``python -P dist_train.py MODE RUN_DIR OUT_DIR STEPS CRASH_AT EVERY`` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (what torchrun sets). Modes:
``reference_then_crash`` trains STEPS steps uncheckpointed (the reference), then trains
again from scratch with checkpoints until CRASH_AT and dies without closing anything;
``resume`` restores and trains to STEPS; ``reshard`` only restores and reports.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from workload import make, params, seed_all, train_step

import ckptd

GLOBAL = (10, 6)


def table_spec(world: int, rank: int) -> ckptd.ShardSpec:
    layout = ckptd.TensorLayout(partition=(("dp",), ()))
    mesh = {"dp": world}
    box = layout.box_for(GLOBAL, mesh, {"dp": rank})
    return ckptd.ShardSpec(shape=GLOBAL, box=box, layout=layout, mesh=mesh)


def dp_step(state: dict, world: int) -> float:
    model = state["model"]
    orig = state["optim"].step

    def allreduce_then_step(*a, **k):  # type: ignore[no-untyped-def]
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        return orig(*a, **k)

    state["optim"].step = allreduce_then_step
    try:
        loss = train_step(state)
    finally:
        del state["optim"].step
    for b in model.buffers():  # what DDP's broadcast_buffers does
        dist.broadcast(b, src=0)
    state["table"] += 0.5
    return loss


def fresh(world: int, rank: int) -> dict:
    state = make(seed=0)
    spec = table_spec(world, rank)
    full = torch.arange(GLOBAL[0] * GLOBAL[1], dtype=torch.float32).reshape(GLOBAL)
    state["table"] = full[spec.box.slices()].clone()
    return state


def main() -> None:
    mode, run_dir, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    steps, crash_at, every = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    out: dict = {"rank": rank}
    if mode == "reference_then_crash":
        state = fresh(world, rank)
        seed_all(1 + rank)
        out["losses"] = [dp_step(state, world) for _ in range(steps)]
        torch.save(params(state) | {"table": state["table"]}, f"{out_dir}/ref-{rank}.pt")
        with open(f"{out_dir}/ref-{rank}.json", "w") as f:
            json.dump(out, f)
        state = fresh(world, rank)
        seed_all(1 + rank)
        ck = ckptd.Checkpointer(run_dir, state=state, every=every, layouts={"table": table_spec(world, rank)})
        assert ck.restore() == 0
        for step in range(crash_at):
            dp_step(state, world)
            ck.step(step + 1)
            ck.wait()
        dist.barrier()
        os._exit(0)  # a crash: nothing is closed, nothing after the last checkpoint survives
    state = fresh(world, rank)
    seed_all(1000 + rank)
    layouts = {"table": table_spec(world, rank)}
    with ckptd.Checkpointer(run_dir, state=state, every=every, layouts=layouts) as ck:
        start = ck.restore()
        out["start"] = start
        out["position"] = state["data"]["position"]
        if mode == "resume":
            out["losses"] = [dp_step(state, world) for _ in range(start, steps)]
    torch.save(params(state) | {"table": state["table"]}, f"{out_dir}/{mode}-{rank}.pt")
    with open(f"{out_dir}/{mode}-{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
