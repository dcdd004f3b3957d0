"""Strict, bounded JSON for checkpoint metadata: sealed documents and typed member access.

Every metadata document ckptd writes (the commit record, array tables, the state tree,
per-rank state) is *sealed*: its last member is ``"crc32c": N``, the CRC32C of the document
with that member removed. The seal is the suffix ``,"crc32c":<digits>}`` at the very end of
the bytes (trailing whitespace allowed) — a member named ``crc32c`` anywhere inside the
document is just data. A document without a valid seal is an :class:`IntegrityError`: a
flipped byte anywhere, even inside a value, never becomes a silently different checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ckptd.format.codecs import crc32c
from ckptd.format.errors import IntegrityError, MetadataError

MAX_NDIM = 32
MAX_ELEMENTS = 2**52

_SEAL = re.compile(rb',"crc32c":(\d{1,10})\}\s*$')


def seal(body: bytes) -> bytes:
    """``body`` (a compact JSON object) with its seal appended as the last member."""
    if not body.endswith(b"}") or body == b"{}":
        raise MetadataError("a sealed document is a non-empty JSON object")
    return body[:-1] + b',"crc32c":' + str(crc32c(body)).encode() + b"}"


def dumps_sealed(doc: dict[str, Any]) -> bytes:
    return seal(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())


def check_seal(raw: bytes, where: str) -> None:
    m = _SEAL.search(raw)
    if m is None:
        raise IntegrityError(f"{where}: not sealed (its last member must be \"crc32c\"; damaged, edited "
                             "or not written by ckptd)")
    body = raw[: m.start()] + b"}"
    if crc32c(body) != int(m.group(1)):
        raise IntegrityError(f"{where}: does not match its own crc32c (damaged or edited)")


def loads_sealed(raw: bytes, where: str, *, limit: int) -> dict[str, Any]:
    """Check size, seal and syntax of a sealed document; returns the object (seal member included)."""
    if len(raw) > limit:
        raise MetadataError(f"{where} is {len(raw)} bytes, larger than the {limit} limit")
    check_seal(raw, where)
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MetadataError(f"{where} is not valid JSON: {e}") from e
    return obj(doc, where)


def _reject_constant(name: str) -> Any:
    raise MetadataError(f"non-standard JSON constant {name}")


def obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise MetadataError(f"{what} must be a JSON object, got {type(v).__name__}")
    return v


def lst(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise MetadataError(f"{what} must be a JSON list, got {type(v).__name__}")
    return v


def string(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise MetadataError(f"{what} must be a string, got {type(v).__name__}")
    return v


def integer(v: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise MetadataError(f"{what} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MetadataError(f"{what}={v} is out of range")
    return v


def boolean(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise MetadataError(f"{what} must be true or false, got {v!r}")
    return v


def shape(v: Any, what: str, lo: int = 0) -> tuple[int, ...]:
    items = lst(v, what)
    if len(items) > MAX_NDIM:
        raise MetadataError(f"{what} has {len(items)} dimensions (at most {MAX_NDIM})")
    dims = tuple(integer(x, what, lo=lo, hi=MAX_ELEMENTS) for x in items)
    if math.prod(dims) > MAX_ELEMENTS:
        raise MetadataError(f"{what} {list(dims)} has more than 2**52 elements")
    return dims
