"""ckptd: checkpoints and resilience for PyTorch distributed training.

The public API is listed in ``__all__`` (pinned by tests/engine/test_public_api.py). Names are
loaded on first use (PEP 562): ``import ckptd`` alone, and every ``ckptd.*`` submodule import,
stays cheap — ``ckptd --help`` and the catalog server never load torch for a name they do not use.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every CLI start pays for it)
if TYPE_CHECKING:  # what type checkers and IDEs see; at runtime __getattr__ loads these on demand
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
    from ckptd.format.boxes import ShardBox
    from ckptd.format.codecs import CodecSpec
    from ckptd.format.errors import (
        CheckpointError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        ConfigError,
        CoordinationTimeout,
        IntegrityError,
        LayoutError,
        MetadataError,
        StorageError,
        UnsafeNameError,
        UnsupportedFormatError,
    )
    from ckptd.format.layout import TensorLayout
    from ckptd.storage import open_store

__version__ = "0.1.0"

# public name -> the module that defines it
_ORIGIN: dict[str, str] = {
    "load": "ckptd.checkpoint_io",
    "open_run": "ckptd.checkpoint_io",
    "save": "ckptd.checkpoint_io",
    "CatalogConfig": "ckptd.engine.config",
    "Checkpointer": "ckptd.engine.checkpointer",
    "CheckpointerConfig": "ckptd.engine.config",
    "Retention": "ckptd.engine.config",
    "ShardSpec": "ckptd.engine.config",
    "TierConfig": "ckptd.engine.config",
    "TrainState": "ckptd.engine.dtensor_state",
    "ShardBox": "ckptd.format.boxes",
    "CodecSpec": "ckptd.format.codecs",
    "CheckpointError": "ckptd.format.errors",
    "CheckpointExistsError": "ckptd.format.errors",
    "CheckpointNotFoundError": "ckptd.format.errors",
    "ConfigError": "ckptd.format.errors",
    "CoordinationTimeout": "ckptd.format.errors",
    "IntegrityError": "ckptd.format.errors",
    "LayoutError": "ckptd.format.errors",
    "MetadataError": "ckptd.format.errors",
    "StorageError": "ckptd.format.errors",
    "UnsafeNameError": "ckptd.format.errors",
    "UnsupportedFormatError": "ckptd.format.errors",
    "TensorLayout": "ckptd.format.layout",
    "open_store": "ckptd.storage",
}

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


from ckptd.format.lazy import lazy_attributes  # noqa: E402 - after the names it serves

__getattr__, __dir__ = lazy_attributes(__name__, _ORIGIN, globals())
