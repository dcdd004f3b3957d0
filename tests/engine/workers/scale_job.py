"""One rank of a gloo job exercising the v2 commit protocol (launched like torchrun).

``python -P scale_job.py MODE RUN_DIR OUT_DIR`` with RANK/WORLD_SIZE/MASTER_* set. The state is a
table sharded over every rank (row blocks) plus a replicated vector, filled with values that
depend on the step, so any rank of any world size can check what it restored. Modes:

* ``save``: checkpoints steps 1 and 2 (every=1), then exits;
* ``restore``: restores the latest step at this world size, writes its box to OUT_DIR;
* ``kill_mid_save``: saves step 1, then at step 2 the last rank SIGKILLs itself while writing;
  the others record how long the failing save took to surface and what it raised;
* ``preempt_one``: only rank 1 gets SIGUSR1 (from itself, mid-loop); every rank records the step
  at which the job checkpointed;
* ``no_wait``: rank 1 is slow before its second step; rank 0 records how long its own ``step()``
  took meanwhile (no blocking collective: it does not wait for rank 1).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import ckptd

ROWS, COLS = 64, 33


def table_spec(world: int, rank: int) -> ckptd.ShardSpec:
    layout = ckptd.TensorLayout(partition=(("dp",), ()))
    mesh = {"dp": world}
    return ckptd.ShardSpec(
        shape=(ROWS, COLS), box=layout.box_for((ROWS, COLS), mesh, {"dp": rank}), layout=layout, mesh=mesh
    )


def values(step: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) * 1.5 + step


def fresh(world: int, rank: int, step: int) -> tuple[dict, dict]:
    spec = table_spec(world, rank)
    state = {
        "table": values(step)[spec.box.slices()].clone(),
        "vec": torch.full((5,), float(step)),
        "meta": {"step": step},
    }
    return state, {"table": spec}


def set_step(state: dict, world: int, rank: int, step: int) -> None:
    state["table"].copy_(values(step)[table_spec(world, rank).box.slices()])
    state["vec"].fill_(float(step))
    state["meta"]["step"] = step


def main() -> None:
    mode, run_dir, out_dir = sys.argv[1:4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    out: dict = {"rank": rank, "world": world}
    state, layouts = fresh(world, rank, 0)
    kw = {"state": state, "layouts": layouts, "every": 1, "memory_keep": 0}
    if mode == "save":
        with ckptd.Checkpointer(run_dir, **kw) as ck:
            for step in (1, 2):
                set_step(state, world, rank, step)
                ck.step(step)
                ck.wait()
    elif mode == "restore":
        with ckptd.Checkpointer(run_dir, **kw) as ck:
            out["start"] = ck.restore()
        torch.save({"table": state["table"], "vec": state["vec"]}, f"{out_dir}/restore-{world}-{rank}.pt")
        out["meta_step"] = state["meta"]["step"]
    elif mode == "kill_mid_save":
        from ckptd.engine import CheckpointerConfig

        cfg = CheckpointerConfig(uri=run_dir, every=1, memory_keep=0, commit_timeout_s=20)
        ck = ckptd.Checkpointer(run_dir, state=state, layouts=layouts, config=cfg)
        set_step(state, world, rank, 1)
        ck.step(1)
        ck.wait()
        set_step(state, world, rank, 2)
        if rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # dies before writing anything of step 2
        ck.step(2)
        t0 = time.monotonic()
        try:
            ck.wait()
            out["error"] = None
        except ckptd.CheckpointError as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["failed_after_s"] = time.monotonic() - t0
        with open(f"{out_dir}/{mode}-{rank}.json", "w") as f:
            json.dump(out, f)
        os._exit(0)  # the job is broken (a rank died): leave without collective teardown
    elif mode == "preempt_one":
        kw["every"] = 1000
        with ckptd.Checkpointer(run_dir, exit_on_preempt=False, **kw) as ck:
            out["bound"] = ck.agreement.bound
            for step in range(1, 12):
                set_step(state, world, rank, step)
                if step == 4 and rank == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                dist.barrier()  # the training step's own collective
                if ck.step(step):
                    out.setdefault("saved", []).append(step)
    elif mode == "no_wait":
        with ckptd.Checkpointer(run_dir, **{**kw, "every": 1000}) as ck:
            ck.step(1)
            if rank == 1:
                time.sleep(1.5)
            t0 = time.monotonic()
            ck.step(2)
            out["step2_s"] = time.monotonic() - t0
            dist.barrier()
    with open(f"{out_dir}/{mode}-{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
