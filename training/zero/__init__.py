"""ZeRO data parallelism: optimizer state, gradients and parameters sharded over dp ranks."""

from ckptd.training.zero.optimizer import ParamState, ZeroAdamW
from ckptd.training.zero.shard import ParamShards

__all__ = ["ParamShards", "ParamState", "ZeroAdamW"]
