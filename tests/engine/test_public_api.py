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
    assert issubclass(ckptd.ConfigError, ValueError)
    assert issubclass(ckptd.CoordinationTimeout, TimeoutError)
    for name in ("ConfigError", "CoordinationTimeout", "IntegrityError", "LayoutError", "MetadataError",
                 "StorageError", "UnsafeNameError"):
        assert issubclass(getattr(ckptd, name), ckptd.CheckpointError)


def test_coordination_timeout_keeps_its_old_import_path() -> None:
    from ckptd.engine.coordination import CoordinationTimeout

    assert CoordinationTimeout is ckptd.CoordinationTimeout


def test_storage_and_integrity_errors_carry_key_and_url() -> None:
    err = ckptd.StorageError("disk full", key="step_00000010/zarr.json", url="/runs/a")
    assert (err.key, err.url, str(err)) == ("step_00000010/zarr.json", "/runs/a", "disk full")
    bare = ckptd.IntegrityError("crc32c mismatch")
    assert (bare.key, bare.url) == (None, None)
