"""Unit and property tests for ckptd.format.names: names become path segments only when safe."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.format import UnsafeNameError
from ckptd.format.names import (
    MAX_SEGMENT_LENGTH,
    check_array_path,
    check_segment,
    encode_key,
    join_array_path,
)

UNSAFE = [
    "",
    ".",
    "..",
    "a/b",
    "/abs",
    "a\\b",
    "a\x00b",
    "a\nb",
    "tab\there",
    "\x7f",
    ".hidden",
    "zarr.json",
    "manifest.json",
    "c",
    "x" * (MAX_SEGMENT_LENGTH + 1),
    "sp ace",
    "q?x",
    "h#x",
    "a*b",
    "~home",
    "\u2603",
]


@pytest.mark.parametrize("name", UNSAFE, ids=repr)
def test_check_segment_rejects(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        check_segment(name)


def test_check_segment_accepts_ordinary_names() -> None:
    for name in ["layers.0.weight", "exp_avg", "a-b", "x+y=z", "u@v:w,1", "%2F", "_", "0"]:
        assert check_segment(name) == name
    with pytest.raises(UnsafeNameError):
        check_segment(3)  # type: ignore[arg-type]


def test_array_paths() -> None:
    assert check_array_path("model/layers.0/weight") == "model/layers.0/weight"
    for bad in ["", "/model", "model/", "a//b", "a/../b", "a/./b", "../x", "a/" * 40 + "b"]:
        with pytest.raises(UnsafeNameError):
            check_array_path(bad)
    assert join_array_path(["a", "b"]) == "a/b"
    with pytest.raises(UnsafeNameError):
        join_array_path(["a", "b/c"])


def test_encode_key_examples() -> None:
    assert encode_key("layers.0.weight") == "layers.0.weight"
    assert encode_key("a/b") == "a%2Fb"
    assert encode_key("..") == "%2E."
    assert encode_key("c") == "%63"
    assert encode_key("%") == "%25"
    assert encode_key(":step") == "%3Astep" and encode_key("a:b") == "a:b"
    assert encode_key("") == "%"


@settings(max_examples=500, deadline=None)
@given(key=st.text(max_size=16))  # 16 characters encode to at most 16 * 12 <= 200
def test_encode_key_is_always_safe(key: str) -> None:
    seg = encode_key(key)
    assert check_segment(seg) == seg
    assert "/" not in seg and seg not in ("", ".", "..")


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.text(max_size=8), unique=True, max_size=30))
def test_encode_key_is_injective(keys: list[str]) -> None:
    assert len({encode_key(k) for k in keys}) == len(keys)


@pytest.mark.parametrize(
    "a,b",
    [
        ("", "\x00"),
        (".", "%2E"),
        ("c", "%63"),
        ("..", ".."[0] + "%2E"),
        ("zarr.json", "%7Aarr.json"),
        (".a", "%2Ea"),
    ],
)
def test_encode_key_keeps_tricky_pairs_apart(a: str, b: str) -> None:
    assert encode_key(a) != encode_key(b)
