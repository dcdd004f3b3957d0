"""Fixtures for the format tests: run roots on local disk and on the S3 endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    """``(uri, storage_options)`` of an empty run root, on local disk and on S3."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")
