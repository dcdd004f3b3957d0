"""``make demo`` must keep working: it is the first thing a new user runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


# slow: the whole demo (training, catalog, web page) takes minutes; `make test-slow` runs it.
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-P", "-m", "ckptd.demo"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "corruption detected" in out.stdout
    assert "step     9" in out.stdout  # the trainer resumed at another layout and reached step 9
    assert (tmp_path / "demo-run" / "step_0000000030" / "manifest.json").exists()
    assert (tmp_path / "demo-run-gpt" / "step_0000000009" / "manifest.json").exists()
