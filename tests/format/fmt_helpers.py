"""Helpers shared by the format tests (imported as a plain module: tests/format is on sys.path)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from hypothesis import strategies as st

from ckptd.format.boxes import ShardBox
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


# ---------------------------------------------------------------- hypothesis strategies


@st.composite
def box_in(draw: st.DrawFn, shape: tuple[int, ...]) -> ShardBox:
    """Any box (possibly empty) inside an array of ``shape``."""
    offset, extent = [], []
    for s in shape:
        o = draw(st.integers(0, s))
        offset.append(o)
        extent.append(draw(st.integers(0, s - o)))
    return ShardBox(tuple(offset), tuple(extent))


@st.composite
def tilings(draw: st.DrawFn, max_1d: int = 30, max_nd: int = 30) -> tuple[tuple[int, ...], list[ShardBox]]:
    """A shape and boxes that tile it exactly (a product of random cuts per dimension)."""
    ndim = draw(st.integers(1, 3))
    cuts = []
    for _ in range(ndim):
        size = draw(st.integers(1, max_1d if ndim == 1 else max_nd))
        inner = draw(st.lists(st.integers(1, max(1, size - 1)), max_size=4))
        cuts.append(sorted({0, size, *[c for c in inner if 0 < c < size]}))
    boxes = [
        ShardBox(
            tuple(c[i] for c, i in zip(cuts, idx, strict=True)),
            tuple(c[i + 1] - c[i] for c, i in zip(cuts, idx, strict=True)),
        )
        for idx in itertools.product(*(range(len(c) - 1) for c in cuts))
    ]
    return tuple(c[-1] for c in cuts), boxes
