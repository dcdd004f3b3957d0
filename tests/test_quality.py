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


@pytest.mark.slow  # a cold mypy --strict of the whole package takes a minute; `make lint` runs it too
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


# Small files with one idea each (issue 11): the package stays readable only if nothing grows past
# these bounds unnoticed. Tests and benchmarks are exempt.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
PACKAGE_FOLDERS = ["src/ckptd", "format", "converters", "api", "training"]


def _package_sources() -> list[Path]:
    return sorted(p for f in PACKAGE_FOLDERS for p in (ROOT / f).rglob("*.py"))


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _package_sources()
            if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_60_lines() -> None:
    import ast

    long = []
    for p in _package_sources():
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
