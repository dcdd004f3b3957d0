"""Where runs may keep their data, and the one URI per tier a checkpoint may have: what bounds
everything the catalog can be made to delete.

* A run root must lie under one of the prefixes the server operator allowed
  (``ckptd serve --allow-root``, ``CKPTD_ALLOW_ROOTS``; by default only the server's data directory).
  Local paths are compared as written *and* with symlinks resolved, so a link inside an allowed
  prefix cannot lead out of it.
* A checkpoint's location in a tier is exactly ``<run root>/step_<10 digits of its step>``.
* GC deletes a local location only when it is a real directory (not a symlink) inside the
  resolved run root.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ckptd.api.errors import OutsideRunRootError, RootNotAllowedError
from ckptd.api.uris import check_uri

MAX_STEP_DIR = 10**10
"""``step_<10 digits>``: the steps a checkpoint directory can name."""


def check_allowed_root(prefix: str) -> str:
    """Validate an operator-given allowed prefix (an absolute path or a storage URI); ValueError if bad."""
    prefix = prefix.strip()
    try:
        return check_uri(prefix)
    except ValueError as e:
        raise ValueError(f"allowed root {prefix!r}: {e}") from e


def local_path(uri: str) -> str | None:
    """The filesystem path of a normalised local URI (``/x`` or ``file:///x``), else None."""
    if uri.startswith("/"):
        return uri
    if uri.startswith("file:///"):
        return uri[len("file://") :]
    return None


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def is_allowed(root: str, prefixes: Iterable[str]) -> bool:
    root = check_uri(root)
    path = local_path(root)
    for prefix in prefixes:
        prefix_path = local_path(prefix)
        if path is not None and prefix_path is not None:
            if _under(path, prefix_path) and _under(os.path.realpath(path), os.path.realpath(prefix_path)):
                return True
        elif path is None and prefix_path is None and _under(root, prefix):
            return True
    return False


def require_allowed_root(root: str, prefixes: Iterable[str] | None) -> str:
    """Normalise a run root and check it against the allowed prefixes (``None``: the operator's own
    command line, e.g. ``ckptd catalog sync``, where any root goes)."""
    root = check_uri(root)
    if prefixes is None:
        return root
    prefixes = tuple(prefixes)
    if not is_allowed(root, prefixes):
        raise RootNotAllowedError(
            f"run root {root!r} is not under an allowed prefix of this catalog server {list(prefixes)} "
            "(ckptd serve --allow-root)"
        )
    return root


def step_location(root: str, step: int) -> str:
    """``<root>/step_<10 digits>``: the only location a checkpoint of ``step`` may have under ``root``."""
    if not 0 <= step < MAX_STEP_DIR:
        raise OutsideRunRootError(f"step {step} cannot be stored: step directories hold steps below 10**10")
    return f"{check_uri(root)}/step_{step:010d}"


def require_checkpoint_location(uri: str, root: str | None, *, tier: str, step: int) -> str:
    """Normalise a checkpoint location and check that it is its step's directory under the run root
    for ``tier``; the memory tier (a training process's RAM) has no root."""
    uri = check_uri(uri)
    if tier == "memory":
        return uri
    if root is None:
        raise OutsideRunRootError(f"the run has no root registered for tier {tier!r}; cannot accept {uri!r}")
    expected = step_location(root, step)
    if uri != expected:
        raise OutsideRunRootError(f"the {tier} location of step {step} must be {expected!r}, not {uri!r}")
    return uri


def deletable_local_dir(uri: str, root: str) -> str | None:
    """The path GC may remove for a local location, or a reason (``OutsideRunRootError``) why not;
    None for a non-local URI."""
    path, root_path = local_path(uri), local_path(check_uri(root))
    if path is None or root_path is None:
        return None
    if os.path.islink(path):
        raise OutsideRunRootError(f"{uri!r} is a symlink; GC does not follow it")
    if not _under(os.path.realpath(path), os.path.realpath(root_path)):
        raise OutsideRunRootError(f"{uri!r} resolves outside the run root {root!r}")
    return path
