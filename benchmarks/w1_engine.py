"""W1 on CPU (BENCHMARKS.md): ckptd.Checkpointer inside a training loop vs torch.save and torch DCP.

One run measures, on the same machine and disk, with the same Adam state:
  blocking time per checkpoint inside the loop (ckptd step() + optimizer-hook waits vs
  torch.save, dcp.save, dcp.async_save), time until durable vs a raw fsync'd sequential
  write of the same bytes, and restore time vs torch.load(weights_only=True) and dcp.load.
Prints JSON lines; writes benchmarks/results/w1-engine-<time>.json with the machine description.

    python benchmarks/w1_engine.py --params 125e6 --repeats 3 --dir /tmp/w1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

import ckptd


def build(params: float) -> tuple[torch.nn.ParameterDict, torch.optim.Adam]:
    d = 768
    n_layers = max(1, round(params / (12 * d * d)))
    g = torch.Generator().manual_seed(0)
    shapes = {"wte": (max(1024, int(params - n_layers * 12 * d * d) // d), d)}
    for i in range(n_layers):
        shapes |= {
            f"h{i}_qkv": (3 * d, d),
            f"h{i}_proj": (d, d),
            f"h{i}_fc": (4 * d, d),
            f"h{i}_out": (d, 4 * d),
        }
    model = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()}
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    train_step(model, opt)  # creates the moments
    return model, opt


def train_step(model: torch.nn.ParameterDict, opt: torch.optim.Adam) -> None:
    for p in model.values():  # stands in for forward/backward: a gradient per parameter
        p.grad = torch.full_like(p, 1e-3) if p.grad is None else p.grad
    opt.step()


def nbytes(model: torch.nn.ParameterDict) -> int:
    return 3 * sum(p.numel() * p.element_size() for p in model.values())


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def raw_write(model: torch.nn.ParameterDict, opt: torch.optim.Adam, path: Path) -> float:
    os.sync()  # no dirty pages of earlier work: each measurement pays only for its own writeback
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for p in model.values():
        for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
            os.write(fd, memoryview(t.detach().numpy()).cast("B"))
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def emit(rec: dict[str, Any], out: list[dict[str, Any]]) -> None:
    print(json.dumps(rec), flush=True)
    out.append(rec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=125e6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/ckptd-w1")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import torch.distributed.checkpoint as dcp

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, opt = build(args.params)
    state = {"model": model, "optim": opt}
    size = nbytes(model)
    results: list[dict[str, Any]] = []
    emit({"what": "state", "params": sum(p.numel() for p in model.values()), "bytes": size}, results)

    iters = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        train_step(model, opt)
        iters.append(time.perf_counter() - t0)
    emit({"what": "iteration", "median_s": statistics.median(iters[1:])}, results)

    raw = [raw_write(model, opt, root / "raw.bin") for _ in range(args.repeats)]
    emit(
        {
            "what": "raw_fsync_write",
            "median_s": statistics.median(raw),
            "gb_s": size / statistics.median(raw) / 1e9,
        },
        results,
    )

    # ckptd: blocking = step() + the hook waits of the next iteration; durable = until wait() returns
    blocked, durable = [], []
    with ckptd.Checkpointer(
        str(root / "ckptd"), state=state, every=1, memory_keep=0, handle_signals=False
    ) as ck:
        for i in range(args.repeats + 1):
            os.sync()
            hook0 = ck.stager.hook_wait_s
            t0 = time.perf_counter()
            ck.step(i + 1)
            t_step = time.perf_counter() - t0
            train_step(model, opt)  # overlaps with the background copy; its hook waits if needed
            hook = ck.stager.hook_wait_s - hook0
            ck.wait()
            t_durable = time.perf_counter() - t0
            if i:  # the first one allocates the host pool
                blocked.append(t_step + hook)
                durable.append(t_durable)
    emit(
        {
            "what": "ckptd",
            "blocking_median_s": statistics.median(blocked),
            "durable_median_s": statistics.median(durable),
        },
        results,
    )

    ts = []
    for i in range(args.repeats):
        os.sync()
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, root / f"ts{i}.pt")
        fsync_tree(root / f"ts{i}.pt")
        ts.append(time.perf_counter() - t0)
    emit(
        {
            "what": "torch.save",
            "blocking_median_s": statistics.median(ts),
            "durable_median_s": statistics.median(ts),
        },
        results,
    )

    ds, das, das_done = [], [], []
    for i in range(args.repeats):
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        t0 = time.perf_counter()
        dcp.save(sd, checkpoint_id=str(root / f"dcp{i}"))
        fsync_tree(root / f"dcp{i}")
        ds.append(time.perf_counter() - t0)
    emit(
        {
            "what": "dcp.save",
            "blocking_median_s": statistics.median(ds),
            "durable_median_s": statistics.median(ds),
        },
        results,
    )
    for i in range(args.repeats):
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=str(root / f"adcp{i}"))
        das.append(time.perf_counter() - t0)
        fut.result()
        fsync_tree(root / f"adcp{i}")
        das_done.append(time.perf_counter() - t0)
    emit(
        {
            "what": "dcp.async_save",
            "blocking_median_s": statistics.median(das),
            "durable_median_s": statistics.median(das_done),
        },
        results,
    )

    rc, rt, rd = [], [], []
    for _ in range(args.repeats):
        subprocess.run(["sync"], check=False)
        t0 = time.perf_counter()
        with ckptd.Checkpointer(str(root / "ckptd"), state=state, memory_keep=0, handle_signals=False) as ck:
            ck.restore()
        rc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded = torch.load(root / "ts0.pt", weights_only=True)
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optim"])
        rt.append(time.perf_counter() - t0)
        del loaded
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        t0 = time.perf_counter()
        dcp.load(sd, checkpoint_id=str(root / "dcp0"))
        rd.append(time.perf_counter() - t0)
    emit(
        {
            "what": "restore",
            "ckptd_median_s": statistics.median(rc),
            "torch_load_median_s": statistics.median(rt),
            "dcp_load_median_s": statistics.median(rd),
        },
        results,
    )

    by = {r["what"]: r for r in results}
    c = by["ckptd"]
    summary = {
        "what": "ratios",
        "blocking_torch_save_over_ckptd": by["torch.save"]["blocking_median_s"] / c["blocking_median_s"],
        "blocking_dcp_save_over_ckptd": by["dcp.save"]["blocking_median_s"] / c["blocking_median_s"],
        "blocking_dcp_async_over_ckptd": by["dcp.async_save"]["blocking_median_s"] / c["blocking_median_s"],
        "blocking_ckptd_over_iteration": c["blocking_median_s"] / by["iteration"]["median_s"],
        "durable_ckptd_over_raw_fsync": c["durable_median_s"] / by["raw_fsync_write"]["median_s"],
        "durable_torch_save_over_raw_fsync": by["torch.save"]["durable_median_s"]
        / by["raw_fsync_write"]["median_s"],
        "restore_torch_load_over_ckptd": by["restore"]["torch_load_median_s"]
        / by["restore"]["ckptd_median_s"],
        "restore_dcp_load_over_ckptd": by["restore"]["dcp_load_median_s"] / by["restore"]["ckptd_median_s"],
    }
    emit(summary, results)
    machine = describe()
    try:
        machine["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        machine["disk"] = subprocess.run(
            ["df", "-h", str(root)], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"w1-engine-{stamp}.json", "w") as f:
        json.dump({"args": vars(args), "machine": machine, "results": results}, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
