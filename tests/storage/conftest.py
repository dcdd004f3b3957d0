"""Fixtures of the storage tests."""

from __future__ import annotations

import os
import threading
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


@pytest.fixture()
def synced_by(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Path, str]]]:
    """Paths fsync'd, each with the name of the thread that synced it; the real calls are made."""
    seen: list[tuple[Path, str]] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def record(fd: int, real=real) -> None:  # type: ignore[no-untyped-def]
            seen.append((Path(os.readlink(f"/proc/self/fd/{fd}")), threading.current_thread().name))
            real(fd)

        monkeypatch.setattr(os, name, record)
    yield seen


@pytest.fixture()
def writeback_started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Paths whose writeback ``LocalStore`` started early, in order; the real calls are made."""
    from ckptd.storage import local

    seen: list[Path] = []
    real = local.start_writeback

    def record(fd: int) -> bool:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(local, "start_writeback", record)
    yield seen
