"""Helpers for the trainer tests: the single-process reference and multi-process launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ckptd.training.adapter import assemble_canonical
from ckptd.training.mesh import ParallelContext
from ckptd.training.trainer import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _configs import train_config  # noqa: E402

from tests.zygote import spawn  # noqa: E402

Result = dict[str, Any]


def reference(job: dict[str, Any], steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], Trainer]:
    """The single-process run (dp1 tp1 pp1) of the same model, data and optimizer."""
    ref_job = {"untied": job.get("untied", False), "layers": job.get("layers", 4), "zero": 1, "steps": steps}
    trainer = Trainer(train_config(ref_job), ParallelContext())
    trainer.init_weights()
    losses = [trainer.train_step().loss for _ in range(steps)]
    return losses, assemble_canonical([trainer.adapter.to_canonical()]), trainer


def launch(world: int, jobs: list[dict[str, Any]], out: Path, timeout: float = 300) -> dict[str, Result]:
    """Run ``jobs`` on a fresh gloo world of ``world`` ranks; return each job's losses and canonical state."""
    # The parent holds the rendezvous store on a kernel-chosen port: no fixed port, no race.
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # Output to files (a chatty rank never blocks on a pipe); ranks are forks of the warm zygote.
    files = [tempfile.TemporaryFile() for _ in range(world)]  # noqa: SIM115 - closed below
    procs = [
        spawn([str(HERE / "_worker.py"), str(r), str(world), str(store.port), json.dumps(jobs), str(out)],
              env=env, stdout=files[r], stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    logs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.seek(0)
            logs.append(f.read().decode(errors="replace"))
            f.close()
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise AssertionError(f"ranks failed {bad}:\n" + "\n".join(logs[r][-3000:] for r, _ in bad))
    results: dict[str, Result] = {}
    for job in jobs:
        job_dir = out / job["name"]
        ranks = [torch.load(f, weights_only=True) for f in sorted(job_dir.glob("rank*.pt"))]
        results[job["name"]] = {
            "losses": ranks[0]["losses"],
            "state": _assemble(ranks),
            "param_bytes_peak": [r["param_bytes_peak"] for r in ranks],
        }
    return results


def _assemble(ranks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for r in ranks:
        for path, e in r["canonical"].items():
            if not e["writer"]:
                continue
            t = full.setdefault(path, torch.zeros(e["shape"], dtype=e["data"].dtype))
            t[tuple(slice(o, o + s) for o, s in zip(e["offset"], e["box"], strict=True))] = e["data"]
    return full


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# Layouts that share one launch per world size. "load_from" jobs start from the canonical state
# another job left (an in-memory checkpoint, resharded by the adapter).
WORLD2 = [
    {"name": "tp2", "tp": 2},
    {"name": "pp2-gpipe", "pp": 2, "schedule": "gpipe"},
    {"name": "pp2-1f1b", "pp": 2, "schedule": "1f1b"},
    {"name": "pp2-1f1b-uneven-1-3", "pp": 2, "schedule": "1f1b", "stage_layers": [1, 3]},
    {"name": "zero1-dp2", "zero": 1},
    {"name": "zero2-dp2", "zero": 2},
    {"name": "zero3-dp2", "zero": 3},
    {"name": "pp2-vpp2", "pp": 2, "vpp": 2},
    {"name": "pp2-vpp2-recompute-zero3", "pp": 2, "vpp": 2, "recompute": True, "zero": 3},
    # Small buckets: several per stage, some with several tensors, launched during backward.
    *({"name": f"zero{z}-dp2-buckets", "zero": z, "bucket_mb": 0.05} for z in (0, 1, 2, 3)),
]
WORLD4 = [
    {"name": "tp4", "tp": 4},
    {"name": "pp4-gpipe", "pp": 4, "schedule": "gpipe"},
    {"name": "pp4-1f1b", "pp": 4, "schedule": "1f1b"},
    {"name": "zero0-dp4", "zero": 0},
    {"name": "zero1-dp4", "zero": 1},
    {"name": "zero2-dp4", "zero": 2},
    {"name": "zero3-dp4", "zero": 3},
    {"name": "tp2-pp2-untied-zero3", "tp": 2, "pp": 2, "zero": 3, "untied": True},
    {"name": "pp4-vpp2", "pp": 4, "vpp": 2, "layers": 8},
    {"name": "zero3-dp4-recompute-buckets", "zero": 3, "recompute": True, "bucket_mb": 0.05},
    # ZeRO memory at 8 layers (test_zero_memory.py); parity is checked as for every job.
    {"name": "zero2-dp4-8layers", "zero": 2, "layers": 8},
    {"name": "zero3-dp4-8layers", "zero": 3, "layers": 8},
]
WORLD8 = [
    {"name": "dp2-tp2-pp2", "tp": 2, "pp": 2, "zero": 1},
    {"name": "dp2-tp2-pp2-zero2-gpipe", "tp": 2, "pp": 2, "zero": 2, "schedule": "gpipe"},
    {"name": "dp2-tp2-pp2-vpp2", "tp": 2, "pp": 2, "vpp": 2, "zero": 1},
]
for _job in WORLD2 + WORLD4 + WORLD8:
    _job["steps"] = 3
# Resharding: continue the dp2-tp2-pp2 ZeRO-1 state for one step in other layouts, and in the
# same layout next to an uninterrupted 4-step run (resume must be bit-exact there).
RESHARD8 = [
    {"name": "resume-dp4-tp1-pp2-zero3", "pp": 2, "zero": 3, "load_from": "dp2-tp2-pp2", "steps": 1},
    {"name": "resume-dp2-tp2-pp2", "tp": 2, "pp": 2, "zero": 1, "load_from": "dp2-tp2-pp2", "steps": 1},
    {"name": "uninterrupted-dp2-tp2-pp2", "tp": 2, "pp": 2, "zero": 1, "steps": 4},
]


@pytest.fixture(scope="session")
def world2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    return launch(2, WORLD2, tmp_path_factory.mktemp("w2"))


@pytest.fixture(scope="session")
def world4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    return launch(4, WORLD4, tmp_path_factory.mktemp("w4"))


@pytest.fixture(scope="session")
def world8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    return launch(8, WORLD8 + RESHARD8, tmp_path_factory.mktemp("w8"))
