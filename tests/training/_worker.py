"""One rank of a multi-process test run (spawned by ``launch`` in conftest.py; not a test module).

Usage: python _worker.py RANK WORLD STORE_PORT JOBS_JSON OUT_DIR

Runs every job of JOBS_JSON in order on the same gloo world. A job trains a layout for a few
steps from the canonical initial state, or from the canonical state another job left (its
shards are read back from OUT_DIR, assembled and loaded through the adapter: an in-memory
checkpoint round trip between two layouts). Each rank saves its losses and canonical shards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ckptd.format.boxes import ShardBox
from ckptd.format.layout import TensorLayout
from ckptd.training.adapter import CanonicalSpec, CanonicalTensor, assemble_canonical, read_boxes
from ckptd.training.mesh import ParallelContext
from ckptd.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _configs import train_config


def load_parts(job_dir: Path) -> list[dict[str, CanonicalTensor]]:
    parts = []
    for f in sorted(job_dir.glob("rank*.pt")):
        saved = torch.load(f, weights_only=True)["canonical"]
        part = {}
        for path, e in saved.items():
            spec = CanonicalSpec(
                path=path,
                shape=tuple(e["shape"]),
                dtype=e["data"].dtype,
                layout=TensorLayout(),
                box=ShardBox(tuple(e["offset"]), tuple(e["box"])),
                writer=e["writer"],
            )
            part[path] = CanonicalTensor(spec, e["data"])
        parts.append(part)
    return parts


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    jobs, out = json.loads(sys.argv[4]), Path(sys.argv[5])
    store = dist.TCPStore("127.0.0.1", port, None, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    for job in jobs:
        cfg = train_config(job)
        ctx = ParallelContext.build(
            tp=cfg.parallel.tp, pp=cfg.parallel.pp, tied_embeddings=cfg.model.tie_embeddings
        )
        trainer = Trainer(cfg, ctx)
        if job.get("load_from"):
            full = assemble_canonical(load_parts(out / job["load_from"]))
            trainer.adapter.from_canonical(read_boxes(full, trainer.adapter.specs()))
            trainer.step = int(full["optim/step"])
        else:
            trainer.init_weights()
        losses = [trainer.train_step().loss for _ in range(job["steps"])]
        canonical = {
            path: {
                "offset": list(ct.spec.box.offset),
                "box": list(ct.spec.box.shape),
                "shape": list(ct.spec.shape),
                "writer": ct.spec.writer,
                "data": ct.data.detach().cpu().clone(),
            }
            for path, ct in trainer.adapter.to_canonical().items()
        }
        (out / job["name"]).mkdir(parents=True, exist_ok=True)
        saved = {"losses": losses, "canonical": canonical, "param_bytes_peak": trainer.optimizer.meter.peak}
        torch.save(saved, out / job["name"] / f"rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
