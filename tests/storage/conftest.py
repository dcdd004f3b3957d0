"""Fixtures of the storage tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture()
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Paths fsync'd (files and directories), in order; the real calls are made."""
    seen: list[Path] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def record(fd: int, real=real) -> None:  # type: ignore[no-untyped-def]
            seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(os, name, record)
    yield seen
