"""The training loop: ``python -m ckptd.training.trainer ...`` under ``torchrun`` (or alone).

Each rank builds its :class:`ParallelContext`, its pipeline stage of the GPT, the ZeRO
optimizer, the state-dict adapter and the micro-batch schedule, initialises the weights from
canonical values (so every layout starts identical), and trains up to ``--steps``.

With ``--ckpt URI`` the run checkpoints through ``ckptd.Checkpointer`` every ``--every`` steps
and once more at its last step, and first resumes from the newest committed checkpoint
there — written by a job of any layout (see :mod:`ckptd.training.checkpoint`): the step comes
from ``optim/step``, the data position from the step, the RNG states from the Checkpointer.
SIGTERM (or SIGUSR1) makes the next step boundary write a durable checkpoint; after SIGTERM
every rank then exits with status 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.distributed as dist

from ckptd.engine.checkpointer import SIGTERM_EXIT_CODE
from ckptd.training.adapter import GPTStateAdapter
from ckptd.training.checkpoint import TrainerCheckpoint
from ckptd.training.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainingConfigError,
)
from ckptd.training.data import TokenSource
from ckptd.training.mesh import ParallelContext, all_reduce
from ckptd.training.model import GPTStage, canonical_init
from ckptd.training.pp import PipelineSchedule, bubble_fraction
from ckptd.training.zero import ZeroAdamW


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything one training run needs; validated as a whole in ``__post_init__``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 50
    """Train up to this step (a resumed run continues to it)."""
    init_seed: int = 0
    dtype: str = "auto"
    """Compute dtype: "auto" is bf16 on CUDA and fp32 on CPU; or "fp32" / "bf16"."""
    log_json: str | None = None
    ckpt: str | None = None
    """Run root of the checkpoints (local path or fsspec URL): resume from it, save to it."""
    every: int = 0
    """Checkpoint interval in steps (0: only at the last step and on SIGTERM/SIGUSR1)."""

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model)
        if self.data.seq_len > self.model.max_seq_len:
            raise TrainingConfigError(
                f"seq_len {self.data.seq_len} exceeds the model's max_seq_len {self.model.max_seq_len}"
            )
        if self.steps < 0 or self.every < 0:
            raise TrainingConfigError(f"--steps and --every must be >= 0, got {self.steps} and {self.every}")
        if self.every and not self.ckpt:
            raise TrainingConfigError(f"--every {self.every} needs --ckpt URI (where to write checkpoints)")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise TrainingConfigError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "bf16" or (self.dtype == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return torch.float32


@dataclass(frozen=True, slots=True)
class StepResult:
    step: int
    """1-based index of the optimizer step just taken."""
    loss: float
    grad_norm: float
    tokens: int
    seconds: float


class Trainer:
    """One rank's share of a training run."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        cfg.parallel.check_world(ctx.world_size)
        par = cfg.parallel
        self.n_micro = cfg.data.micro_batches(ctx.dp)
        par.check_micro_batches(self.n_micro)
        self.dtype = cfg.compute_dtype(ctx.device)
        self.stage = GPTStage(
            cfg.model,
            ctx,
            layers=par.rank_chunks(cfg.model.n_layers, ctx.pp_rank),
            dtype=self.dtype,
            recompute=par.recompute,
        )
        stage = self.stage
        self.optimizer = ZeroAdamW(
            stage, stage.param_metas(), ctx, cfg.optim, zero_stage=par.zero_stage, bucket_mb=par.bucket_mb,
            chunk_of=stage.chunk_of, regather=lambda module: not stage.recomputed(module),
        )  # fmt: skip
        self.adapter = GPTStateAdapter(
            self.optimizer, ctx, tied_embeddings=cfg.model.tie_embeddings,
            chunks=par.rank_chunks(cfg.model.n_layers, ctx.pp_rank) if par.vpp > 1 else None, model=cfg.model,
        )  # fmt: skip
        act_shape = (cfg.data.micro_batch, cfg.data.seq_len, cfg.model.d_model)
        self.schedule = PipelineSchedule(
            stage, ctx, kind=par.schedule, act_shape=act_shape, dtype=self.dtype, reducer=self.optimizer
        )
        self.bubble = bubble_fraction(par.schedule, ctx.pp, self.n_micro, par.vpp)
        """Idle fraction of the pipeline schedule (unit costs, backward = 2 x forward)."""
        self.data = TokenSource(cfg.data, cfg.model.vocab_size)
        self.step = 0
        """Optimizer steps taken so far (the next step trains on global samples of this index)."""

    def init_weights(self) -> None:
        """Initial state from canonical values: weights from ``canonical_init``, zero moments."""
        tensors: dict[str, torch.Tensor] = {}
        for path, spec in self.adapter.specs().items():
            if path.startswith("model/"):
                full = canonical_init(
                    self.cfg.model, path.removeprefix("model/"), spec.shape, self.cfg.init_seed
                )
                tensors[path] = full[spec.box.slices()]
            else:
                tensors[path] = torch.zeros(spec.box.shape, dtype=spec.dtype)
        self.adapter.from_canonical(tensors)
        self.step = 0

    def train_step(self) -> StepResult:
        ctx, t0 = self.ctx, time.perf_counter()
        batches = self.data.micro_batches(self.step, dp=ctx.dp, dp_rank=ctx.dp_rank)
        inputs = [x.to(ctx.device) for x, _ in batches]
        targets = [y.to(ctx.device) for _, y in batches]
        self.optimizer.zero_grad()
        loss = self.schedule.run(inputs, targets)
        norm = self.optimizer.step()
        # Every rank reports the same loss: the last stage's, averaged over dp.
        share = torch.zeros((), dtype=torch.float32, device=ctx.device)
        if loss is not None and ctx.tp_rank == 0:
            share += loss.float() / ctx.dp
        total = float(all_reduce(share, ctx.world_group))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        self.step += 1
        tokens = self.cfg.data.global_batch * self.cfg.data.seq_len
        return StepResult(self.step, total, norm, tokens, time.perf_counter() - t0)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptd.training.trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    p.add_argument(
        "--stage-layers", default=None, help="layers per pipeline stage (per model chunk with --vpp)"
    )
    p.add_argument("--vpp", type=int, default=1, help="virtual stages per rank: interleaved 1F1B (Megatron)")
    p.add_argument("--recompute", action="store_true", help="recompute each block's activations in backward")
    p.add_argument(
        "--bucket-mb", type=float, default=25.0, help="gradient-reduction bucket size (0: per tensor)"
    )
    p.add_argument("--steps", type=int, default=50, help="train up to this step")
    p.add_argument("--every", type=int, default=0, help="checkpoint interval in steps (needs --ckpt)")
    p.add_argument("--ckpt", default=None, help="checkpoint run root: resume from its latest, save to it")
    p.add_argument("--log-json", default=None, help="write one JSON line per step to this file")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--untied", action="store_true", help="separate output projection")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234, help="data seed")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--text-file", default=None, help="train on the bytes of this file (needs --vocab >= 256)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    stage_layers = None
    if args.stage_layers:
        try:
            stage_layers = tuple(int(x) for x in args.stage_layers.split(","))
        except ValueError as e:
            raise TrainingConfigError(
                f"--stage-layers must be comma-separated integers: {args.stage_layers!r}"
            ) from e
    return TrainConfig(
        model=ModelConfig(
            vocab_size=args.vocab,
            n_layers=args.layers,
            d_model=args.width,
            n_heads=args.heads,
            n_kv_heads=args.kv_heads,
            d_ff=args.ffn,
            max_seq_len=args.seq_len,
            tie_embeddings=not args.untied,
        ),
        parallel=ParallelConfig(
            tp=args.tp,
            pp=args.pp,
            zero_stage=args.zero,
            schedule=args.schedule,
            stage_layers=stage_layers,
            vpp=args.vpp,
            recompute=args.recompute,
            bucket_mb=args.bucket_mb,
        ),
        optim=OptimConfig(lr=args.lr, warmup_steps=args.warmup, grad_clip=args.grad_clip or None),
        data=DataConfig(
            seq_len=args.seq_len,
            global_batch=args.global_batch,
            micro_batch=args.micro_batch,
            seed=args.seed,
            text_file=args.text_file,
        ),
        steps=args.steps,
        init_seed=args.init_seed,
        dtype=args.dtype,
        log_json=args.log_json,
        ckpt=args.ckpt,
        every=args.every,
    )


def _init_distributed(cfg: TrainConfig) -> torch.device:
    """Join the torchrun world if there is one. Config errors are raised before any rendezvous."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.parallel.check_world(world)
    cfg.parallel.check_micro_batches(cfg.data.micro_batches(world // (cfg.parallel.tp * cfg.parallel.pp)))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and cfg.parallel.vpp > 1 and cfg.parallel.pp == 2:
        # At pp 2 one rank pair carries activations and gradients in the same direction; they are
        # told apart by tag, which NCCL ignores (it matches in order). See pp/schedule.py.
        raise TrainingConfigError("--vpp > 1 with --pp 2 needs gloo (CPU): use --pp 3 or more on GPUs")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        device = _init_distributed(cfg)
    except TrainingConfigError as e:
        print(f"ckptd train: configuration error: {e}", file=sys.stderr)
        return 2
    ctx = ParallelContext.build(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, device=device, tied_embeddings=cfg.model.tie_embeddings
    )
    trainer = Trainer(cfg, ctx)
    trainer.init_weights()
    par = cfg.parallel
    layout = f"dp{ctx.dp} tp{ctx.tp} pp{ctx.pp} vpp{par.vpp} ZeRO-{par.zero_stage} {par.schedule}"
    _say(ctx, f"{layout}, {trainer.n_micro} micro-batches: pipeline bubble {trainer.bubble:.1%} of compute")
    log = open(cfg.log_json, "a", encoding="utf-8") if cfg.log_json and ctx.rank == 0 else None  # noqa: SIM115
    try:
        ckpt = None
        if cfg.ckpt:
            ckpt = TrainerCheckpoint(trainer.adapter, trainer.optimizer, cfg.ckpt, every=cfg.every)
        with ckpt if ckpt is not None else contextlib.nullcontext():
            if ckpt is not None:
                resumed = ckpt.restore()
                if resumed is not None:
                    trainer.step = resumed
                    _say(ctx, f"resumed from the checkpoint of step {resumed} in {cfg.ckpt}")
            if trainer.step >= cfg.steps:
                _say(ctx, f"already at step {trainer.step} (--steps {cfg.steps}): nothing to train")
            _train(trainer, ckpt, log)
            if ckpt is not None and trainer.step > 0:
                ckpt.save(trainer.step)  # the last step is durable when the with-block ends
    except SystemExit as e:
        if e.code == SIGTERM_EXIT_CODE:
            _say(ctx, f"stopped by SIGTERM after step {trainer.step}, which is durable in {cfg.ckpt}")
        raise
    finally:
        if log is not None:
            log.close()
        if dist.is_initialized():
            # Without a barrier a rank can tear gloo down while its peer is still mid-collective,
            # which aborts the peer ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()
    return 0


def _train(trainer: Trainer, ckpt: TrainerCheckpoint | None, log: TextIO | None) -> None:
    ctx = trainer.ctx
    while trainer.step < trainer.cfg.steps:
        r = trainer.train_step()
        t0 = time.perf_counter()
        try:
            if ckpt is not None:
                ckpt.step(r.step, loss=r.loss)  # may raise SystemExit after SIGTERM
        finally:
            if ctx.rank == 0:
                blocked = ckpt.last_block_s if ckpt is not None else 0.0
                seconds = r.seconds + time.perf_counter() - t0
                rec = {
                    "step": r.step,
                    "loss": r.loss,
                    "grad_norm": r.grad_norm,
                    "tokens_per_s": r.tokens / seconds,
                    "ckpt_block_ms": blocked * 1e3,
                    "step_ms": seconds * 1e3,
                    "param_bytes_peak": trainer.optimizer.meter.peak,
                }
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                print(
                    f"step {r.step:5d}  loss {r.loss:.4f}  grad_norm {r.grad_norm:.3f}  "
                    f"{rec['tokens_per_s']:.0f} tok/s  ckpt {rec['ckpt_block_ms']:.1f} ms",
                    flush=True,
                )


def _say(ctx: ParallelContext, message: str) -> None:
    if ctx.rank == 0:
        print(f"ckptd train: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
