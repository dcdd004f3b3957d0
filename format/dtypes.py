"""Logical dtypes and how they are stored in Zarr v3.

Zarr v3 has no core bfloat16 or float8 types, and zarr-python cannot open an array
with an extension dtype it does not know. So every logical dtype maps to a core
Zarr dtype of the same width; the logical name is kept in the array attributes and
in the manifest, and readers reinterpret the bits (``view``), never convert them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ckptd.format.errors import MetadataError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class LogicalDType:
    """A tensor dtype as the format names it, and the Zarr core dtype that stores its bits."""

    name: str
    """Also the name of the torch dtype (``torch.bfloat16``)."""
    storage: str  # Zarr v3 core data type name, also a numpy dtype name
    itemsize: int

    @property
    def torch_dtype(self) -> torch.dtype:
        # looked up, not stored: reading a manifest (ckptd ls, verify, the catalog) never loads torch
        import torch

        dtype: torch.dtype = getattr(torch, self.name)
        return dtype

    @property
    def numpy_storage(self) -> np.dtype[np.generic]:
        return np.dtype(self.storage).newbyteorder("<")

    @property
    def bit_reinterpreted(self) -> bool:
        """True when the stored Zarr dtype is not the logical dtype (bf16, fp8)."""
        return self.name != self.storage


_TABLE: tuple[LogicalDType, ...] = (
    LogicalDType("float64", "float64", 8),
    LogicalDType("float32", "float32", 4),
    LogicalDType("float16", "float16", 2),
    LogicalDType("bfloat16", "uint16", 2),
    LogicalDType("float8_e4m3fn", "uint8", 1),
    LogicalDType("float8_e5m2", "uint8", 1),
    LogicalDType("complex64", "complex64", 8),
    LogicalDType("complex128", "complex128", 16),
    LogicalDType("int8", "int8", 1),
    LogicalDType("int16", "int16", 2),
    LogicalDType("int32", "int32", 4),
    LogicalDType("int64", "int64", 8),
    LogicalDType("uint8", "uint8", 1),
    LogicalDType("uint16", "uint16", 2),
    LogicalDType("uint32", "uint32", 4),
    LogicalDType("uint64", "uint64", 8),
    LogicalDType("bool", "bool", 1),
)

BY_NAME: dict[str, LogicalDType] = {d.name: d for d in _TABLE}


@functools.cache
def _by_torch() -> dict[torch.dtype, LogicalDType]:
    return {d.torch_dtype: d for d in _TABLE}


def logical_dtype(name: str) -> LogicalDType:
    """Look up a logical dtype by its format name; unknown names are a :class:`MetadataError`."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise MetadataError(f"unknown logical dtype {name!r}; known: {sorted(BY_NAME)}") from None


def of_tensor(tensor: torch.Tensor) -> LogicalDType:
    try:
        return _by_torch()[tensor.dtype]
    except KeyError:
        raise MetadataError(f"tensors of dtype {tensor.dtype} cannot be checkpointed") from None


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy when the tensor is a contiguous CPU tensor) of the tensor's stored bits."""
    import torch

    dt = of_tensor(tensor)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if dt.bit_reinterpreted:
        t = t.view(getattr(torch, dt.storage))  # the same-width unsigned type: uint8 or uint16
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # numpy() does not support these torch dtypes; view through a same-width signed type.
        signed = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}[t.dtype]
        return t.view(signed).numpy().view(dt.numpy_storage)
    return t.numpy()


def numpy_to_tensor(array: np.ndarray, dt: LogicalDType) -> torch.Tensor:
    """Wrap stored bits as a tensor of the logical dtype (shares memory with ``array``)."""
    import torch

    arr = array if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(array.shape)
    if arr.dtype.itemsize != dt.itemsize:
        raise MetadataError(f"stored item size {arr.dtype.itemsize} does not match {dt.name}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        signed = np.dtype(f"<i{arr.dtype.itemsize}")
        t = torch.from_numpy(arr.view(signed))
        return t.view(dt.torch_dtype)
    t = torch.from_numpy(arr)
    if dt.bit_reinterpreted or t.dtype != dt.torch_dtype:
        t = t.view(dt.torch_dtype)
    return t
