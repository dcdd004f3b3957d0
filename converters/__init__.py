"""Converters: reshard checkpoints to any parallel layout; import/export other formats."""

from ckptd.converters.interop import export_checkpoint, import_checkpoint
from ckptd.converters.reshard import ReshardResult, reshard, target_layout

__all__ = ["ReshardResult", "export_checkpoint", "import_checkpoint", "reshard", "target_layout"]
