"""Interleaved 1F1B checkpointed end to end with ``ckptd train``: crash, resume, reshard.

* pp2·vpp2 (4 layers, model chunks 0 and 2 on rank 0, 1 and 3 on rank 1): a job killed with
  SIGKILL after a committed checkpoint and resumed reproduces an uninterrupted job bit for bit
  (every loss, every tensor of the final checkpoint). The checkpoints' layouts record vpp and
  each tensor's model chunk.
* The pp2·vpp2 checkpoint of step 3 continues at pp4·vpp1 (4 ranks, one layer each): next-step
  losses and the final weights and moments within 1e-5 of an uninterrupted single process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_checkpointing as tc
from test_checkpointing import MODEL, checkpoint, committed, crash, finish, losses, wait_until

import ckptd

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # about 150 s per fixture on 2 cores

LAYERS = ["--layers", "4"]
SAVED_AT, UNTIL = 3, 5


def start(nproc: int, pp: int, vpp: int, *options: str, log: Path) -> subprocess.Popen[str]:
    """``ckptd train`` with trainer-only options (--vpp, --layers) after ``--``."""
    if nproc == 1:
        cmd = [sys.executable, "-P", "-m", "ckptd.training.trainer", "--log-json", str(log), *options]
    else:
        cmd = [sys.executable, "-P", "-m", "ckptd", "train", "--nproc", str(nproc), "--pp", str(pp),
               "--log-json", str(log), *options, "--"]  # fmt: skip
    cmd += [*MODEL, *LAYERS, "--vpp", str(vpp)]
    proc = subprocess.Popen(cmd, cwd=log.parent, env=tc.ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    tc._started.append(proc)  # test_checkpointing's clean-up list
    return proc


@pytest.fixture(scope="module", autouse=True)
def _no_orphans() -> Iterator[None]:
    yield
    for proc in tc._started:
        if proc.poll() is None:
            crash(proc)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("vpp-kill")
    crashed = start(2, 2, 2, "--steps", tc.FOREVER, "--every", "2", "--ckpt", str(tmp / "run"),
                    log=tmp / "crashed.jsonl")  # fmt: skip
    wait_until("a committed checkpoint", crashed, lambda: bool(committed(tmp / "run")))
    first = committed(tmp / "run")[0]
    wait_until("a step past it", crashed, lambda: max(losses(tmp / "crashed.jsonl"), default=0) > first)
    crash(crashed)
    kept = committed(tmp / "run")[-1]
    stop = kept + 2
    out = finish(start(2, 2, 2, "--steps", str(stop), "--ckpt", str(tmp / "straight"),
                       log=tmp / "straight.jsonl"))  # fmt: skip
    finish(start(2, 2, 2, "--steps", str(stop), "--every", "2", "--ckpt", str(tmp / "run"),
                 log=tmp / "resumed.jsonl"))  # fmt: skip
    return {"tmp": tmp, "kept": kept, "stop": stop, "crashed": losses(tmp / "crashed.jsonl"), "out": out}


def test_interleaved_resume_after_kill_is_bit_exact(killed: dict[str, Any]) -> None:
    tmp, kept, stop = killed["tmp"], killed["kept"], killed["stop"]
    assert max(killed["crashed"]) > kept  # the kill lost trained steps
    resumed, straight = losses(tmp / "resumed.jsonl"), losses(tmp / "straight.jsonl")
    assert sorted(resumed) == list(range(kept + 1, stop + 1))
    assert resumed == {s: straight[s] for s in resumed}
    a, b = checkpoint(tmp / "run", stop), checkpoint(tmp / "straight", stop)
    assert a.keys() == b.keys() and any(k.startswith("optim/exp_avg_sq/") for k in a)
    for path, t in b.items():
        assert t.equal(a[path]), path


def test_interleaved_run_logs_its_bubble_and_records_vpp(killed: dict[str, Any]) -> None:
    # pp 2, 4 micro-batches, 2 chunks per rank: (p - 1) / (v * m) = 1/8 of compute.
    assert "pp2 vpp2 ZeRO-1 1f1b, 4 micro-batches: pipeline bubble 12.5% of compute" in killed["out"]
    arrays = ckptd.open_run(str(killed["tmp"] / "straight")).manifest(killed["stop"]).arrays
    for layer, chunk in ((0, 0), (1, 1), (2, 2), (3, 3)):
        layout = arrays[f"model/blocks.{layer}.mlp.fc1.weight"].layout
        assert layout is not None and dict(layout.extra) == {"vpp": 2, "model_chunk": chunk}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("vpp-reshard")
    finish(
        start(1, 1, 1, "--steps", str(UNTIL), "--ckpt", str(tmp / "reference"), log=tmp / "reference.jsonl")
    )
    finish(start(2, 2, 2, "--steps", str(SAVED_AT), "--ckpt", str(tmp / "src"), log=tmp / "src.jsonl"))
    shutil.copytree(tmp / "src", tmp / "pp4")
    finish(start(4, 4, 1, "--steps", str(UNTIL), "--ckpt", str(tmp / "pp4"), log=tmp / "pp4.jsonl"))
    return {"tmp": tmp, **{name: losses(tmp / f"{name}.jsonl") for name in ("reference", "src", "pp4")}}


def test_pp2_vpp2_checkpoint_continues_at_pp4(resharded: dict[str, Any]) -> None:
    ref, got = resharded["reference"], resharded["pp4"]
    assert sorted(resharded["src"]) == [1, 2, 3]
    assert sorted(got) == [4, 5], "must continue right after step 3"
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-5 * abs(ref[step]), (step, loss, ref[step])
    tmp = resharded["tmp"]
    want, have = checkpoint(tmp / "reference", UNTIL), checkpoint(tmp / "pp4", UNTIL)
    assert have.keys() == want.keys()
    for path, t in want.items():
        diff = float((have[path].double() - t.double()).norm() / t.double().norm().clamp_min(1e-30))
        assert diff <= 1e-5, (path, diff)
