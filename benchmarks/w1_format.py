"""W1 save throughput: ckptd.save against the storage limit and the usual tools, in one run.

Local disk: raw sequential fsync'd write of the same bytes (the limit), ckptd.save,
torch.save (+fsync), torch.distributed.checkpoint.save. Loads too.
S3 (moto server on loopback): a plain s3fs put of the same bytes vs ckptd.save.
Runs are interleaved and repeated; medians reported. JSON lines on stdout; the
result file under benchmarks/results/ records the machine.

    python benchmarks/w1_format.py [--scale 1.0] [--repeats 5] [--s3-scale 0.25]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe
from w1_state import nbytes, w1_state

import ckptd


def flat_bytes(state: dict[str, dict[str, torch.Tensor]]) -> list[memoryview]:
    return [memoryview(t.contiguous().view(torch.uint8).numpy()) for g in state.values() for t in g.values()]


def raw_write(path: str, bufs: list[memoryview]) -> None:
    with open(path, "wb") as f:
        for b in bufs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())


def torch_save(path: str, state: Any) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def drop_caches() -> None:
    # Reads after writes would come from the page cache; this makes load numbers honest where allowed.
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(fn: Callable[[], Any]) -> float:
    # Start every measurement with no dirty pages and (where allowed) an empty page cache:
    # otherwise a write pays for the writeback of whatever ran before it (the kernel throttles
    # writers above the dirty limit), and its position in the sequence decides its speed.
    drop_caches()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def local_bench(state: dict[str, dict[str, torch.Tensor]], repeats: int, root: str) -> list[dict[str, Any]]:
    import torch.distributed.checkpoint as dcp

    total = nbytes(state)
    bufs = flat_bytes(state)
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "raw_fsync_write",
            "ckptd_save",
            "torch_save",
            "dcp_save",
            "ckptd_load",
            "torch_load",
            "dcp_load",
        )
    }
    warm = Path(root) / "warm"  # one unmeasured save of each kind: imports, thread pools, first-touch pages
    warm.mkdir()
    ckptd.save(state, str(warm / "ckptd"), step=1)
    torch_save(str(warm / "torch.pt"), state)
    dcp.save(state, checkpoint_id=str(warm / "dcp"))
    shutil.rmtree(warm)
    for r in range(repeats):
        d = Path(root) / f"r{r}"
        d.mkdir()
        times["raw_fsync_write"].append(timed(lambda: raw_write(str(d / "raw.bin"), bufs)))
        times["ckptd_save"].append(timed(lambda: ckptd.save(state, str(d / "ckptd"), step=1)))
        times["torch_save"].append(timed(lambda: torch_save(str(d / "torch.pt"), state)))
        times["dcp_save"].append(timed(lambda: dcp.save(state, checkpoint_id=str(d / "dcp"))))
        target = {g: {k: torch.empty_like(t) for k, t in grp.items()} for g, grp in state.items()}
        drop_caches()
        times["ckptd_load"].append(timed(lambda: ckptd.load(target, str(d / "ckptd"))))
        assert torch.equal(target["model"]["wte.weight"], state["model"]["wte.weight"])
        drop_caches()
        times["torch_load"].append(timed(lambda: torch.load(str(d / "torch.pt"), weights_only=True)))
        drop_caches()
        times["dcp_load"].append(timed(lambda: dcp.load(target, checkpoint_id=str(d / "dcp"))))
        shutil.rmtree(d)
    base = statistics.median(times["raw_fsync_write"])
    rows = []
    for k, v in times.items():
        med = statistics.median(v)
        rows.append(
            {
                "bench": "w1_local",
                "what": k,
                "bytes": total,
                "median_s": round(med, 4),
                "GBps": round(total / med / 1e9, 3),
                "throughput_vs_raw_write": round(base / med, 3),
                "runs_s": [round(x, 4) for x in v],
            }
        )
    return rows


def s3_bench(state: dict[str, dict[str, torch.Tensor]], repeats: int) -> list[dict[str, Any]]:
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    opts = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    total = nbytes(state)
    blob = b"".join(bytes(b) for b in flat_bytes(state))
    # A fair plain-s3fs baseline writes the same tensors as separate objects, concurrently (pipe of a dict).
    objects = {
        f"bench/plain/{g}/{k}": bytes(memoryview(t.contiguous().view(torch.uint8).numpy()))
        for g, grp in state.items()
        for k, t in grp.items()
    }
    times: dict[str, list[float]] = {
        "s3fs_put_one_object": [],
        "s3fs_put_per_tensor": [],
        "ckptd_save": [],
        "ckptd_load": [],
    }
    try:
        for r in range(repeats):
            times["s3fs_put_one_object"].append(timed(lambda: fs.pipe_file("bench/raw.bin", blob)))
            times["s3fs_put_per_tensor"].append(timed(lambda: fs.pipe(objects)))
            url = f"s3://bench/ckptd{r}"
            times["ckptd_save"].append(timed(lambda: ckptd.save(state, url, step=1, storage_options=opts)))
            target: dict[str, Any] = {}
            times["ckptd_load"].append(timed(lambda: ckptd.load(target, url, storage_options=opts)))
            fs.rm(f"bench/ckptd{r}", recursive=True)
            fs.rm("bench/plain", recursive=True)
    finally:
        server.stop()
    base = statistics.median(times["s3fs_put_one_object"])
    return [
        {
            "bench": "w1_s3_moto",
            "what": k,
            "bytes": total,
            "median_s": round(statistics.median(v), 4),
            "GBps": round(total / statistics.median(v) / 1e9, 3),
            "throughput_vs_s3fs_put": round(base / statistics.median(v), 3),
            "runs_s": [round(x, 4) for x in v],
        }
        for k, v in times.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--s3-scale", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    state = w1_state(args.scale)
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPTD_BENCH_DIR")) as root:
        for row in local_bench(state, args.repeats, root):
            print(json.dumps(row), flush=True)
            rows.append(row)
    del state
    if not args.skip_s3:
        for row in s3_bench(w1_state(args.s3_scale), args.repeats):
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = args.out or f"benchmarks/results/w1-format-{describe()['hostname']}.json"
    Path(out).write_text(json.dumps({"machine": describe(), "args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
