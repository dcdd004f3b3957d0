"""Output to a reader that may stop early: ``ckptd inspect --json | head -1`` is not an error."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

SIGPIPE_STATUS = 141
"""What a shell reports for a tool killed by SIGPIPE (128 + 13); Python ignores SIGPIPE instead."""


@contextlib.contextmanager
def closed_pipe_ok() -> Iterator[None]:
    """Exit quietly with ``SIGPIPE_STATUS`` when stdout's reader has gone away."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit; aim it at /dev/null so that flush cannot fail too
        # (it would print "Exception ignored ... BrokenPipeError").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(SIGPIPE_STATUS) from None
