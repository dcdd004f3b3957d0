"""Scale simulation: ckptd's real planning, report, commit, metadata and restore-plan code for a
GPT-175B-like state at R = 8 ... 4,096 ranks (and a limit check at 131,072), in one process.

No tensor data moves; everything a rank computes, sends or reads *about* a checkpoint does:

* per-rank planning: ``cached_plan`` + the shard cells and tally a writer computes for each box
  it owns (``CheckpointWriter`` does exactly this), for a sample rank, first save (plan cache
  cleared) and second save (cached);
* report: what every rank sends to rank 0 (its counters; lead writers also their arrays'
  descriptions, ``coordination.encode_leads``). For R <= 512 the tally is summed over every
  rank's real planning; at larger R it is the storage plan's expected tally (the same numbers
  when every rank reports);
* rank-0 commit: ``parse_leads`` + ``merge_leads`` + ``check_tally`` + ``publish`` (Zarr
  metadata, table pages, state tree, the commit record created exclusively) into a local
  directory — CPU time (``process_time``, all threads) and peak extra Python memory;
* restore: a sample rank opens the checkpoint with ``Run.manifest``, touches only its arrays
  (pages load lazily), reads its rank-state chunk (its row of the rank-state array) and plans
  its reads (its boxes and the
  shard keys overlapping them): bytes of metadata read and CPU time;
* requests: PUT-class objects a save writes, and the lower bounds they imply at 3,500 PUT/s and
  5,500 GET/s per S3 prefix, for one prefix and spread over the arrays' prefixes.

Run: ``python benchmarks/scale_sim.py [--ranks 8,64,512,4096] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import write_results
from ckptd.engine.coordination import encode_leads, merge_leads, parse_leads
from ckptd.format import plan as plan_mod
from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping
from ckptd.format.codecs import CodecSpec
from ckptd.format.commit import check_tally, publish
from ckptd.format.dtypes import logical_dtype
from ckptd.format.layout import TensorLayout, mesh_coords
from ckptd.format.manifest import ArrayRecord, Totals
from ckptd.format.plan import DEFAULT_CHUNK_BYTES, cached_plan
from ckptd.format.rank_array import encode_rank_chunk, rank_array_document, rank_array_key, rank_chunk_key
from ckptd.format.run import Run
from ckptd.format.tally import Tally, expected_tally, shard_fingerprint
from ckptd.format.writer import ArrayReport, CheckpointWriter, shard_key
from ckptd.storage import LocalStore

H, FFN, VOCAB, VOCAB_PADDED, SEQ, LAYERS = 12288, 49152, 50257, 50304, 2048, 96
PUT_PER_S, GET_PER_S = 3500, 5500
FP32 = logical_dtype("float32")


@dataclass(frozen=True)
class Tensor:
    path: str
    shape: tuple[int, ...]
    stage: int
    split: int | None  # the dim tensor parallelism splits (None: replicated over tp)
    padded: int | None = None


def model(pp: int) -> list[Tensor]:
    """Canonical parameters: 96 layers x 12 tensors + 4 = 1,156 (x3 with both Adam moments)."""
    per = LAYERS // pp
    out = [Tensor("wte.weight", (VOCAB, H), 0, 0, VOCAB_PADDED), Tensor("wpe.weight", (SEQ, H), 0, None)]
    for i in range(LAYERS):
        s, p = i // per, f"layers.{i}."
        out += [
            Tensor(p + "ln1.weight", (H,), s, None),
            Tensor(p + "ln1.bias", (H,), s, None),
            Tensor(p + "attn.q.weight", (H, H), s, 0),
            Tensor(p + "attn.k.weight", (H, H), s, 0),
            Tensor(p + "attn.v.weight", (H, H), s, 0),
            Tensor(p + "attn.proj.weight", (H, H), s, 1),
            Tensor(p + "attn.proj.bias", (H,), s, None),
            Tensor(p + "ln2.weight", (H,), s, None),
            Tensor(p + "ln2.bias", (H,), s, None),
            Tensor(p + "mlp.fc.weight", (FFN, H), s, 0),
            Tensor(p + "mlp.fc.bias", (FFN,), s, 0),
            Tensor(p + "mlp.proj.weight", (H, FFN), s, 1),
        ]
    out += [Tensor("ln_f.weight", (H,), pp - 1, None), Tensor("ln_f.bias", (H,), pp - 1, None)]
    return out


def layout(t: Tensor, *, sharded_over_dp: bool) -> TensorLayout:
    """Megatron TP split; ZeRO shards over dp along dim 0 (inside the TP block when TP splits dim 0)."""
    parts: list[tuple[str, ...]] = [() for _ in t.shape]
    replicated: list[str] = []
    if t.split is not None:
        parts[t.split] = ("tp",)
    else:
        replicated.append("tp")
    if sharded_over_dp:
        parts[0] = (*parts[0], "dp")
    else:
        replicated.append("dp")
    padded = ((0, t.padded),) if t.padded else ()
    return TensorLayout(partition=tuple(parts), replicated=tuple(replicated), padded=padded)


@dataclass
class Job:
    R: int
    zero: int
    mesh: dict[str, int]
    arrays: list[tuple[str, Tensor, TensorLayout]]

    @staticmethod
    def make(R: int, zero: int) -> Job:
        tp = 8
        pp = min(16, R // tp)
        dp = R // (tp * pp)
        mesh = {"pp": pp, "dp": dp, "tp": tp}
        arrays = []
        for t in model(pp):
            arrays.append((f"model/{t.path}", t, layout(t, sharded_over_dp=zero >= 3)))
            for kind in ("exp_avg", "exp_avg_sq"):
                arrays.append((f"optim/{kind}/{t.path}", t, layout(t, sharded_over_dp=zero >= 1)))
        return Job(R, zero, mesh, arrays)

    def coords(self, rank: int) -> dict[str, int]:
        return mesh_coords(self.mesh, rank, order=("pp", "dp", "tp"))


def plan_rank(job: Job, rank: int) -> tuple[Tally, dict[str, ArrayRecord], int]:
    """What rank ``rank``'s writer computes per save: plans, the shards it writes, its tally and
    (for arrays whose first box it owns) the array descriptions. Returns (tally, leads, arrays)."""
    c = job.coords(rank)
    tally = Tally()
    leads: dict[str, ArrayRecord] = {}
    mine = 0
    for path, t, lay in job.arrays:
        if t.stage != c["pp"] or not lay.is_writer(job.mesh, c):
            continue
        mine += 1
        box = lay.box_for(t.shape, job.mesh, c)
        plan = cached_plan(t.shape, 4, box, DEFAULT_CHUNK_BYTES, layout=lay, mesh=job.mesh)
        if box.is_empty() and plan.kind == "pieces":
            continue
        part = plan.part_for(box)
        for coords in CheckpointWriter._shards_of(plan, part, box):
            n = math.prod(cell_box(coords, part.grid, part.shape).shape) * 4
            tally += Tally(1, shard_fingerprint(path, part.index, coords), n, n)
        if not any(box.offset) and not box.is_empty():
            rep = ArrayReport(FP32, t.shape, plan.kind, CodecSpec(), lay, plan=plan, lead=True)
            leads[path] = rep.record(path)
    return tally, leads, mine


def lead_ranks(job: Job) -> list[int]:
    """Ranks owning some array's first box: tp = dp = 0 of every pipeline stage."""
    return [r for r in range(job.R) if job.coords(r)["tp"] == 0 and job.coords(r)["dp"] == 0]


def state_tree(job: Job) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, _, _ in job.arrays:
        *dirs, leaf = path.split("/")
        node = tree
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = {"$ckptd": "tensor", "path": path}
    tree["step"] = 1000
    return tree


def rng_state() -> dict[str, Any]:
    """The size of a real rank's RNG state (python + numpy + torch CPU), as the engine saves it."""
    from ckptd.engine import rng

    return {"rng": rng.capture()}


def simulate(R: int, zero: int, workdir: Path, *, full_tally: bool) -> dict[str, Any]:
    job = Job.make(R, zero)
    out: dict[str, Any] = {
        "bench": "scale_sim",
        "R": R,
        "zero": zero,
        "mesh": job.mesh,
        "arrays": len(job.arrays),
    }
    sample = [0, R - 1]
    # ---- per-rank planning, first save (cold cache) and second save
    firsts, seconds = [], []
    for r in sample:
        plan_mod._plans.clear()
        t0 = time.process_time()
        plan_rank(job, r)
        firsts.append(time.process_time() - t0)
        t0 = time.process_time()
        plan_rank(job, r)
        seconds.append(time.process_time() - t0)
    out["plan_first_s"] = max(firsts)
    out["plan_cached_s"] = max(seconds)
    # ---- reports: every rank's counters; lead ranks' descriptions
    if full_tally:
        total = Tally()
        for r in range(R):
            total += plan_rank(job, r)[0]
        out["tally"] = "summed over every rank"
    else:
        total = None
        out["tally"] = "expected from the plan (every rank reporting)"
    lead_docs = [encode_leads(plan_rank(job, r)[1]) for r in lead_ranks(job)]
    out["report_bytes_total"] = sum(len(d) for d in lead_docs) + 7 * 8 * R
    out["report_bytes_max_rank"] = max(len(d) for d in lead_docs)
    # ---- rank-0 commit
    root = workdir / f"R{R}-z{zero}"
    run = Run(LocalStore(root, fsync=False))
    attempt = "a-" + f"{R:08x}{zero:08x}"

    def commit(step: int) -> Any:
        arrays = merge_leads([parse_leads(d.encode()) for d in lead_docs])
        want = expected_tally(arrays.values())
        nbytes = sum(a.nbytes for a in arrays.values())
        got = total if total is not None else Tally(want.shards, want.fingerprint, nbytes, nbytes)
        check_tally(arrays, got)
        publish(
            run.checkpoint_store(step),
            step=step,
            attempt=attempt,
            arrays=arrays,
            state=state_tree(job),
            world_size=R,
            mesh=job.mesh,
            metadata={"metrics": {"loss": 1.5}},
            totals=Totals(len(arrays), got.shards, got.nbytes, got.stored_bytes, R),
            rank_state="array",
            documented=arrays.keys(),
        )
        return got, arrays

    gc.collect()
    t0 = time.process_time()
    got, arrays_committed = commit(1000)
    out["commit_cpu_s"] = time.process_time() - t0
    tracemalloc.start()  # a second commit, measured for memory only (tracing slows Python down)
    commit(1001)
    out["commit_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    step_dir = root / "step_0000001000"
    record = step_dir / "manifest.json"
    meta = step_dir / f"{attempt}.meta"
    out["record_bytes"] = record.stat().st_size
    out["state_bytes"] = (meta / "state.json").stat().st_size
    pages = sorted((meta / "tables").iterdir())
    out["table_pages"] = len(pages)
    out["max_page_bytes"] = max(p.stat().st_size for p in pages)
    zarr_docs = sum(1 for _ in (step_dir / attempt).rglob("zarr.json"))  # groups (arrays: lead writers)
    # ---- restore on sample ranks (same layout): metadata bytes read, restore plan time
    rank_obj = b"".join(encode_rank_chunk(attempt, 0, rng_state()))
    (step_dir / rank_array_key(attempt, "zarr.json")).parent.mkdir(parents=True, exist_ok=True)
    (step_dir / rank_array_key(attempt, "zarr.json")).write_bytes(rank_array_document(R))
    reads, plans = [], []
    for r in sample:
        chunk = step_dir / rank_chunk_key(attempt, r)
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(b"".join(encode_rank_chunk(attempt, r, rng_state())))
        t0 = time.process_time()
        mm = Run(LocalStore(root, fsync=False)).manifest(1000)
        c = job.coords(r)
        keys = 0
        for path, t, lay in job.arrays:
            if t.stage != c["pp"]:
                continue
            a = mm.arrays[path]
            box = lay.box_for(t.shape, job.mesh, c)
            for i, part in enumerate(a.parts):
                want_box = box.intersect(ShardBox(part.offset, part.shape))
                if want_box is None:
                    continue
                for coords in cells_overlapping(want_box, part.grid):
                    shard_key(a.part_key(i), coords)
                    keys += 1
        rank_doc = Run(LocalStore(root, fsync=False)).rank_state(1000, r, mm)
        plans.append(time.process_time() - t0)
        assert rank_doc is not None
        loaded = getattr(mm.arrays, "loaded_bytes", 0)
        reads.append(out["record_bytes"] + out["state_bytes"] + loaded + len(rank_obj))
        out.setdefault("restore_shard_reads", []).append(keys)
    out["restore_metadata_bytes"] = max(reads)
    out["restore_metadata_bytes_excl_state"] = max(reads) - out["state_bytes"]
    out["restore_plan_s"] = max(plans)
    # ---- requests
    # PUTs: shards (the data arrays' and one rank-state chunk per rank), group zarr.json, pages,
    # state, lease, record; array zarr.json by leads, and the rank-state array's by rank 0
    shards = got.shards + R
    puts = shards + zarr_docs + len(pages) + 3 + len(arrays_committed) + 1
    per_array = max(R + 1, *(a.shard_count + 1 for a in arrays_committed.values()))
    out.update(
        {
            "shards": shards,
            "rank_state_chunks": R,
            "put_requests": puts,
            "put_overhead_vs_shards": puts - shards,
            "put_floor_one_prefix_s": puts / PUT_PER_S,
            "max_puts_under_one_array_prefix": per_array,
            "put_floor_per_array_prefix_s": per_array / PUT_PER_S,
            "get_requests_restore": R * (3 + out["table_pages"]) + 2 * got.shards,
        }
    )
    out["get_floor_one_prefix_s"] = out["get_requests_restore"] / GET_PER_S
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="8,64,512,4096")
    ap.add_argument("--zero", default="1,3")
    ap.add_argument("--limit-ranks", type=int, default=131072, help="record sizes at this R (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in [int(z) for z in args.zero.split(",")]:
            for R in [int(r) for r in args.ranks.split(",")]:
                res = simulate(R, zero, Path(tmp), full_tally=R <= 512)
                print(json.dumps(res), flush=True)
                results.append(res)
        if args.limit_ranks:
            res = simulate(args.limit_ranks, 1, Path(tmp), full_tally=False)
            res["bench"] = "scale_sim_limit"
            print(json.dumps(res), flush=True)
            results.append(res)
    out = write_results("scale-sim", args.out, vars(args), results)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
