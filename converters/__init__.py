"""Converters: reshard checkpoints to any parallel layout; import/export other formats."""

from ckptd.converters.reshard import ReshardResult, reshard, target_layout

__all__ = ["ReshardResult", "reshard", "target_layout"]
