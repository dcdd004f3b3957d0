"""Pins the public API: adding is a decision, removing is a breaking change."""

from __future__ import annotations

import ckptd

PINNED = {
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
}


def test_public_api_contains_the_pinned_names() -> None:
    assert set(ckptd.__all__) >= PINNED
    for name in ckptd.__all__:
        assert hasattr(ckptd, name), name


def test_error_tree_subclasses_builtins() -> None:
    assert issubclass(ckptd.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ckptd.CheckpointExistsError, FileExistsError)
    assert issubclass(ckptd.LayoutError, ValueError)
    assert issubclass(ckptd.StorageError, OSError)
    for name in ("IntegrityError", "LayoutError", "MetadataError", "StorageError", "UnsafeNameError"):
        assert issubclass(getattr(ckptd, name), ckptd.CheckpointError)
