"""Fixtures for the format tests: run roots on local disk and on the S3 endpoint."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from damaged import build_checkpoint

from ckptd.format.run import Run


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    """``(uri, storage_options)`` of an empty run root, on local disk and on S3."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "run"
    build_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def template_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template_v1") / "run"
    build_checkpoint(root, version=1)
    return root


def _fresh_copy(template: Path, outer: Path) -> Path:
    shutil.copytree(template, outer / "run")
    (outer / "secret").write_bytes(b"do not touch")
    return outer / "run"


@pytest.fixture()
def root(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the checkpoint at ``<tmp>/outer/run``, with a sentinel next to the run root."""
    return _fresh_copy(template, tmp_path / "outer")


@pytest.fixture()
def root_v1(template_v1: Path, tmp_path: Path) -> Path:
    """The same checkpoint written in format v1 (still read), copied the same way."""
    return _fresh_copy(template_v1, tmp_path / "outer_v1")


@pytest.fixture(autouse=True)
def _attempts_end_with_their_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An attempt a test opened and never committed (a refused commit leaves it open for a retry)
    stops refreshing its lease when the test ends: a lease thread left running would write into
    that test's directory while later tests audit their file access."""
    opened: list[tuple[Run, int]] = []
    prepare = Run.prepare

    def recording(self: Run, step: int, **kwargs: Any) -> Any:
        store = prepare(self, step, **kwargs)
        opened.append((self, step))
        return store

    monkeypatch.setattr(Run, "prepare", recording)
    yield
    for run, step in opened:
        run.abandon(step)
