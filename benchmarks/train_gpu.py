"""Trainer throughput on one CUDA GPU, with and without ckptd checkpoints (issue 4).

A ~355M-parameter GPT (24 layers, width 1024, 16 heads, vocabulary 50304 tied, sequence 1024,
global batch 16 x 1024 tokens in 2 micro-batches), world size 1 (an NCCL process group of one
rank), bf16 compute with fp32 master weights and Adam moments, the 1F1B schedule and bucketed
gradient reduction — the bundled trainer exactly as ``ckptd train`` runs it (``--zero``,
``--recompute`` and ``--bucket-mb`` as in the trainer).
One process, one run, phases in this order so drift shows up:

1. ``warmup``: a few steps (kernels, allocator), not measured;
2. ``baseline``: N steps without a Checkpointer;
3. ``first_checkpoint``: one forced checkpoint (allocates the pinned host pool; reported alone);
4. ``checkpointed``: N steps with a checkpoint every 10 steps to local disk (lazy snapshots:
   device->host copies overlap the next forward/backward, the optimizer step waits on the GPU);
   then the time until the last checkpoint is durable;
5. ``baseline_again``: N steps without checkpoints.

Overhead = 1 - tokens/s(checkpointed) / tokens/s(mean of both baselines); per checkpoint, the
checkpointed phase's extra seconds over the baselines' median step time, divided by the number of
checkpoints taken. Peak memory is ``torch.cuda.max_memory_allocated`` per phase (CPU: the
process's peak RSS) and the trainer's count of parameter bytes. MFU counts 6 FLOPs per
parameter per token for every matmul weight (the tied embedding once, as the output head) plus
12 * layers * width * sequence for attention; the peak is the dense bf16 figure of the GPU
(``--peak-tflops`` overrides). ``ckpt_block_ms`` is host time in ``ckpt.step()``; on CUDA the
optimizer's wait for the copies is on the GPU and shows up only in tokens/s.

    python benchmarks/train_gpu.py [--smoke] [--steps 60] [--recompute] [--zero 1] [--bucket-mb 25]
                                   [--dir /tmp/ckptd-train-gpu] [--out DIR]

``--smoke`` runs a tiny model on CPU in seconds (keeps the script exercised without a GPU).
Prints JSON lines; writes ``train-gpu-<stamp>.json`` (or ``train-smoke-...``) with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

from ckptd.training.checkpoint import TrainerCheckpoint
from ckptd.training.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig
from ckptd.training.mesh import ParallelContext
from ckptd.training.trainer import TrainConfig, Trainer

PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
}  # fmt: skip
"""Dense bf16 tensor-core peaks (no sparsity), by a substring of the device name; first match wins."""


def config(smoke: bool, args: argparse.Namespace) -> TrainConfig:
    if smoke:
        model = ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, max_seq_len=32)
        data = DataConfig(seq_len=32, global_batch=8, micro_batch=4)
    else:
        model = ModelConfig(vocab_size=50304, n_layers=24, d_model=1024, n_heads=16, max_seq_len=1024)
        data = DataConfig(seq_len=1024, global_batch=16, micro_batch=8)
    parallel = ParallelConfig(zero_stage=args.zero, recompute=args.recompute, bucket_mb=args.bucket_mb)
    return TrainConfig(model=model, data=data, parallel=parallel, optim=OptimConfig(lr=3e-4, warmup_steps=10),
                       dtype="auto")  # fmt: skip


def flops_per_token(cfg: TrainConfig) -> float:
    m = cfg.model
    hd = m.d_model // m.n_heads
    attention = m.d_model * (m.n_heads + 2 * m.kv_heads) * hd + m.n_heads * hd * m.d_model
    per_layer = attention + 2 * m.d_model * m.ffn
    matmul_params = m.n_layers * per_layer + m.vocab_size * m.d_model
    return 6.0 * matmul_params + 12.0 * m.n_layers * m.d_model * cfg.data.seq_len


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def phase(trainer: Trainer, steps: int, ckpt: TrainerCheckpoint | None) -> dict[str, Any]:
    """``steps`` optimizer steps; wall time includes ``ckpt.step()`` at every boundary."""
    times, blocks, saved = [], [], []
    device = trainer.ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_all = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        r = trainer.train_step()  # ends with a device synchronisation
        if ckpt is not None:
            before = ckpt.ckpt.last_saved
            block = ckpt.step(r.step, loss=r.loss)
            if ckpt.ckpt.last_saved != before:
                saved.append(r.step)
                blocks.append(block * 1e3)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    tokens = steps * trainer.cfg.data.global_batch * trainer.cfg.data.seq_len
    return {"steps": steps, "seconds": wall, "tokens_per_s": tokens / wall,
            "step_ms_median": statistics.median(times) * 1e3, "step_ms_max": max(times) * 1e3,
            "checkpoints_at": saved, "ckpt_block_ms": blocks, "loss": r.loss,
            "peak_mem_mib": _peak_mem(device) / 2**20,
            "param_bytes_peak": trainer.optimizer.meter.peak}  # fmt: skip


def _peak_mem(device: torch.device) -> float:
    """Bytes: the phase's peak allocated on CUDA, else the process's peak resident set so far."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few seconds")
    ap.add_argument("--steps", type=int, default=None, help="steps per measured phase (default 60; smoke 6)")
    ap.add_argument("--every", type=int, default=10, help="checkpoint interval in steps")
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 5; smoke 2)")
    ap.add_argument("--dir", default=None, help="checkpoint run root (default: a fresh temporary directory)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; smoke: temp)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    ap.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage (dp is 1 here)")
    ap.add_argument("--recompute", action="store_true", help="recompute each block's activations in backward")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="gradient-reduction bucket size")
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("train_gpu: no CUDA device (use --smoke to exercise the script on CPU)", file=sys.stderr)
        return 2
    steps = args.steps or (6 if smoke else 60)
    every = 2 if smoke and args.every == 10 else args.every
    warmup = args.warmup if args.warmup is not None else (2 if smoke else 5)
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        # A one-rank NCCL group, as a distributed launch has (a world of one sends nothing).
        store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    cfg = config(smoke, args)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckptd-train-gpu-"))
    shutil.rmtree(root, ignore_errors=True)
    results: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        print(json.dumps(rec), flush=True)
        results.append(rec)

    t_start = time.perf_counter()
    trainer = Trainer(cfg, ParallelContext(device=device))
    trainer.init_weights()
    canonical = trainer.adapter.to_canonical()
    n_params = sum(ct.data.numel() for p, ct in canonical.items() if p.startswith("model/"))
    fpt, peak = flops_per_token(cfg), peak_flops(device, args.peak_tflops)

    def mfu(tps: float) -> float | None:
        return tps * fpt / peak if peak else None

    emit({"what": "setup", "params": n_params, "flops_per_token": fpt, "peak_flops": peak,
          "device": str(device), "compute_dtype": str(trainer.dtype), "schedule": cfg.parallel.schedule,
          "backend": dist.get_backend() if dist.is_initialized() else None, "zero": cfg.parallel.zero_stage,
          "recompute": cfg.parallel.recompute, "bucket_mb": cfg.parallel.bucket_mb,
          "seconds": time.perf_counter() - t_start})  # fmt: skip
    phase(trainer, warmup, None)
    base1 = phase(trainer, steps, None)
    emit({"what": "baseline", **base1, "mfu": mfu(base1["tokens_per_s"])})
    with TrainerCheckpoint(trainer.adapter, trainer.optimizer, str(root), every=every, keep_last=2) as ckpt:
        t0 = time.perf_counter()
        ckpt.save(trainer.step)
        staged = time.perf_counter() - t0
        ckpt.ckpt.wait()
        ckpt_bytes = sum(t.numel() * t.element_size() for t in _tensors(ckpt.state))
        emit({"what": "first_checkpoint", "step": trainer.step, "bytes": ckpt_bytes,
              "block_ms": staged * 1e3, "durable_s": time.perf_counter() - t0})  # fmt: skip
        with_ckpt = phase(trainer, steps, ckpt)
        t0 = time.perf_counter()
        ckpt.ckpt.wait()
        durable = time.perf_counter() - t0
        committed = ckpt.ckpt.stores[0].run.steps()
    emit({"what": "checkpointed", **with_ckpt, "mfu": mfu(with_ckpt["tokens_per_s"]), "every": every,
          "last_durable_after_s": durable, "committed_steps_kept": committed})  # fmt: skip
    base2 = phase(trainer, steps, None)
    emit({"what": "baseline_again", **base2, "mfu": mfu(base2["tokens_per_s"])})
    base_tps = (base1["tokens_per_s"] + base2["tokens_per_s"]) / 2
    base_step_s = statistics.median([base1["step_ms_median"], base2["step_ms_median"]]) / 1e3
    extra_s = with_ckpt["seconds"] - base_step_s * steps
    n_ckpt = max(1, len(with_ckpt["checkpoints_at"]))
    summary = {
        "what": "summary",
        "params": n_params,
        "tokens_per_s_baseline": base_tps,
        "tokens_per_s_checkpointed": with_ckpt["tokens_per_s"],
        "overhead_pct": 100.0 * (1.0 - with_ckpt["tokens_per_s"] / base_tps),
        "mfu_baseline": mfu(base_tps),
        "mfu_checkpointed": mfu(with_ckpt["tokens_per_s"]),
        "ckpt_block_ms_median": statistics.median(with_ckpt["ckpt_block_ms"] or [0.0]),
        "per_checkpoint_overhead_ms": extra_s / n_ckpt * 1e3,
        "peak_mem_mib": max(base1["peak_mem_mib"], with_ckpt["peak_mem_mib"], base2["peak_mem_mib"]),
        "param_bytes_peak": with_ckpt["param_bytes_peak"],
        "checkpoint_bytes": ckpt_bytes,
        "every": every,
        "total_s": time.perf_counter() - t_start,
    }
    emit(summary)
    shutil.rmtree(root, ignore_errors=True)
    default_out = Path(tempfile.gettempdir()) if smoke else Path(__file__).parent / "results"
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"train-{'smoke' if smoke else 'gpu'}-{stamp}.json"
    with open(path, "w") as f:
        json.dump({"args": vars(args), "machine": describe(), "results": results}, f, indent=1)
    print(json.dumps({"what": "written", "path": str(path)}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


if __name__ == "__main__":
    sys.exit(main())
