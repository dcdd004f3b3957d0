"""Storage URIs the catalog accepts, and the containment rule that bounds deletion.

The catalog never builds a URI from unchecked input: run roots and checkpoint locations
are parsed and normalised here, array paths pass :func:`ckptd.format.names.check_array_path`,
and anything the catalog may delete must lie strictly inside the run's root for that tier.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ckptd.api.errors import OutsideRunRootError
from ckptd.format.errors import UnsafeNameError
from ckptd.format.names import check_array_path

MAX_URI_LENGTH = 1024
# Schemes fsspec can open that name durable storage. "memory" is the in-process tier.
STORAGE_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "az", "abfs", "memory"})
TIERS = ("memory", "local", "remote")
"""Storage tiers, fastest first."""
_SEGMENT = re.compile(r"^[A-Za-z0-9_\-.+=:@,~]+$")


def check_uri(uri: str) -> str:
    """Return the normalised form of ``uri`` or raise :class:`UnsafeNameError`.

    Accepted: an absolute local path (``/data/run``) or ``scheme://bucket/key`` with a scheme from
    :data:`STORAGE_SCHEMES`; no query, fragment, credentials, port, ``.``/``..`` or empty segments.
    Normal form: no trailing slash, local paths as ``file://`` URIs are left as they were given.
    """
    if not isinstance(uri, str) or not uri:
        raise UnsafeNameError("storage URI must be a non-empty string")
    if len(uri) > MAX_URI_LENGTH:
        raise UnsafeNameError(f"storage URI is longer than {MAX_URI_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri) or "\\" in uri:
        raise UnsafeNameError(f"storage URI {uri[:80]!r} contains whitespace, control characters or '\\'")
    if uri.startswith("/"):
        scheme, rest = "", uri[1:]
    else:
        parts = urlsplit(uri)
        if parts.scheme not in STORAGE_SCHEMES:
            raise UnsafeNameError(
                f"storage URI scheme {parts.scheme!r} is not one of {sorted(STORAGE_SCHEMES)}"
            )
        if parts.query or parts.fragment or "?" in uri or "#" in uri:
            raise UnsafeNameError("storage URI must not carry a query or fragment")
        if "@" in parts.netloc or ":" in parts.netloc:
            raise UnsafeNameError("storage URI must not carry credentials or a port")
        if not uri.startswith(f"{parts.scheme}://"):
            raise UnsafeNameError(f"storage URI {uri!r} must have the form scheme://...")
        scheme, rest = parts.scheme, uri[len(parts.scheme) + 3 :]
        if scheme == "file":
            if not rest.startswith("/"):
                raise UnsafeNameError("file:// URIs must name an absolute path")
            rest = rest[1:]
    segments = rest.rstrip("/").split("/")
    if not segments or segments == [""]:
        raise UnsafeNameError(f"storage URI {uri!r} names no path")
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise UnsafeNameError(f"storage URI {uri!r} has an unsafe path segment {seg!r}")
    prefix = "/" if scheme == "" else ("file:///" if scheme == "file" else f"{scheme}://")
    return prefix + "/".join(segments)


def is_within(uri: str, root: str) -> bool:
    """True when ``uri`` lies strictly inside ``root`` (both normalised by :func:`check_uri`)."""
    uri, root = check_uri(uri), check_uri(root)
    return uri.startswith(root + "/")


def require_within(uri: str, root: str | None, *, tier: str) -> str:
    """Normalise ``uri`` and check that it lies inside ``root``; the memory tier has no root."""
    uri = check_uri(uri)
    if tier == "memory":
        return uri
    if root is None:
        raise OutsideRunRootError(f"the run has no root registered for tier {tier!r}; cannot accept {uri!r}")
    if not is_within(uri, root):
        raise OutsideRunRootError(f"{uri!r} is not inside the run's {tier} root {check_uri(root)!r}")
    return uri


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise UnsafeNameError(f"tier {tier!r} is not one of {list(TIERS)}")
    return tier


def array_uri(base: str, array_path: str) -> str:
    """The URI of one array of a checkpoint: a validated base plus a validated array path."""
    return check_uri(base) + "/" + check_array_path(array_path)


def tier_of(uri: str) -> str:
    """The tier a URI belongs to by default: memory, local (paths and file://) or remote."""
    uri = check_uri(uri)
    if uri.startswith("memory://"):
        return "memory"
    if uri.startswith(("/", "file://")):
        return "local"
    return "remote"
