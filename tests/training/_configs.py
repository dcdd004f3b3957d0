"""The tiny model every training test uses (shared by the tests and the spawned workers).

vocab 101 is prime, so vocabulary padding is exercised at every tp and dp; 8 query heads over
4 key/value heads exercise grouped-query attention up to tp 4.

Adam's eps is 1e-5 rather than 1e-8 on purpose. The update is ``lr * m / (sqrt(v) + eps)``;
for a gradient element that cancels to ~1e-8 its derivative is ~lr / eps, so with eps = 1e-8
fp32 rounding differences of 1e-9 (every layout sums in another order) become visible
parameter differences. That is amplification by the optimizer, not a layout bug; eps = 1e-5
bounds it far below the 1e-6 parity tolerance while most updates stay Adam-like.
"""

from __future__ import annotations

from typing import Any

from ckptd.training.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig
from ckptd.training.trainer import TrainConfig


def train_config(job: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            vocab_size=101,
            n_layers=job.get("layers", 4),
            d_model=64,
            n_heads=8,
            n_kv_heads=4,
            d_ff=128,
            max_seq_len=16,
            tie_embeddings=not job.get("untied", False),
        ),
        parallel=ParallelConfig(
            tp=job.get("tp", 1),
            pp=job.get("pp", 1),
            zero_stage=job.get("zero", 1),
            schedule=job.get("schedule", "1f1b"),
            stage_layers=tuple(job["stage_layers"]) if job.get("stage_layers") else None,
            vpp=job.get("vpp", 1),
            recompute=job.get("recompute", False),
            bucket_mb=job.get("bucket_mb", 25.0),
        ),
        optim=OptimConfig(lr=1e-3, eps=1e-5, grad_clip=1.0, weight_decay=0.1),
        data=DataConfig(seq_len=16, global_batch=8, micro_batch=2, seed=7),
        steps=job.get("steps", 3),
        dtype="fp32",
    )
