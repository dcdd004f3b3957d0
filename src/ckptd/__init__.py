"""ckptd: checkpoints and resilience for PyTorch distributed training.

The public API is listed in ``__all__`` (pinned by tests/engine/test_public_api.py).
"""

from ckptd.checkpoint_io import load, open_run, save
from ckptd.engine import (
    CatalogConfig,
    Checkpointer,
    CheckpointerConfig,
    Retention,
    ShardSpec,
    TierConfig,
)
from ckptd.engine.dtensor_state import TrainState
from ckptd.format import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CodecSpec,
    ConfigError,
    CoordinationTimeout,
    IntegrityError,
    LayoutError,
    MetadataError,
    ShardBox,
    StorageError,
    TensorLayout,
    UnsafeNameError,
    UnsupportedFormatError,
)
from ckptd.storage import open_store

__version__ = "0.1.0"

__all__ = [
    "CatalogConfig",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "CheckpointerConfig",
    "CodecSpec",
    "ConfigError",
    "CoordinationTimeout",
    "IntegrityError",
    "LayoutError",
    "MetadataError",
    "Retention",
    "ShardBox",
    "ShardSpec",
    "StorageError",
    "TensorLayout",
    "TierConfig",
    "TrainState",
    "UnsafeNameError",
    "UnsupportedFormatError",
    "__version__",
    "load",
    "open_run",
    "open_store",
    "save",
]
