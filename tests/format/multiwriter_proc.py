"""One writer process of tests/format/test_multiwriter.py.

Reads a JSON job on stdin, writes this rank's box of every array into the checkpoint
store with ``CheckpointWriter``, and prints its report (``report_to_json``) on stdout.
Run as ``python -P multiwriter_proc.py`` so the installed ckptd is imported.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from ckptd.format import CheckpointWriter, ShardBox
from ckptd.format.writer import report_to_json
from ckptd.storage import open_store


def full_array(shape: list[int], dtype: str, seed: int) -> torch.Tensor:
    """The global array every process derives identically from its seed (random bits)."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dt).element_size()
    return torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g).view(dt).reshape(shape)


def main() -> None:
    job = json.load(sys.stdin)
    rank = job["rank"]
    store = open_store(job["uri"], job.get("storage_options"))
    writer = CheckpointWriter(store, rank=rank, chunk_bytes=job["chunk_bytes"], threads=2)
    for a in job["arrays"]:
        boxes = [ShardBox(tuple(b["offset"]), tuple(b["shape"])) for b in a["boxes"]]
        if rank >= len(boxes):
            continue  # fewer writers than ranks (replicated arrays: the lowest rank writes)
        box = boxes[rank]
        full = full_array(a["shape"], a["dtype"], a["seed"])
        writer.add(a["path"], full[box.slices()].clone(), shape=a["shape"], box=box, boxes=boxes)
    json.dump(report_to_json(writer.finish()), sys.stdout)


if __name__ == "__main__":
    main()
