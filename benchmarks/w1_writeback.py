"""When a local save waits for the device: four strategies, one run, against a raw fsync'd write.

``LocalStore`` fsyncs every file before a commit. The shipped strategy starts each large
file's writeback as soon as it is written (``sync_file_range``) and fsyncs it on a background
thread right after, beside the writers; small files are fsync'd together at the end
(src/ckptd/storage/writeback.py). Compared, interleaved, on the W1 state:

* ``raw``: one sequential file of the same bytes, written and fsync'd (the limit);
* ``eager``: each large file fsync'd by its writer thread right after writing;
* ``deferred``: nothing started early, every fsync at the end;
* ``writeback``: writeback started early, every fsync at the end (shipped until 2026-12-02);
* ``background``: the shipped strategy.

Every measurement starts with an empty page cache and no dirty pages. Prints JSON lines;
writes benchmarks/results/w1-writeback-<time>.json with the machine description.

    python benchmarks/w1_writeback.py [--scale 0.5] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe
from w1_format import drop_caches, flat_bytes, raw_write
from w1_state import nbytes, w1_state

import ckptd
from ckptd.storage import local
from ckptd.storage.writeback import BackgroundSync


def eager(fd: int) -> bool:
    os.fdatasync(fd)
    return True


def deferred(fd: int) -> bool:
    return False


class SyncAtFlush(BackgroundSync):
    """Large files fsync'd at flush, in parallel, like the small ones (no background thread)."""

    def __init__(self, sync: Callable[[Path], None]) -> None:
        super().__init__(sync)
        self._paths: list[Path] = []

    def soon(self, path: Path) -> None:
        self._paths.append(path)

    def wait(self) -> None:
        paths, self._paths = self._paths, []
        if paths:
            with ThreadPoolExecutor(min(16, len(paths))) as pool:
                list(pool.map(self._sync, paths))


Strategy = tuple[Callable[[int], bool], type[BackgroundSync]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    state = w1_state(args.scale)
    bufs = flat_bytes(state)
    shipped: Strategy = (local.start_writeback, local.BackgroundSync)
    strategies: dict[str, Strategy | None] = {
        "raw": None, "eager": (eager, SyncAtFlush), "deferred": (deferred, SyncAtFlush),
        "writeback": (shipped[0], SyncAtFlush), "background": shipped,
    }
    times: dict[str, list[float]] = {k: [] for k in strategies}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPTD_BENCH_DIR")) as root:
        ckptd.save(state, f"{root}/warm", step=1)  # thread pools, imports: not part of any run
        for r in range(args.repeats):
            order = list(strategies) if r % 2 == 0 else list(reversed(strategies))
            for name in order:
                strategy = strategies[name]
                drop_caches()
                t0 = time.perf_counter()
                if strategy is None:
                    raw_write(f"{root}/raw.bin", bufs)
                else:
                    local.start_writeback, local.BackgroundSync = strategy  # type: ignore[assignment,misc]
                    try:
                        ckptd.save(state, f"{root}/{name}", step=r)
                    finally:
                        local.start_writeback, local.BackgroundSync = shipped  # type: ignore[assignment,misc]
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(f"{root}/{name}", ignore_errors=True)
                Path(f"{root}/raw.bin").unlink(missing_ok=True)
    base = statistics.median(times["raw"])
    rows: list[dict[str, Any]] = []
    for name, runs in times.items():
        med = statistics.median(runs)
        rows.append({"bench": "w1_writeback", "what": name, "bytes": nbytes(state), "median_s": round(med, 4),
                     "throughput_vs_raw_write": round(base / med, 3), "runs_s": [round(x, 4) for x in runs]})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with open(out / f"w1-writeback-{stamp}.json", "w") as f:
        json.dump({"machine": describe(), "args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
