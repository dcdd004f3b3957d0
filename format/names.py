"""Validation of names that become storage path segments.

Tensor paths come from user state dicts and run names from users; both end up in
object keys and file names. Nothing is joined into a path before it passes here,
so a hostile manifest can never make a reader or writer touch anything outside
its run root.
"""

from __future__ import annotations

import re

from ckptd.format.errors import UnsafeNameError

# Printable, no separators, no shell or URL metacharacters that object stores treat
# specially. Dots are allowed inside a segment ("layers.0.weight") but a segment can
# never be "." or "..", and never starts with "." (reserved for temporary files).
_SEGMENT = re.compile(r"^[A-Za-z0-9_\-%][A-Za-z0-9_.\-+=:@,%]*$")
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.+=:@,")
_NOT_FIRST = frozenset(".+=:@,")  # safe inside a segment, but not as its first character (see _SEGMENT)
MAX_SEGMENT_LENGTH = 200
MAX_PATH_DEPTH = 32
RESERVED_SEGMENTS = frozenset({"zarr.json", "manifest.json", "c"})


def check_segment(name: str) -> str:
    """Return ``name`` if it is a safe single path segment, else raise :class:`UnsafeNameError`."""
    if not isinstance(name, str):
        raise UnsafeNameError(f"name must be a string, got {type(name).__name__}")
    if name in ("", ".", ".."):
        raise UnsafeNameError(f"name {name!r} cannot be used as a path segment")
    if len(name) > MAX_SEGMENT_LENGTH:
        raise UnsafeNameError(f"name {name[:40]!r}... is longer than {MAX_SEGMENT_LENGTH} characters")
    if name in RESERVED_SEGMENTS:
        raise UnsafeNameError(f"name {name!r} is reserved by the checkpoint format")
    if not _SEGMENT.match(name):
        raise UnsafeNameError(
            f"name {name!r} contains characters that are not allowed in a checkpoint path segment "
            "(allowed: letters, digits and _ - . + = : @ , %; it must not start with '.')"
        )
    return name


def check_array_path(path: str) -> str:
    """Validate a ``/``-separated array path (for example ``model/layers.0.weight``)."""
    if not isinstance(path, str) or not path:
        raise UnsafeNameError(f"array path must be a non-empty string, got {path!r}")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise UnsafeNameError(f"array path {path!r} is nested deeper than {MAX_PATH_DEPTH} levels")
    for part in parts:
        check_segment(part)
    return path


def join_array_path(segments: tuple[str, ...] | list[str]) -> str:
    """Join already-separate key segments into an array path, validating each."""
    return check_array_path("/".join(check_segment(s) for s in segments))


def encode_key(key: str) -> str:
    """Map any state-dict key injectively to a safe path segment.

    Characters outside the safe set are percent-encoded (UTF-8), as are a leading ``. + = : @ ,``
    and the first character of reserved names, so ``"a/b"`` becomes ``"a%2Fb"`` and ``".."``
    becomes ``"%2E%2E"``. Ordinary keys (``"layers.0.weight"``) are unchanged.
    """
    out = []
    for i, ch in enumerate(key):
        if ch in _SAFE_CHARS and not (i == 0 and ch in _NOT_FIRST):
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
    seg = "".join(out)
    if seg in RESERVED_SEGMENTS:
        seg = f"%{ord(seg[0]):02X}{seg[1:]}"
    if seg == "":
        seg = "%"  # no other key encodes to a lone "%" (every escape has two hex digits); "%00" is "\x00"
    if seg == ".":
        seg = "%2E"
    return check_segment(seg)
