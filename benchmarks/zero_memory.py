"""Parameter memory per rank of the bundled trainer at ZeRO 2 and ZeRO 3 (issue 12), on CPU.

Four gloo ranks (dp 4) train an 8-layer GPT for a few steps at each setting, in one run:

* ``zero2``: every rank computes with the full weights (the baseline);
* ``zero3``: shards plus gathered weights, dropped after each module's forward and re-gathered
  for its backward, with the next module's all-gather prefetched;
* ``zero3-recompute``: the same with per-block activation recomputation.

The figure is the trainer's own count (``ZeroAdamW.meter``): the peak of bytes held in
parameter tensors on a rank — compute parameters or shards, plus every gathered weight while
it is alive — measured over the steps (a CPU run sees the same tensors a GPU run would). It is
compared with the bound of the issue: 1/dp of the model plus two transformer blocks.

    python benchmarks/zero_memory.py [--steps 3] [--out DIR]

Prints JSON lines; writes ``zero-memory-<stamp>.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

from ckptd.training.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig
from ckptd.training.mesh import ParallelContext
from ckptd.training.trainer import TrainConfig, Trainer

DP = 4
SETTINGS = {
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3-recompute": {"zero_stage": 3, "recompute": True},
}


def config(setting: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=512, n_layers=8, d_model=256, n_heads=8, max_seq_len=64),
        parallel=ParallelConfig(**setting),
        data=DataConfig(seq_len=64, global_batch=16, micro_batch=2),
        optim=OptimConfig(lr=1e-3),
        dtype="fp32",
    )


def rank_main(rank: int, port: int, steps: int, queue: Any) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=DP)
    for name, setting in SETTINGS.items():
        trainer = Trainer(config(setting), ParallelContext.build(tp=1, pp=1))
        trainer.init_weights()
        trainer.optimizer.meter.reset_peak()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        queue.put({"setting": name, "rank": rank, "peak": trainer.optimizer.meter.peak,
                   "fixed": trainer.optimizer.meter.fixed, "step_s": statistics.median(times)})  # fmt: skip
        dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    reference = Trainer(config({}), ParallelContext()).stage
    model = sum(p.numel() * p.element_size() for p in reference.parameters())
    block = sum(p.numel() * p.element_size() for p in reference.blocks["0"].parameters())
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=rank_main, args=(r, store.port, args.steps, queue)) for r in range(DP)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=600) for _ in range(DP * len(SETTINGS))]
    for p in procs:
        p.join(timeout=120)
    if any(p.exitcode != 0 for p in procs):
        print(f"zero_memory: ranks failed: {[p.exitcode for p in procs]}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    bound = model / DP + 2 * block
    setup = {"what": "setup", "dp": DP, "layers": 8, "model_param_bytes": model, "block_param_bytes": block,
             "bound_bytes": bound, "steps": args.steps}  # fmt: skip
    print(json.dumps(setup))
    results.append(setup)
    base = max(r["peak"] for r in rows if r["setting"] == "zero2")
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        peak = max(r["peak"] for r in mine)
        rec = {"what": name, "peak_param_bytes_max_rank": peak, "peak_by_rank": [r["peak"] for r in sorted(
            mine, key=lambda r: r["rank"])], "fixed_param_bytes": mine[0]["fixed"],
            "peak_over_model": peak / model, "peak_over_zero2": peak / base, "within_bound": peak <= bound,
            "step_s_median": statistics.median(r["step_s"] for r in mine)}  # fmt: skip
        print(json.dumps(rec))
        results.append(rec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"zero-memory-{stamp}.json"
    with open(path, "w") as f:
        json.dump({"args": vars(args), "machine": describe(), "seconds": time.perf_counter() - t0,
                   "results": results}, f, indent=1)  # fmt: skip
    print(json.dumps({"what": "written", "path": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
