"""One rank of a 4-rank gloo job whose saves fail in every way a rank can fail them, one after another.

``python -P commit_faults.py RUN_DIR OUT_DIR`` with RANK/WORLD_SIZE/MASTER_* set. The tier is the
real ``LocalStore`` behind ``faulty_store.FaultyStore`` (``faulty+file://RUN_DIR``). In order:

1. step 1 saves normally;
2. steps 2-5 each break one rank (see ``SCENARIOS``): every rank records what ``wait()`` raised
   and how long after the save it did; a barrier of the training group then realigns the ranks;
3. step 6 saves normally (the job goes on after failed saves);
4. steps 10.. loop like training until the test process sends SIGUSR1 to rank 2 only; every rank
   records the steps it checkpointed;
5. step 100: rank 3 SIGKILLs itself while writing its shard; the others record the failure and
   leave without collective teardown (the job is broken).

Each rank writes ``OUT_DIR/rank-<rank>.json`` after 4 and again after 5.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faulty_store
import torch
import torch.distributed as dist
from scale_job import fresh, set_step

import ckptd
from ckptd.engine import CheckpointerConfig

COMMIT_TIMEOUT_S = 8.0
HANG_S = COMMIT_TIMEOUT_S + 4
SCENARIOS = {2: ("write", 1), 3: ("prepare", 2), 4: ("lease", 0), 5: ("hang", 3)}
KILL_STEP, KILLED_RANK, PREEMPTED_RANK = 100, 3, 2


def failing_save(ck: ckptd.Checkpointer, state: dict, step: int, fault: str | None, out: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    set_step(state, world, rank, step)
    if fault is not None:
        os.environ["CKPTD_FAULT"] = fault
    t0 = time.monotonic()
    try:
        ck.save(step)
        ck.wait()
        out[str(step)] = {"error": None}
    except ckptd.CheckpointError as e:
        after = time.monotonic() - t0
        out[str(step)] = {"error": type(e).__name__, "message": str(e)[:500], "after_s": after}
    finally:
        os.environ.pop("CKPTD_FAULT", None)


def preempt_loop(ck: ckptd.Checkpointer, state: dict, out_dir: str, out: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    saved: list[int] = []
    Path(out_dir, f"ready-{rank}").touch()  # the test process signals rank 2 once every rank is here
    for step in range(10, 90):
        set_step(state, world, rank, step)
        if ck.step(step):
            saved.append(step)
        stop = torch.tensor([int(bool(saved) and step >= saved[0] + 3)])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # the training step's own collective
        if stop.item():
            break
        time.sleep(0.2)
    out["preempt_saved"] = saved


def main() -> None:
    run_dir, out_dir = sys.argv[1:3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ["CKPTD_HANG_S"] = str(HANG_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    state, layouts = fresh(world, rank, 0)
    uri = f"{faulty_store.SCHEME}://{run_dir}"
    cfg = CheckpointerConfig(uri=uri, memory_keep=0, commit_timeout_s=COMMIT_TIMEOUT_S, exit_on_preempt=False)
    ck = ckptd.Checkpointer(uri, state=state, layouts=layouts, config=cfg)
    out: dict = {"rank": rank, "commit_timeout_s": COMMIT_TIMEOUT_S}
    for step in (1, 2, 3, 4, 5, 6):
        kind = SCENARIOS.get(step)
        failing_save(ck, state, step, f"{kind[0]}:{kind[1]}:{step}" if kind else None, out)
        dist.barrier()
    preempt_loop(ck, state, out_dir, out)
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    failing_save(ck, state, KILL_STEP, f"kill:{KILLED_RANK}:{KILL_STEP}", out)
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(out))
    Path(out_dir, f"done-{rank}").touch()
    if rank == 0:  # it hosts the TCPStore: the others may still be leaving the failed attempt
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            Path(out_dir, f"done-{r}").exists() for r in range(world) if r != KILLED_RANK
        ):
            time.sleep(0.1)
    os._exit(0)  # a rank died: no collective teardown can finish


if __name__ == "__main__":
    main()
