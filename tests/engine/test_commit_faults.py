"""Distributed commit failures on 4 gloo ranks, with a fault-injecting store around the real one.

One job (``workers/commit_faults.py``) goes through every way one rank can break a save: its
shard write fails, its prepare (making its shards durable) fails, rank 0 cannot open the
attempt, it hangs past the commit timeout, it is SIGKILLed while writing. In each case every
other rank raises ``CheckpointError`` within the commit timeout (plus generous slack), nothing of
that step is committed, and the previous checkpoint loads bit-exactly. A SIGUSR1 sent by this
process to one rank only makes every rank checkpoint the same step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptd
from tests.launch import Job, launch

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from commit_faults import KILL_STEP, KILLED_RANK, PREEMPTED_RANK, SCENARIOS  # noqa: E402
from scale_job import values  # noqa: E402

pytestmark = pytest.mark.distributed
WORLD = 4
SLACK_S = 30.0  # a loaded 2-core machine; the point is "bounded by the timeout", not speed
Records = tuple[Path, list[dict]]  # the run root and every rank's record


def signal_one_rank(out: Path):  # type: ignore[no-untyped-def]
    def during(job: Job) -> None:
        deadline = time.monotonic() + 240
        while not all((out / f"ready-{r}").exists() for r in range(WORLD)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in job.procs):
                return  # the job failed before the loop; launch() reports it
            time.sleep(0.1)
        os.kill(job.procs[PREEMPTED_RANK].pid, signal.SIGUSR1)

    return during


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Records:
    base = tmp_path_factory.mktemp("commit_faults")
    run, out = base / "run", base / "out"
    out.mkdir()
    launch(["-P", str(WORKERS / "commit_faults.py"), str(run), str(out)], WORLD, timeout=300,
           expect_dead={KILLED_RANK}, during=signal_one_rank(out))
    return run, [json.loads((out / f"rank-{r}.json").read_text()) for r in range(WORLD)]


def assert_loads(run: Path, step: int) -> None:
    state = {"table": torch.zeros(64, 33, dtype=torch.float64), "vec": torch.zeros(5)}
    assert ckptd.load(state, str(run), step=step) == step
    assert torch.equal(state["table"], values(step))
    assert torch.equal(state["vec"], torch.full((5,), float(step)))


@pytest.mark.parametrize("step", sorted(SCENARIOS), ids=[SCENARIOS[s][0] for s in sorted(SCENARIOS)])
def test_one_failing_rank_fails_the_save_on_every_rank_and_commits_nothing(job: Records, step: int) -> None:
    run, ranks = job
    for res in ranks:
        got = res[str(step)]
        assert got["error"] is not None, f"rank {res['rank']} did not learn that step {step} failed"
        assert got["error"] in ("CheckpointError", "StorageError", "CoordinationTimeout"), got
        assert got["after_s"] < res["commit_timeout_s"] + SLACK_S, got
    fault, bad_rank = SCENARIOS[step]
    if fault in ("write", "prepare", "lease"):  # the failing rank's own error names the cause
        assert "injected" in ranks[bad_rank][str(step)]["message"], ranks[bad_rank][str(step)]
    assert step not in ckptd.open_run(str(run)).steps()
    assert not list((run / f"step_{step:010d}").rglob("manifest.json"))
    assert_loads(run, 1)


def test_saves_after_failed_ones_commit(job: Records) -> None:
    run, ranks = job
    assert all(res["1"] == {"error": None} and res["6"] == {"error": None} for res in ranks)
    assert_loads(run, 6)
    assert ckptd.open_run(str(run)).verify(6) == []


def test_a_preemption_signal_to_one_rank_checkpoints_the_same_step_on_all(job: Records) -> None:
    run, ranks = job
    saved = [res["preempt_saved"] for res in ranks]
    assert len(saved[0]) == 1 and all(s == saved[0] for s in saved), saved
    assert saved[0][0] in ckptd.open_run(str(run)).steps()
    assert_loads(run, saved[0][0])


def test_a_rank_sigkilled_mid_write_fails_the_save_on_the_others(job: Records) -> None:
    run, ranks = job
    for res in ranks:
        if res["rank"] == KILLED_RANK:
            assert str(KILL_STEP) not in res  # it died inside the save
            continue
        got = res[str(KILL_STEP)]
        assert got["error"] in ("CheckpointError", "CoordinationTimeout"), got
        assert got["after_s"] < res["commit_timeout_s"] + SLACK_S, got
    r = ckptd.open_run(str(run))
    assert KILL_STEP not in r.steps() and r.steps()[-1] < KILL_STEP
    assert not list((run / f"step_{KILL_STEP:010d}").rglob("manifest.json"))
    assert_loads(run, r.steps()[-1])
