"""``make demo``: save, inspect, verify, corrupt-and-detect and load a checkpoint, end to end.

Uses the public API and the CLI exactly as a user would; writes under ./demo-run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

import ckptd
from ckptd.cli.main import main as cli


def banner(text: str) -> None:
    print(f"\n=== {text}")


def run() -> int:
    root = Path("demo-run").absolute()
    shutil.rmtree(root, ignore_errors=True)
    model = train_and_save(root)

    banner("ckptd ls")
    cli(["ls", str(root)])
    banner("ckptd inspect (latest)")
    cli(["inspect", str(root)])
    banner("ckptd verify --all")
    rc = cli(["verify", "--all", "--quiet", str(root)])
    assert rc == 0

    banner("load step 20 into a fresh model")
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    target = {"model": fresh, "optim": fresh_opt}
    step = ckptd.load(target, str(root), step=20)
    print(
        f"loaded step {step}: step counter {target['step']}, loss {target['loss']:.4f}, "
        f"optimizer state for {len(fresh_opt.state)} parameters"
    )
    latest = {"model": fresh}
    ckptd.load(latest, str(root))
    same = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    print(f"loaded latest: parameters identical to the trained model: {same}")
    assert same

    corrupt_and_detect(root, fresh)
    train_demo(root.parent / "demo-run-gpt")
    print(f"\ndemo done; checkpoints are in {root} and {root.parent / 'demo-run-gpt'}")
    return 0


def train_and_save(root: Path) -> torch.nn.Module:
    """30 steps of a small MLP, a checkpoint (with a bf16 copy of a weight) every 10."""
    torch.manual_seed(0)
    first = torch.nn.Linear(256, 1024)
    model = torch.nn.Sequential(first, torch.nn.GELU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, 31):
        x = torch.randn(32, 256)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            state = {
                "model": model,
                "optim": opt,
                "step": step,
                "loss": loss.item(),
                "bf16_copy": first.weight.detach().bfloat16(),
            }
            ckptd.save(state, str(root), step=step, metadata={"metrics": {"loss": loss.item()}})
            print(f"step {step}: loss {loss.item():.4f} -> saved checkpoint")
    return model


def corrupt_and_detect(root: Path, fresh: torch.nn.Module) -> None:
    """Flip one byte of a shard: verify and load both notice, and older steps still load."""
    banner("flip one byte in a shard of step 30, then verify")
    attempt = ckptd.open_run(str(root)).manifest(30).attempt  # the data of the attempt that committed
    shard = root / "step_0000000030" / attempt / "model" / "0.weight" / "c.0.0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc = cli(["verify", "--quiet", str(root)])
    print(f"ckptd verify exit code: {rc} (non-zero: corruption detected)")
    assert rc != 0
    try:
        ckptd.load({"model": fresh}, str(root), step=30)
    except ckptd.IntegrityError as e:
        print(f"loading step 30 raises IntegrityError: {e}")
    step = ckptd.load({"model": fresh}, str(root), step=20)
    print(f"step 20 still loads fine: {step}")


def train_demo(ckpt: Path) -> None:
    """The bundled trainer end to end: train with tp2, then resume the same run at tp1 (resharded)."""
    shutil.rmtree(ckpt, ignore_errors=True)
    model = ["--", "--layers", "2", "--width", "64", "--heads", "4", "--seq-len", "32", "--global-batch", "8"]
    banner("ckptd train --nproc 2 --tp 2: 6 steps, a checkpoint every 3")
    _train(["--nproc", "2", "--tp", "2", "--steps", "6", "--every", "3", "--ckpt", str(ckpt), *model])
    cli(["ls", str(ckpt)])
    banner("resume the same run on one process (tp1): each rank reads its new boxes, to step 9")
    _train(["--nproc", "1", "--steps", "9", "--every", "3", "--ckpt", str(ckpt), *model])
    cli(["ls", str(ckpt)])


def _train(args: list[str]) -> None:
    import subprocess

    # -P: the source checkout must not shadow the installed package in the ranks.
    out = subprocess.run(
        [sys.executable, "-P", "-m", "ckptd", "train", *args], text=True, capture_output=True
    )
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith(("step", "ckptd"))))
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"ckptd train failed with status {out.returncode}")


if __name__ == "__main__":
    sys.exit(run())
