"""Fixtures of the storage tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def _record_syncs(monkeypatch: pytest.MonkeyPatch, entry: Callable[[Path], T]) -> list[T]:
    """Patch ``os.fsync``/``os.fdatasync`` to append ``entry(path behind the fd)``, then sync for real."""
    seen: list[T] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def record(fd: int, real=real) -> None:  # type: ignore[no-untyped-def]
            seen.append(entry(Path(os.readlink(f"/proc/self/fd/{fd}"))))
            real(fd)

        monkeypatch.setattr(os, name, record)
    return seen


@pytest.fixture()
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Paths fsync'd (files and directories), in order; the real calls are made."""
    yield _record_syncs(monkeypatch, lambda p: p)


@pytest.fixture()
def synced_by(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Path, str]]]:
    """Paths fsync'd, each with the name of the thread that synced it; the real calls are made."""
    yield _record_syncs(monkeypatch, lambda p: (p, threading.current_thread().name))


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
