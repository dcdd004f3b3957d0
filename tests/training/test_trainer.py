"""The trainer as a user meets it: learning, data, configuration errors, and ``ckptd train``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.cli import train as train_cli
from ckptd.training import trainer as trainer_mod
from ckptd.training.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig
from ckptd.training.data import TokenSource
from ckptd.training.mesh import ParallelContext
from ckptd.training.trainer import TrainConfig, Trainer


def test_loss_clearly_falls_on_the_synthetic_corpus() -> None:
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=128, n_layers=2, d_model=64, n_heads=4, max_seq_len=32),
        data=DataConfig(seq_len=32, global_batch=16, micro_batch=8),
        optim=OptimConfig(lr=3e-3),
        dtype="fp32",
    )
    trainer = Trainer(cfg, ParallelContext())
    trainer.init_weights()
    losses = [trainer.train_step().loss for _ in range(40)]
    assert losses[0] == pytest.approx(torch.log(torch.tensor(128.0)).item(), abs=0.3)  # chance level
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_token_stream_does_not_depend_on_the_layout() -> None:
    cfg = DataConfig(seq_len=16, global_batch=8, micro_batch=2, seed=3)
    src = TokenSource(cfg, 101)
    whole = torch.cat([x for x, _ in src.micro_batches(5, dp=1, dp_rank=0)])
    for dp in (2, 4):
        split = torch.cat([x for r in range(dp) for x, _ in src.micro_batches(5, dp=dp, dp_rank=r)])
        assert torch.equal(split, whole)
    x, y = src.micro_batches(5, dp=1, dp_rank=0)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(whole, torch.cat([x for x, _ in src.micro_batches(6, dp=1, dp_rank=0)]))
    assert int(whole.max()) < 101


def test_text_file_is_read_as_bytes(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"hello checkpoint world " * 20)
    src = TokenSource(DataConfig(seq_len=8, text_file=str(text)), 256)
    sample = src.sample(0)
    assert bytes(sample.tolist()) in text.read_bytes()
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        TokenSource(DataConfig(seq_len=8, text_file=str(text)), 128)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ckptd")
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


@pytest.mark.parametrize(
    ("argv", "advice"),
    [
        (
            ["--nproc", "4", "--tp", "4", "--", "--heads", "6", "--width", "96"],
            "--tp 4 does not divide n_heads = 6",
        ),
        (["--nproc", "8", "--pp", "8", "--", "--layers", "4"], "use --pp 4 or fewer"),
        (["--nproc", "6", "--tp", "4"], "launch a multiple of 4 processes"),
        (["--nproc", "4", "--tp", "2", "--", "--global-batch", "6"], "multiple of dp * micro_batch"),
    ],
    ids=["tp-vs-heads", "pp-vs-layers", "world-size", "batch"],
)
def test_bad_configuration_fails_before_launch_with_advice(
    argv: list[str], advice: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["train", *argv]) == 2
    assert advice in capsys.readouterr().err


def test_trainer_module_rejects_bad_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert trainer_mod.main(["--pp", "5", "--layers", "4"]) == 2
    assert "more pipeline stages than the model has layers" in capsys.readouterr().err


def test_uneven_default_split_gives_extra_layers_to_middle_stages() -> None:
    assert ParallelConfig(pp=4).layers_per_stage(6) == (1, 2, 2, 1)
    assert sum(ParallelConfig(pp=3).layers_per_stage(5)) == 5
    assert ParallelConfig(pp=2, stage_layers=(1, 3)).layers_per_stage(4) == (1, 3)


# slow: torchrun starts cold interpreters (about 40 s here); the trainer's gloo paths are in the fast tier
@pytest.mark.distributed
@pytest.mark.slow
def test_ckptd_train_runs_under_torch_launcher_logs_json_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    cmd = [
        sys.executable, "-P", "-m", "ckptd", "train", "--nproc", "2", "--tp", "2", "--zero", "2",
        "--steps", "3", "--every", "2", "--ckpt", str(tmp_path / "ckpt"), "--log-json", str(log),
        "--", "--width", "32", "--seq-len", "16", "--global-batch", "4", "--layers", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["ckpt_block_ms"] >= 0
    assert "pending" not in proc.stderr
    # every 2 steps, and the last step: both committed, each with the optimizer step it holds
    run = ckptd.open_run(str(tmp_path / "ckpt"))
    assert run.steps() == [2, 3]
    assert int(run.reader(3).read("optim/step")) == 3
    # The same run again, on one process (another layout): it restores step 3 and finds the work done.
    model = cmd[cmd.index("--") + 1 :]
    again = ["--steps", "3", "--ckpt", str(tmp_path / "ckpt"), "--log-json", str(log), *model]
    assert trainer_mod.main(again) == 0
    assert "already at step 3" in capsys.readouterr().err
    assert len(log.read_text().splitlines()) == 3


def test_every_without_a_checkpoint_location_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["train", "--every", "5"]) == 2
    assert "--every 5 needs --ckpt URI" in capsys.readouterr().err
