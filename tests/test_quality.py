"""The style gates of STYLE.md, enforced by the test command: ruff and mypy --strict."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCES = ["src/ckptd", "format", "converters", "api", "training", "benchmarks", "tests"]


def _tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in requirements-test.txt)")
    return found


def test_ruff_finds_nothing() -> None:
    out = subprocess.run(
        [_tool("ruff"), "check", *SOURCES], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_mypy_strict_passes_on_the_whole_package(tmp_path: Path) -> None:
    # Run outside the checkout: ./ckptd would otherwise hide the folders mapped into ckptd.*.
    out = subprocess.run(
        [
            _tool("mypy"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "ckptd",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "no issues found" in out.stdout
