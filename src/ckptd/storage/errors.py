"""Backend errors become ``StorageError`` at the storage boundary, in one place.

Every store operation that touches a backend runs inside ``map_exceptions``: errors of the
``ckptd`` tree pass through unchanged (a refused key, ``CheckpointExistsError``), a missing
object is raised, wrapped or ignored as the operation's contract says, and anything else
becomes a ``StorageError`` that names the operation, the key and the store, with the
backend's exception attached as ``__cause__``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from ckptd.format.errors import CheckpointError, StorageError

Missing = Literal["raise", "wrap", "ignore"]
"""What a ``FileNotFoundError`` does: propagate as is (``read``: callers test for absence), become
a ``StorageError`` (a write whose directory vanished), or end the block quietly (``delete``)."""


def describe(e: BaseException) -> str:
    """The backend's error in words: ``strerror`` for OS errors, else the exception's type and text."""
    if isinstance(e, OSError) and e.strerror:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        return f"{e.strerror}{hint}"
    return f"{type(e).__name__}: {e}"


@contextmanager
def map_exceptions(what: str, *, url: str, key: str | None = None, missing: Missing = "raise",
                   catch: tuple[type[Exception], ...] = (Exception,)) -> Iterator[None]:
    """Translate the backend errors of the block (see the module docstring).

    ``what`` says what was being done, in words (``"writing step_00000010/zarr.json"``).
    ``catch`` narrows what is translated: the local store translates ``OSError`` only (anything
    else there is a bug and must surface as such); fsspec backends raise botocore and aiohttp
    errors that do not derive from ``OSError``, so everything is translated there.
    """
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        if missing == "ignore":
            return
        if missing == "raise":
            raise
        raise StorageError(f"{what} on {url} failed: {describe(e)}", key=key, url=url) from e
    except catch as e:
        raise StorageError(f"{what} on {url} failed: {describe(e)}", key=key, url=url) from e
