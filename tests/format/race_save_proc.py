"""A writer process for the same-step race: waits at a barrier file, then saves step N of a run root
with tensors filled with its own id. Prints one JSON line per trial: committed or exists."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import ckptd
from ckptd.format.errors import CheckpointExistsError


def main() -> None:
    uri, me, trials, sync_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    opts = json.loads(os.environ.get("CKPTD_TEST_STORAGE_OPTIONS", "null"))
    for step in range(1, trials + 1):
        # both writers start the same trial together (a restarted job overlapping its zombie)
        open(f"{sync_dir}/ready-{step}-{me}", "w").close()
        while not all(os.path.exists(f"{sync_dir}/ready-{step}-{w}") for w in (0, 1)):
            time.sleep(0.001)
        state = {"a": torch.full((64, 32), float(me)), "b": torch.full((3000,), float(me)), "who": me}
        try:
            ckptd.save(state, uri, step=step, chunk_bytes=4096, storage_options=opts)
            print(json.dumps({"step": step, "me": me, "result": "committed"}), flush=True)
        except CheckpointExistsError:
            print(json.dumps({"step": step, "me": me, "result": "exists"}), flush=True)


if __name__ == "__main__":
    main()
