"""The victim of tests/format/test_crash_consistency.py: saves one step, to be SIGKILLed mid-way.

Imports everything first, prints ``ready``, then waits for a line on stdin before it
saves, so the parent's randomized kill delay measures time inside the save itself.
Run as ``python -P crash_save_proc.py URI STEP SEED [STORAGE_OPTIONS_JSON]``.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import ckptd


def make_state(seed: int) -> dict[str, object]:
    """A few MB in several arrays of several dtypes (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed": torch.randn(512, 512, generator=g),  # 1 MiB
            "layers": [
                {"w": torch.randn(256, 512, generator=g).bfloat16(), "b": torch.randn(512, generator=g)}
                for _ in range(4)
            ],
            "head": torch.randn(300, 700, generator=g),
        },
        "optim": {"exp_avg": torch.randn(700, 600, generator=g), "step": torch.tensor(seed)},
        "rng": torch.randint(0, 2**62, (64,), generator=g),
        "meta": {"seed": seed, "lr": 1e-3 * seed},
    }


def main() -> None:
    uri, step, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    state = make_state(seed)
    ckptd.open_run(uri, opts).steps()  # import the storage backend (s3fs) and connect before "ready"
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    ckptd.save(state, uri, step=step, storage_options=opts, chunk_bytes=64 * 1024, threads=2)
    print(f"saved {time.perf_counter() - t0:.4f}", flush=True)


if __name__ == "__main__":
    main()
