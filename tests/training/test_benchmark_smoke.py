"""benchmarks/train_gpu.py needs a CUDA GPU for its figures; its ``--smoke`` mode keeps it runnable here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_gpu.py"


@pytest.mark.slow  # a benchmark script's smoke run; the trainer it drives is tested in the fast tier
def test_train_gpu_benchmark_smoke_reports_overhead_and_writes_results(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-P", str(SCRIPT), "--smoke", "--out", str(tmp_path), "--dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = {r["what"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert lines["checkpointed"]["checkpoints_at"]  # checkpoints were taken inside the measured phase
    assert lines["checkpointed"]["committed_steps_kept"]
    summary = lines["summary"]
    assert summary["tokens_per_s_baseline"] > 0 and summary["tokens_per_s_checkpointed"] > 0
    assert "overhead_pct" in summary and summary["checkpoint_bytes"] > 0
    written = json.loads(Path(lines["written"]["path"]).read_text())
    assert written["machine"]["cpus"] and [r["what"] for r in written["results"]][-1] == "summary"
    assert not (tmp_path / "r").exists()  # the benchmark cleans up its checkpoints
