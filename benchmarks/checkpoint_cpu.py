"""CPU a checkpoint costs the whole machine: ckptd's engine against ``dcp.async_save``.

On a machine whose cores the training ranks already fill (our 2-core box with 2 FSDP2 ranks),
every CPU-second a background checkpoint spends is taken from training. This measures that
work alone, without training, so it can be compared with the loop time a checkpoint adds
(benchmarks/fsdp2_overhead.py): one process, a model + AdamW state (parameters and both
moments, fp32), one checkpoint at a time, page cache dropped before each, systems interleaved:

* ``ckptd_engine_<n>``: ``Checkpointer.save(); wait()`` with ``n`` writer threads (lazy
  snapshot, background persist, durable and committed);
* ``dcp_async``: ``dcp.async_save(...).result()`` (staging, then the background write);
* ``ckptd_save``: the synchronous ``ckptd.save`` (no snapshot);
* ``ckptd_engine_<n>_direct`` (with ``--direct-io``): the engine with ``direct_io=True``, shard
  files written around the page cache; its ``wall_s`` is its time until durable.

``cpu_s`` is busy time of all CPUs from /proc/stat (user, system, irq, softirq: kernel
writeback threads included; idle and iowait excluded), so it counts what the checkpoint takes
from anything else on the machine. Linux only. Prints JSON lines; writes
benchmarks/results/checkpoint-cpu-<time>.json with the machine description.

    python benchmarks/checkpoint_cpu.py [--layers 11] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from machine import write_results
from w1_format import drop_caches

import ckptd
from ckptd.engine.config import CheckpointerConfig

_HZ = os.sysconf("SC_CLK_TCK")


def busy_s() -> float:
    """Seconds all CPUs spent busy since boot (every field of /proc/stat but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _HZ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=11, help="Linear(2048, 2048) layers: 11 = 0.55 GB of state")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[8, 2], help="ckptd writer threads to compare")
    ap.add_argument("--direct-io", action="store_true", help="also run the engine with direct_io=True")
    ap.add_argument("--out", default=None, help="result file (default: results/checkpoint-cpu-<time>.json)")
    args = ap.parse_args()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)  # dcp.async_save needs a process group
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(2048, 2048, bias=False) for _ in range(args.layers)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, 2048)).square().mean().backward()
    opt.step()  # creates the moments
    nbytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    root = Path(tempfile.mkdtemp(dir=os.environ.get("CKPTD_BENCH_DIR")))
    def checkpointer(threads: int, direct_io: bool = False) -> ckptd.Checkpointer:
        config = CheckpointerConfig(uri=str(root / f"engine-{threads}-{direct_io}"), every=10**9,
                                    memory_keep=0, handle_signals=False, threads=threads, direct_io=direct_io)
        state = {"train": ckptd.TrainState(model, opt)}
        return ckptd.Checkpointer(state=state, optimizers=[opt], config=config)

    engines = {(n, d): checkpointer(n, d) for n in args.threads for d in {False, args.direct_io}}

    def engine(n: int, direct_io: bool, i: int) -> None:
        engines[n, direct_io].save(10 + i)
        engines[n, direct_io].wait()

    def dcp_async(i: int) -> None:
        sd_model, sd_optim = get_state_dict(model, opt)
        dcp.async_save({"model": sd_model, "optim": sd_optim}, checkpoint_id=str(root / f"dcp-{i}")).result()

    def ckptd_save(i: int) -> None:
        sd_model, sd_optim = get_state_dict(model, opt)
        ckptd.save({"model": sd_model, "optim": sd_optim}, str(root / "save"), step=i)

    systems: dict[str, Callable[[int], None]] = {
        **{f"ckptd_engine_{n}{'_direct' if d else ''}": (lambda i, n=n, d=d: engine(n, d, i))
           for n, d in engines},
        "dcp_async": dcp_async, "ckptd_save": ckptd_save,
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
    try:
        for system in systems.values():  # thread pools, imports, first-use allocations
            system(10**6)
        for i in range(args.repeats):
            for name in (list(systems) if i % 2 == 0 else list(reversed(systems))):
                drop_caches()
                b, t = busy_s(), time.perf_counter()
                systems[name](i)
                samples[name].append((busy_s() - b, time.perf_counter() - t))
    finally:
        for e in engines.values():
            e.close()
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
    dcp_cpu = statistics.median(c for c, _ in samples["dcp_async"])
    rows: list[dict[str, Any]] = []
    for name, runs in samples.items():
        cpu = statistics.median(c for c, _ in runs)
        rows.append({"bench": "checkpoint_cpu", "what": name, "bytes": nbytes, "cpu_s": round(cpu, 3),
                     "wall_s": round(statistics.median(w for _, w in runs), 3),
                     "cpu_vs_dcp_async": round(cpu / dcp_cpu, 3),
                     "runs": [[round(c, 3), round(w, 3)] for c, w in runs]})
        print(json.dumps(rows[-1]), flush=True)
    write_results("checkpoint-cpu", args.out, vars(args), rows)


if __name__ == "__main__":
    main()
