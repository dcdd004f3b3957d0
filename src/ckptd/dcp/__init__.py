"""ckptd behind PyTorch DCP's storage API: one changed line turns ``dcp.save`` into a ckptd checkpoint.

::

    import torch.distributed.checkpoint as dcp
    import ckptd.dcp

    dcp.save(state, storage_writer=ckptd.dcp.StorageWriter("s3://bucket/run", step=step))
    dcp.async_save(state, storage_writer=ckptd.dcp.StorageWriter("s3://bucket/run", step=step))
    dcp.load(state, storage_reader=ckptd.dcp.StorageReader("s3://bucket/run", step=step))

The result is an ordinary ckptd checkpoint: universal (canonical global shapes, readable at
any layout with ``ckptd.load``), verifiable with ``ckptd verify`` and visible to the catalog.
Non-tensor items must be JSON-able values; nothing is ever unpickled when loading.
"""

from ckptd.dcp.reader import StorageReader
from ckptd.dcp.writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter"]
