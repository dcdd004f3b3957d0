"""W3: reshard a W1-sized checkpoint between layouts vs a plain copy of the same bytes.

Writes the W1 state (BENCHMARKS.md) as 8 ranks of tp2·pp2·dp2 would (column/row-parallel
and vocab-parallel boxes, ZeRO-style dp split), then, each in a fresh subprocess so that
peak RSS is the conversion's own: (a) plain copy of the checkpoint directory,
(b) ``ckptd.converters.reshard`` to tp4·pp1·dp2. Reports time ratio and peak RSS.

    python benchmarks/w3_convert.py [--scale 1.0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe
from w1_state import nbytes, w1_state

MESH = {"pp": 2, "dp": 2, "tp": 2}


def layout_for(name: str) -> Any:
    from ckptd.format import TensorLayout

    if "wte" in name:
        return TensorLayout(partition=(("tp", "dp"), ()), replicated=("pp",))
    if name.endswith(("mlp.proj.weight", "attn.proj.weight")):
        return TensorLayout(partition=(("dp",), ("tp",)), replicated=("pp",))
    if name.endswith(".weight") and "ln" not in name and "wpe" not in name:
        return TensorLayout(partition=(("tp", "dp"), ()), replicated=("pp",))
    return TensorLayout(partition=(("dp",), ()), replicated=("tp", "pp"))


def write_source(root: str, scale: float) -> int:
    from ckptd.format import CheckpointWriter, Run, mesh_coords
    from ckptd.storage import open_store

    state = w1_state(scale)
    run = Run(open_store(root))
    store = run.prepare(1)
    reports = []
    skeleton: dict[str, Any] = {}
    for rank in range(8):
        coords = mesh_coords(MESH, rank)
        w = CheckpointWriter(store, rank=rank)
        for group, tensors in state.items():
            for name, t in tensors.items():
                lay = layout_for(name)
                if t.ndim == 1:
                    from ckptd.format import TensorLayout

                    lay = TensorLayout(partition=(("dp",),), replicated=("tp", "pp"))
                if not lay.is_writer(MESH, coords):
                    continue
                box = lay.box_for(t.shape, MESH, coords)
                w.add(
                    f"{group}/{name}",
                    t[box.slices()].contiguous(),
                    shape=t.shape,
                    box=box,
                    layout=lay,
                    mesh=MESH,
                )
                skeleton.setdefault(group, {})[name] = {"$ckptd": "tensor", "path": f"{group}/{name}"}
        reports.append(w.finish())
    run.commit(1, reports, state=skeleton, world_size=8, mesh=MESH)
    return nbytes(state)


def peak_rss_mib() -> float:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries that across exec,
    so a child would report the RSS its parent had when it forked."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, src: str, dst: str) -> None:
    t = time.perf_counter()
    if mode == "copy":
        shutil.copytree(src, dst)
        subprocess.run(["sync"], check=False)
    else:
        from ckptd.converters import reshard
        from ckptd.format import Run
        from ckptd.storage import open_store

        reshard(Run(open_store(src)), Run(open_store(dst)), mesh={"pp": 1, "dp": 2, "tp": 4})
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPTD_BENCH_DIR")) as d:
        total = write_source(f"{d}/src", args.scale)
        times: dict[str, list[dict[str, float]]] = {"plain_copy": [], "reshard_tp2pp2dp2_to_tp4pp1dp2": []}
        for r in range(args.repeats):
            for mode, key in (("copy", "plain_copy"), ("reshard", "reshard_tp2pp2dp2_to_tp4pp1dp2")):
                out = subprocess.run(
                    [sys.executable, "-P", __file__, "--child", mode, f"{d}/src", f"{d}/{mode}{r}"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times[key].append(json.loads(out.stdout.strip().splitlines()[-1]))
                shutil.rmtree(f"{d}/{mode}{r}")
        base = statistics.median(x["seconds"] for x in times["plain_copy"])
        for key, runs in times.items():
            med = statistics.median(x["seconds"] for x in runs)
            row = {
                "bench": "w3_local",
                "what": key,
                "bytes": total,
                "median_s": round(med, 3),
                "time_vs_plain_copy": round(med / base, 3),
                "peak_rss_mib": round(max(x["peak_rss_mib"] for x in runs), 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = args.out or f"benchmarks/results/w3-convert-{describe()['hostname']}.json"
    Path(out).write_text(json.dumps({"machine": describe(), "args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
