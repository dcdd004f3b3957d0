"""The traced process of tests/format/test_crash_states.py: one multi-array ``ckptd.save``.

Run as ``python -P traced_save_proc.py RUN_ROOT STEP SEED [--no-fsync]`` under ``strace``.
``--no-fsync`` turns ``os.fsync``/``os.fdatasync`` into no-ops first: the negative control that
shows the crash-state checker notices a save that never makes anything durable.
"""

from __future__ import annotations

import os
import sys

import torch

import ckptd


def make_state(seed: int) -> dict[str, object]:
    """Several arrays of several dtypes and sizes, some over the eager-fsync size (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed": torch.randn(384, 768, generator=g),  # 1.1 MiB: fsync'd by its writer thread
            "blocks": [
                {"w": torch.randn(64, 96, generator=g).bfloat16(), "b": torch.randn(96, generator=g)}
                for _ in range(2)
            ],
        },
        "optim": {"exp_avg": torch.randn(50, 70, generator=g).double(), "step": torch.tensor(seed)},
        "rng": torch.randint(0, 2**62, (16,), generator=g),
        "meta": {"seed": seed},
    }


def main() -> None:
    root, step, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if "--no-fsync" in sys.argv[4:]:
        os.fsync = os.fdatasync = lambda fd: None
    ckptd.save(make_state(seed), root, step=step, chunk_bytes=64 * 1024, threads=2)


if __name__ == "__main__":
    main()
