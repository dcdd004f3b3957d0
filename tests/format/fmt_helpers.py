"""Helpers shared by the format tests (imported as a plain module: tests/format is on sys.path)."""

from __future__ import annotations

import math
from typing import Any

import torch
from ckptd.format.dtypes import _TABLE

ALL_DTYPES: list[torch.dtype] = [d.torch_dtype for d in _TABLE]


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's element bits in C order (NaN payloads, -0.0 and all)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (what, tuple(got.shape), tuple(want.shape))
    assert raw_bytes(got) == raw_bytes(want), f"{what}: bits differ"


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor whose bits are uniformly random: NaNs with payloads, infinities, subnormals, -0.0."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape).clone()


def assert_tree_equal(got: Any, want: Any, path: str = "") -> None:
    """Structural equality with bitwise tensors and NaN-aware floats."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert_bits_equal(got, want, path)
    elif isinstance(want, float):
        assert isinstance(got, float), (path, got)
        assert (math.isnan(got) and math.isnan(want)) or got == want, (path, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict), (path, type(got))
        assert list(got.keys()) == list(want.keys()), (path, list(got), list(want))
        for k in want:
            assert_tree_equal(got[k], want[k], f"{path}/{k!r}")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want), (path, type(got), type(want))
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_tree_equal(g, w, f"{path}/{i}")
    else:
        assert type(got) is type(want) and got == want, (path, got, want)
