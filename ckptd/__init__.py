"""ckptd: checkpoints and resilience for PyTorch distributed training.

The public API is listed in ``__all__`` (pinned by tests/ckptd/test_public_api.py).
"""

import os as _os

# Imported straight from a source checkout (the repository root on sys.path, as with
# `python -m ...` run there) the sibling folders that pyproject maps into ckptd.*
# (format/, api/, ...) are not below this directory; let the package find them.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "format", "SPEC.md")) and _checkout not in __path__:
    __path__.append(_checkout)

from ckptd.checkpoint_io import load, open_run, save  # noqa: E402
from ckptd.engine import (  # noqa: E402
    CatalogConfig,
    Checkpointer,
    CheckpointerConfig,
    Retention,
    ShardSpec,
    TierConfig,
)
from ckptd.engine.dtensor_state import TrainState  # noqa: E402
from ckptd.format import (  # noqa: E402
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CodecSpec,
    IntegrityError,
    LayoutError,
    MetadataError,
    ShardBox,
    StorageError,
    TensorLayout,
    UnsafeNameError,
    UnsupportedFormatError,
)
from ckptd.storage import open_store  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CatalogConfig",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "CheckpointerConfig",
    "CodecSpec",
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
