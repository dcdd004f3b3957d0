"""The ckptd universal checkpoint format (see SPEC.md beside this file).

Depends on nothing else of ckptd: the engine, converters, catalog and trainer all
build on it. Names load on first use (PEP 562), so that reading a manifest, listing or
verifying a run (``ckptd ls``, ``verify``, the catalog server) never imports torch.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every CLI start pays for it)
if TYPE_CHECKING:  # what type checkers see; at runtime __getattr__ loads these on demand
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

# public name -> the module that defines it
_ORIGIN: dict[str, str] = {
    "ShardBox": "ckptd.format.boxes",
    "CodecSpec": "ckptd.format.codecs",
    "LogicalDType": "ckptd.format.dtypes",
    "logical_dtype": "ckptd.format.dtypes",
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
    "FusedSplit": "ckptd.format.layout",
    "TensorLayout": "ckptd.format.layout",
    "mesh_coords": "ckptd.format.layout",
    "FORMAT_VERSION": "ckptd.format.manifest",
    "ArrayRecord": "ckptd.format.manifest",
    "Manifest": "ckptd.format.manifest",
    "CheckpointReader": "ckptd.format.reader",
    "Run": "ckptd.format.run",
    "step_dir": "ckptd.format.run",
    "Store": "ckptd.format.store",
    "Problem": "ckptd.format.verify",
    "CheckpointWriter": "ckptd.format.writer",
    "WriterReport": "ckptd.format.writer",
}

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


from ckptd.format.lazy import lazy_attributes  # noqa: E402 - after the names it serves

__getattr__, __dir__ = lazy_attributes(__name__, _ORIGIN, globals())
