"""What ``Checkpointer.step()`` costs when no checkpoint is due, with real gloo processes.

Each rank runs a loop of "training steps" (a small all-reduce on the training group, as data
parallelism does, untimed) and times only ``ckpt.step()``. In the same run, the same loop times
the blocking all-reduce of the same flags on a gloo group — what ``step()`` did before it agreed
asynchronously — as the baseline. Prints JSON lines (median and p99 microseconds per call, the
slowest rank) and writes them with the machine description under benchmarks/results/.

Run: ``python benchmarks/step_cost.py [--worlds 1,2,4,8] [--steps 2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import ckptd

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    grad = torch.ones(1024)
    state = {"w": torch.zeros(1024)}
    ckpt_times: list[float] = []
    base_times: list[float] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        ckptd.Checkpointer(tmp, state=state, every=10**9, handle_signals=False) as ckpt,
    ):
        flags = [0] * (3 + 2 * len(ckpt.flushers))
        baseline_group = dist.new_group(backend="gloo") if world > 1 else None
        for i in range(steps + 100):
            if world > 1:
                dist.all_reduce(grad)  # the training step's own collective (untimed)
            t0 = time.perf_counter_ns()
            ckpt.step(i + 1)
            t1 = time.perf_counter_ns()
            if baseline_group is not None:
                t = torch.tensor(flags, dtype=torch.int64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=baseline_group)
            t2 = time.perf_counter_ns()
            if i >= 100:  # warm-up excluded
                ckpt_times.append((t1 - t0) / 1e3)
                base_times.append((t2 - t1) / 1e3)
    Path(out).write_text(
        json.dumps({"rank": rank, "step_us": ckpt_times, "blocking_allreduce_us": base_times})
    )
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, steps: int) -> dict[str, object]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT),
            }
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        "--steps",
                        str(steps),
                        "--out",
                        f"{tmp}/r{rank}.json",
                    ],
                    env=env,
                )
            )
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise SystemExit(f"a worker of world size {world} failed")
        ranks = [json.loads(Path(f"{tmp}/r{r}.json").read_text()) for r in range(world)]

    def stats(key: str) -> tuple[float, float]:
        med = max(statistics.median(r[key]) for r in ranks)
        p99 = max(sorted(r[key])[int(0.99 * len(r[key]))] for r in ranks)
        return med, p99

    med, p99 = stats("step_us")
    out: dict[str, object] = {
        "bench": "step_cost",
        "world": world,
        "steps": steps,
        "step_median_us": round(med, 1),
        "step_p99_us": round(p99, 1),
    }
    if world > 1:
        bmed, bp99 = stats("blocking_allreduce_us")
        out.update(
            {
                "blocking_allreduce_median_us": round(bmed, 1),
                "blocking_allreduce_p99_us": round(bp99, 1),
                "step_vs_blocking_allreduce": round(med / bmed, 3),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.out)
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import write_results

    results = []
    for w in [int(x) for x in args.worlds.split(",")]:
        res = run_world(w, args.steps)
        print(json.dumps(res), flush=True)
        results.append(res)
    out = write_results("step-cost", args.out, vars(args), results)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
