"""W2 (BENCHMARKS.md): checkpoint stall on one CUDA GPU, every column of the reference table in one run.

A bf16 stack of 12 Linear(8192, 8192, bias=False) + GELU, fused AdamW, batch 8192x8192,
checkpoint (parameters + both moments = 4.83 GB) every 5 iterations, 20 iterations per
variant. Variants: no checkpoint; torch.save; DCP async_save; the idealised lazy snapshot
(pinned buffer allocated once, side-stream copies ordered by events, the optimizer step waits
on the GPU) every 5 and every iteration; ckptd with only the memory tier, and with memory +
local disk. Raw figures: pinned/pageable device->host bandwidth, 4 GiB pinned allocation,
sequential write + fsync. ``--smoke`` runs a tiny version on CPU so the script stays exercised.

    python benchmarks/w2_gpu.py [--smoke] [--dir /tmp/w2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

import ckptd


class Bench:
    def __init__(self, width: int, layers: int, batch: int, device: str) -> None:
        self.device = torch.device(device)
        dtype = torch.bfloat16
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            *[m for _ in range(layers) for m in (torch.nn.Linear(width, width, bias=False), torch.nn.GELU())]
        )
        self.model.to(self.device, dtype)
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=fused)
        self.x = torch.randn(batch, width, device=self.device, dtype=dtype)
        self.iteration()  # creates the moments
        self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def iteration(self) -> None:
        self.model(self.x).float().square().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for p in self.model.parameters():
            out += [p.data, self.opt.state[p]["exp_avg"], self.opt.state[p]["exp_avg_sq"]]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def run(self, iters: int, every: int, hook: Callable[[int], float] | None) -> dict[str, Any]:
        """Per-iteration wall times; ``hook(i)`` runs at the step boundary and returns its blocking time."""
        self.sync()
        times, blocked = [], []
        t_all = time.perf_counter()
        for i in range(1, iters + 1):
            t0 = time.perf_counter()
            self.iteration()
            if hook is not None and i % every == 0:
                blocked.append(hook(i))
            self.sync()
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        return {
            "ms_per_iteration": 1e3 * total / iters,
            "median_iteration_ms": 1e3 * statistics.median(times),
            "blocked_s": blocked,
        }


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (no GPU needed)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/ckptd-w2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument(
        "--skip-baselines", action="store_true", help="skip torch.save and DCP (the slow columns)"
    )
    args = ap.parse_args()
    if args.smoke:
        b = Bench(256, 2, 64, "cpu")
        args.iters = min(args.iters, 10)
    else:
        if not torch.cuda.is_available():
            sys.exit("W2 needs a CUDA device (use --smoke on CPU)")
        b = Bench(8192, 12, 8192, "cuda")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    results: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        print(json.dumps(rec), flush=True)
        results.append(rec)

    size = b.nbytes
    emit({"what": "state", "bytes": size, "device": str(b.device)})
    b.run(3, args.every, None)  # warm-up (cuBLAS, allocator)
    emit({"what": "no_checkpoint", **b.run(args.iters, args.every, None)})

    tensors = b.tensors()
    cuda = b.device.type == "cuda"
    pin_t = timed(lambda: [torch.empty_like(t, device="cpu", pin_memory=cuda) for t in tensors])
    pinned = [torch.empty_like(t, device="cpu", pin_memory=cuda) for t in tensors]
    b.sync()
    t_pin = timed(
        lambda: ([d.copy_(s, non_blocking=True) for d, s in zip(pinned, tensors, strict=True)], b.sync())
    )
    t_pageable = timed(lambda: [t.cpu() for t in tensors])
    alloc4 = timed(lambda: torch.empty(4 * 2**30, dtype=torch.uint8, pin_memory=cuda)) if cuda else 0.0
    raw = root / "raw.bin"

    def raw_write() -> None:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for t in pinned:
            os.write(fd, memoryview(t.view(torch.uint8).numpy()).cast("B"))
        os.fsync(fd)
        os.close(fd)

    t_raw = timed(raw_write)
    raw.unlink()
    emit(
        {
            "what": "raw",
            "pinned_d2h_gb_s": size / t_pin / 1e9,
            "pageable_d2h_gb_s": size / t_pageable / 1e9,
            "pinned_alloc_state_s": pin_t,
            "pinned_alloc_4gib_s": alloc4,
            "disk_write_fsync_gb_s": size / t_raw / 1e9,
        }
    )

    # idealised lazy snapshot: pinned buffer once, side-stream copy after an event, optimizer waits on the GPU
    def idealised(every: int) -> dict[str, Any]:
        if not cuda:

            def copy_now(i: int) -> float:
                return timed(lambda: [d.copy_(s) for d, s in zip(pinned, tensors, strict=True)])

            return b.run(args.iters, every, copy_now)
        stream = torch.cuda.Stream()
        pending: list[torch.cuda.Event] = []

        def hook_pre(opt: Any, a: Any, k: Any) -> None:
            while pending:
                torch.cuda.current_stream().wait_event(pending.pop())

        h = b.opt.register_step_pre_hook(hook_pre)

        def snap(i: int) -> float:
            t0 = time.perf_counter()
            ev = torch.cuda.Event()
            ev.record()
            with torch.cuda.stream(stream):
                stream.wait_event(ev)
                for d, s in zip(pinned, tensors, strict=True):
                    d.copy_(s, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            pending.append(done)
            return time.perf_counter() - t0

        try:
            return b.run(args.iters, every, snap)
        finally:
            h.remove()

    emit({"what": "idealised_lazy_every_5", **idealised(args.every)})
    emit({"what": "idealised_lazy_every_1", **idealised(1)})
    pinned.clear()  # give the pinned host memory back before the ckptd variants

    for name, kwargs in (
        ("ckptd_memory_every_5", {"tiers": [ckptd.TierConfig.memory(every=args.every)]}),
        ("ckptd_memory_local_every_5", {"every": args.every}),
    ):
        with ckptd.Checkpointer(
            str(root / name),
            state={"model": b.model, "optim": b.opt},
            memory_keep=1,
            handle_signals=False,
            **kwargs,
        ) as ck:
            ck.save(0)  # allocates the pinned pool once, outside the measured loop
            ck.wait()

            def step(i: int, ck: ckptd.Checkpointer = ck) -> float:
                return timed(lambda: ck.step(i))

            rec = b.run(args.iters, args.every, step)
            rec["hook_wait_s"] = ck.stager.hook_wait_s
            t_wait = timed(ck.wait)
            rec["wait_after_loop_s"] = t_wait
            rec["persisted"] = [f.persisted for f in ck.flushers]
        emit({"what": name, **rec})

    if not args.skip_baselines:

        def tsave(i: int) -> float:
            return timed(
                lambda: torch.save(
                    {"model": b.model.state_dict(), "optim": b.opt.state_dict()}, root / f"ts{i}.pt"
                )
            )

        emit({"what": "torch_save_every_5", **b.run(args.iters, args.every, tsave)})
        import torch.distributed.checkpoint as dcp

        futures: list[Any] = []

        def async_save(i: int) -> float:
            t0 = time.perf_counter()
            if futures:
                futures.pop().result()  # DCP allows one save in flight
            futures.append(
                dcp.async_save(
                    {"model": b.model.state_dict(), "optim": b.opt.state_dict()},
                    checkpoint_id=str(root / f"dcp{i}"),
                )
            )
            return time.perf_counter() - t0

        emit({"what": "dcp_async_save_every_5", **b.run(args.iters, args.every, async_save)})
        for f in futures:
            f.result()

    by = {r["what"]: r for r in results}
    ideal = by["idealised_lazy_every_5"]["ms_per_iteration"]
    summary = {
        "what": "ratios",
        "ckptd_memory_over_idealised": by["ckptd_memory_every_5"]["ms_per_iteration"] / ideal,
        "ckptd_memory_local_over_idealised": by["ckptd_memory_local_every_5"]["ms_per_iteration"] / ideal,
        "idealised_over_no_checkpoint": ideal / by["no_checkpoint"]["ms_per_iteration"],
    }
    if "torch_save_every_5" in by:
        summary["torch_save_over_idealised"] = by["torch_save_every_5"]["ms_per_iteration"] / ideal
        summary["dcp_async_over_idealised"] = by["dcp_async_save_every_5"]["ms_per_iteration"] / ideal
    emit(summary)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else "gpu"
    with open(Path(args.out) / f"w2-{tag}-{stamp}.json", "w") as f:
        json.dump({"args": vars(args), "machine": describe(), "results": results}, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
