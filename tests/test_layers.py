"""The architecture's import rules (pyproject.toml ``[tool.importlinter]``), checked by import-linter
over the installed ``ckptd`` package: a broken contract fails here with the linter's own report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_contracts_are_kept() -> None:
    # not a skip: requirements-test.txt installs it, and a missing linter must not pass silently
    assert LINT_IMPORTS.exists(), "import-linter is missing: pip install -r requirements-test.txt"
    done = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "0 broken" in report, report
