"""The ckptd universal checkpoint format (see SPEC.md beside this file).

Depends on nothing else of ckptd: the engine, converters, catalog and trainer all
build on it.
"""

from ckptd.format.boxes import ShardBox
from ckptd.format.codecs import CodecSpec
from ckptd.format.dtypes import LogicalDType, logical_dtype
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
from ckptd.format.layout import FusedSplit, TensorLayout, mesh_coords
from ckptd.format.manifest import FORMAT_VERSION, ArrayRecord, Manifest
from ckptd.format.reader import CheckpointReader
from ckptd.format.run import Run, step_dir
from ckptd.format.store import Store
from ckptd.format.verify import Problem
from ckptd.format.writer import CheckpointWriter, WriterReport

__all__ = [
    "FORMAT_VERSION",
    "ArrayRecord",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointWriter",
    "CodecSpec",
    "ConfigError",
    "CoordinationTimeout",
    "FusedSplit",
    "IntegrityError",
    "LayoutError",
    "LogicalDType",
    "Manifest",
    "MetadataError",
    "Problem",
    "Run",
    "ShardBox",
    "StorageError",
    "Store",
    "TensorLayout",
    "UnsafeNameError",
    "UnsupportedFormatError",
    "WriterReport",
    "logical_dtype",
    "mesh_coords",
    "step_dir",
]
