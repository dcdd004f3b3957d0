"""Server memory under the unauthenticated attacks of issue 10, this tree against a baseline revision.

    python benchmarks/catalog_abuse.py [--baseline REV] [--repeats 3]

Each (server, attack) gets a fresh ``uvicorn --factory ckptd.api.app:create_app`` process on a
fresh SQLite catalog holding one committed checkpoint of 2,000 arrays. The attacks:

* ``body``: an unauthenticated POST of a 95 MiB JSON body (the baseline reads and parses it
  before answering 401);
* ``plan``: ``GET .../restore-plan?dp=64`` (128,000 reads; the baseline builds them all).

Prints one JSON line per run (status, seconds, idle RSS, peak RSS and growth in MiB) and writes
them with the machine description under ``benchmarks/results/``. Compare the ``growth_mib``
medians: the idle footprint (~330 MiB) is mostly torch, which ``import ckptd`` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_server import free_port, wait_ready
from catalog_bench import baseline_tree
from machine import describe

TOKEN = "abuse-bench-token-" + "x" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RESULTS = Path(__file__).parent / "results"


def memory_mib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) // 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}


def serve(tree: Path | None, db: Path, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CKPTD_DATABASE_URL": f"sqlite:///{db}",
        "CKPTD_API_TOKEN": TOKEN,
        "CKPTD_ALLOW_ROOTS": str(root),
        "OMP_NUM_THREADS": "1",
    }
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        env["CKPTD_MIGRATIONS_DIR"] = str(tree / "migrations")
    argv = ["-m", "uvicorn", "--factory", "ckptd.api.app:create_app", "--port", str(port)]
    proc = subprocess.Popen([sys.executable, *argv, "--log-level", "warning"], env=env, cwd=tree or "/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{url}/healthz", "catalog server")
    return proc, url


def seed(url: str, root: Path) -> int:
    run = "abused"
    httpx.post(f"{url}/api/v1/runs", json={"name": run, "roots": {"local": str(root / run)}}, headers=AUTH)
    spec = {"dtype": "float32", "shape": [64, 64], "layout": {"partition": [["tp"], []]}, "nbytes": 16384}
    body = {
        "step": 1,
        "locations": [{"tier": "local", "uri": str(root / run / "step_0000000001")}],
        "layout": {"mesh": {"tp": 2}, "arrays": {f"model/layer{i}/w": spec for i in range(2000)}},
    }
    r = httpx.post(f"{url}/api/v1/runs/{run}/checkpoints", json=body, headers=AUTH, timeout=120)
    cid = int(r.json()["id"])
    httpx.patch(f"{url}/api/v1/checkpoints/{cid}", json={"state": "committed"}, headers=AUTH, timeout=60)
    return cid


def attack(url: str, cid: int, what: str) -> int | str:
    try:
        if what == "body":
            payload = b'{"name": "' + b"a" * (95 * 2**20) + b'"}'
            headers = {"Content-Type": "application/json"}
            return httpx.post(f"{url}/api/v1/runs", content=payload, headers=headers, timeout=300).status_code
        plan = f"{url}/api/v1/checkpoints/{cid}/restore-plan"
        return httpx.get(plan, params={"dp": 64}, timeout=300).status_code
    except httpx.HTTPError as e:
        return type(e).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="26f309f", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        baseline = baseline_tree(args.baseline, tmp / "baseline")
        servers = {f"baseline@{args.baseline}": baseline, "this tree": None}
        for i in range(args.repeats):
            for what in ("body", "plan"):
                for label, tree in servers.items():
                    root = tmp / f"roots-{i}-{what}-{len(out)}"
                    root.mkdir()
                    proc, url = serve(tree, tmp / f"{len(out)}.db", root)
                    try:
                        cid = seed(url, root)
                        idle = memory_mib(proc.pid)["VmRSS"]
                        t0 = time.perf_counter()
                        status = attack(url, cid, what)
                        seconds = time.perf_counter() - t0
                        peak = memory_mib(proc.pid)["VmHWM"]
                    finally:
                        proc.terminate()
                        proc.wait(30)
                    row = {
                        "server": label,
                        "attack": what,
                        "status": status,
                        "seconds": round(seconds, 3),
                        "idle_rss_mib": idle,
                        "peak_rss_mib": peak,
                        "growth_mib": peak - idle,
                    }
                    print(json.dumps(row), flush=True)
                    out.append(row)
    summary = []
    for what in ("body", "plan"):
        med = {
            label: statistics.median(
                r["growth_mib"] for r in out if (r["server"], r["attack"]) == (label, what)
            )
            for label in {r["server"] for r in out}
        }
        summary.append({"attack": what, "median_growth_mib": med})
        print(json.dumps(summary[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    doc = {"machine": describe(), "runs": out, "summary": summary}
    (RESULTS / f"catalog-abuse-{stamp}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
