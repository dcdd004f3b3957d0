"""The web page at ``/`` in headless Chromium (Debian's ``chromium``): it loads, lists runs,
draws the metric chart of the selected run and offers rollback on committed checkpoints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import LiveServer, add_checkpoint, make_run

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is absent (install Debian's chromium: .ci/services/chromium.sh)",
)


def _chromium(url: str, profile: Path, *extra: str) -> str:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *extra,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_lists_runs_and_draws_the_chart(live: LiveServer, api: httpx.Client, tmp_path: Path) -> None:
    assert shutil.which(CHROMIUM)
    # The page selects the first run by name: make ours sort first.
    name = "0000-web-" + make_run(api)[4:]
    api.post("/api/v1/runs", json={"name": name}).raise_for_status()
    for step, loss in [(100, 3.0), (200, 2.0), (300, 2.5)]:
        add_checkpoint(api, name, step, metrics={"loss": loss})
    add_checkpoint(api, name, 400, commit=False)

    dom = _chromium(f"{live.url}/", tmp_path / "profile", "--dump-dom")
    assert f'data-run="{name}"' in dom  # the runs list
    assert (
        'id="metric-line"' in dom and 'data-points="3"' in dom
    )  # the chart, one point per checkpoint with loss
    assert dom.count('data-checkpoint="') == 3  # rollback buttons on committed checkpoints only
    assert "no rollback requested" in dom

    shot = tmp_path / "page.png"
    _chromium(f"{live.url}/", tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,700")
    assert shot.stat().st_size > 5000
