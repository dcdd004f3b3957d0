"""What the DCP converter tests share: an exact comparison of state trees, and quiet single-process DCP."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def assert_same(got: Any, want: Any) -> None:
    """Equal trees: same keys, tensors of the same dtype and bits, equal other values."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)
    else:
        assert got == want


@pytest.fixture(autouse=True)
def _single_process_dcp() -> Iterator[None]:
    # dcp.save/load without a process group warn that they assume one process; that is the point here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        yield
