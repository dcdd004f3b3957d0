"""A training loop whose every tensor equals the step number, saved by ckptd every step.

``python -P save_loop.py RUN_DIR MAX_STEPS EVERY [MIB]``; prints ``step N`` after each step
boundary. Parameters move through an SGD optimizer (the lazy, hook-guarded copy path),
a buffer is written directly (the synchronous path). Used by the SIGKILL, SIGTERM/SIGUSR1
and resident-memory tests.
"""

from __future__ import annotations

import os
import sys

import torch

import ckptd


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    run_dir, max_steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mib = float(sys.argv[4]) if len(sys.argv) > 4 else 4.0
    wait_each = len(sys.argv) > 5 and sys.argv[5] == "wait"  # every save reaches disk (no skipping)
    n = max(1, int(mib * 2**20 / 4 / 8))
    params = [torch.nn.Parameter(torch.zeros(n)) for _ in range(8)]
    opt = torch.optim.SGD(params, lr=1.0)
    counter = torch.zeros(1000)
    state = {"params": {str(i): p for i, p in enumerate(params)}, "optim": opt, "counter": counter,
             "meta": {"step": 0}}
    with ckptd.Checkpointer(run_dir, state=state, every=every, keep_last=3) as ck:
        start = ck.restore()
        print(f"start {start}", flush=True)
        for step in range(start, max_steps):
            for p in params:
                p.grad = torch.full_like(p, -1.0)
            opt.step()  # params become step + 1
            counter.fill_(step + 1)
            state["meta"]["step"] = step + 1
            ck.step(step + 1)
            if wait_each:
                ck.wait()
            print(f"step {step + 1} rss {rss_bytes()}", flush=True)
        ck.wait()
        print(f"done rss {rss_bytes()} persisted {sum(f.persisted for f in ck.flushers)}", flush=True)


if __name__ == "__main__":
    main()
