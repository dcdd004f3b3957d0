"""W4: the REST catalog under load (see shared BENCHMARKS.md), with MLflow's tracking server as the peer.

10,000 checkpoints across 100 runs; list, filter and paginate endpoints under 50 concurrent
clients on loopback; SQLite and (when a URL is given) PostgreSQL. Every server runs in its own
process with one worker (ckptd: ``uvicorn --factory ckptd.api.app:create_app``; MLflow:
``mlflow server --workers 1``) so the load generator does not share its interpreter; all share this
machine's cores, which the results record.

    python benchmarks/catalog_bench.py [--postgres URL] [--seconds 10] [--clients 50]
        [--baseline-rev HEAD] [--peer mlflow [--mlflow-python /tmp/mlflow-venv/bin/python]]

``--baseline-rev`` also serves the catalog as committed at that revision (``git archive``, read only)
on the same data in the same run, so changes are measured as ratios to a same-run baseline.
``--peer mlflow`` loads the same data set into MLflow (installed in its own venv: it pins numpy and
pandas versions of its own) and runs the comparable queries through ``/api/2.0/mlflow/runs/search``.

Mapping of the data set onto MLflow (the closest equivalents; MLflow has no tiers or lineage):

===============================  ==========================================================
ckptd                            MLflow
===============================  ==========================================================
run ``run-NNN``                  experiment ``run-NNN`` (id NNN+1)
checkpoint (run, step)           run ``step_0000000500`` of that experiment
created_at / committed_at        ``start_time`` / ``end_time`` (ms); ``start_time`` orders by step
state committed / failed         status FINISHED / FAILED, and tag ``state``
metrics loss, val_loss           metrics (history of one value at ``step``) and latest_metrics
tag ``even``                     tag ``even`` = ``true``
location per tier                tag ``tier.local`` / ``tier.remote`` = the URI
step, nbytes                     params ``step``, ``nbytes``
===============================  ==========================================================

Workloads (ckptd request → MLflow request):

* list_run_page: ``GET /checkpoints?run=R&limit=50`` → search experiment R, 50, ``start_time DESC``
* filter_sort_metric: ``state=committed&tag=even&sort=metric:val_loss&limit=20`` → filter
  ``tags.state = 'committed' and tags.even = 'true'``, order ``metrics.val_loss ASC``, 20
* paginate_run: every page of a run, 25 a page, ``sort=step`` → ``page_token`` walk, ``start_time ASC``
* filter_all_runs: ``tier=remote&min_step=S&sort=-step&limit=50`` across runs → all 100 experiments,
  ``tags.`tier.remote` LIKE 's3://%' and attributes.start_time >= T(S)``, ``start_time DESC``, 50
* list_runs: ``GET /runs?limit=100`` (with per-run checkpoint counts) → ``experiments/search``, 100
  (no counts: MLflow has no such aggregate)

The MLflow data are inserted straight into its tables (its own SQLAlchemy models) after its schema
is created: 20,000 REST calls would take longer than the benchmark. Clients expire idle
connections after 2 s, before the servers' 5 s keep-alive timeout: with equal timeouts a request
races the server's close and fails with "Server disconnected" (a load-generator artefact).

Prints one JSON line per (system, backend, workload) and writes them, with the machine description,
to ``benchmarks/results/catalog-<timestamp>.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from bench_server import free_port, wait_ready
from catalog_data import PER_RUN, RUNS, T0
from catalog_mlflow_peer import mlflow_workloads, seed_mlflow, start_mlflow

from ckptd.api.db import Database, normalise_url
from ckptd.api.models import Checkpoint, CheckpointMetric, CheckpointTag, Location, Run

TOKEN = "bench-token-" + "x" * 16
RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
RATIO_KEYS = ("p50_ms", "p99_ms", "req_per_s", "server_cpu_ms_per_req")
KEEPALIVE_EXPIRY_S = 2.0
"""Below the servers' keep-alive timeout (uvicorn's default 5 s), as a client must be."""
PACKAGE_DIRS = {
    "ckptd": "ckptd",
    "format": "ckptd/format",
    "converters": "ckptd/converters",
    "api": "ckptd/api",
    "training": "ckptd/training",
}
"""``[tool.setuptools] package-dir`` of pyproject.toml: where each folder lands in the package."""


def machine() -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import describe  # benchmarks/machine.py: the shared machine description

    info: dict[str, Any] = describe()
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return info


def seed(url: str) -> None:
    """100 runs x 100 checkpoints with metrics, tags and tier locations, inserted in bulk."""
    db = Database(url)
    db.upgrade()
    rng = random.Random(0)
    t0 = T0
    with db.session() as s:
        runs = [
            Run(
                name=f"run-{r:03d}",
                roots={"local": f"/ckpt/run-{r:03d}", "remote": f"s3://bench/run-{r:03d}"},
                config={"lr": 3e-4},
                retention={"keep_last": 10},
                created_at=t0 + timedelta(minutes=r),
            )
            for r in range(RUNS)
        ]
        s.add_all(runs)
        s.flush()
        for run in runs:
            for i in range(PER_RUN):
                step = (i + 1) * 500
                ckpt = Checkpoint(
                    run_id=run.id,
                    step=step,
                    state="committed" if i % 17 else "failed",
                    nbytes=1_500_000_000 + i,
                    created_at=t0 + timedelta(seconds=step),
                    committed_at=t0 + timedelta(seconds=step + 5),
                    layout={"mesh": {"tp": 2, "dp": 4}, "arrays": {}},
                )
                ckpt.metrics = [
                    CheckpointMetric(name="loss", value=3.0 * 0.999**i + rng.random() * 0.05),
                    CheckpointMetric(name="val_loss", value=3.1 * 0.999**i + rng.random() * 0.05),
                ]
                ckpt.tags = [CheckpointTag(tag="even")] if i % 2 == 0 else []
                ckpt.locations = [Location(tier="local", uri=f"/ckpt/{run.name}/step_{step:010d}")]
                if i % 10 == 0:
                    ckpt.locations.append(
                        Location(tier="remote", uri=f"s3://bench/{run.name}/step_{step:010d}")
                    )
                s.add(ckpt)
    db.dispose()


def baseline_tree(rev: str, dest: Path) -> Path:
    """The package as committed at ``rev``, laid out as installed, under ``dest`` (for PYTHONPATH)."""
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    for folder, target in PACKAGE_DIRS.items():
        # the core moved from ckptd/ to src/ckptd/; older revisions still have it at the top
        origin = src / "src" / folder if (src / "src" / folder).is_dir() else src / folder
        shutil.copytree(origin, dest / "tree" / target, dirs_exist_ok=True)
    shutil.copytree(src / "migrations", dest / "tree" / "migrations")
    return dest / "tree"


def start_server(url: str, tree: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """The catalog under uvicorn, one worker; from ``tree`` (a :func:`baseline_tree`) when given."""
    port = free_port()
    env = {**os.environ, "CKPTD_DATABASE_URL": url, "CKPTD_API_TOKEN": TOKEN}
    if tree is not None:
        # run there: ``python -m`` puts the working directory first on sys.path, and a checkout's
        # ckptd/ would win over PYTHONPATH and the editable install alike
        env["PYTHONPATH"] = str(tree)
        env["CKPTD_MIGRATIONS_DIR"] = str(tree / "migrations")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "ckptd.api.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=tree,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{base}/healthz", "catalog server")
    return proc, base


def workloads() -> dict[str, Any]:
    rng = random.Random(1)

    def run() -> str:
        return f"run-{rng.randrange(RUNS):03d}"

    async def list_page(c: httpx.AsyncClient) -> int:
        (await c.get("/api/v1/checkpoints", params={"run": run(), "limit": 50})).raise_for_status()
        return 1

    async def filter_sort(c: httpx.AsyncClient) -> int:
        params = {"run": run(), "state": "committed", "tag": "even", "sort": "metric:val_loss", "limit": 20}
        (await c.get("/api/v1/checkpoints", params=params)).raise_for_status()
        return 1

    async def paginate(c: httpx.AsyncClient) -> int:
        """Walk every page of a run (limit 25: 4 pages + the cursor chain)."""
        params: dict[str, Any] = {"run": run(), "limit": 25, "sort": "step"}
        n = 0
        while True:
            r = await c.get("/api/v1/checkpoints", params=params)
            r.raise_for_status()
            n += 1
            cursor = r.json()["next_cursor"]
            if not cursor:
                return n
            params["cursor"] = cursor

    async def global_filter(c: httpx.AsyncClient) -> int:
        params = {"tier": "remote", "min_step": rng.randrange(0, 40_000), "sort": "-step", "limit": 50}
        (await c.get("/api/v1/checkpoints", params=params)).raise_for_status()
        return 1

    async def runs_list(c: httpx.AsyncClient) -> int:
        (await c.get("/api/v1/runs", params={"limit": 100})).raise_for_status()
        return 1

    return {
        "list_run_page": list_page,
        "filter_sort_metric": filter_sort,
        "paginate_run": paginate,
        "filter_all_runs": global_filter,
        "list_runs": runs_list,
    }


async def load(base: str, op: Any, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    requests = errors = 0
    error_kinds: Counter[str] = Counter()
    limits = httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=KEEPALIVE_EXPIRY_S
    )
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as c:
        await op(c)  # warm-up
        stop = time.perf_counter() + seconds
        start = time.perf_counter()

        async def client() -> None:
            nonlocal requests, errors
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    n = await op(c)
                except httpx.HTTPStatusError as e:
                    errors += 1
                    error_kinds[f"HTTP {e.response.status_code}: {e.response.text[:120]}"] += 1
                    continue
                except httpx.HTTPError as e:
                    errors += 1
                    error_kinds[f"{type(e).__name__}: {str(e)[:120]}"] += 1
                    continue
                latencies.append((time.perf_counter() - t) / n)  # per request
                requests += n

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "requests": requests,
        "errors": errors,
        **({"error_kinds": dict(error_kinds)} if error_kinds else {}),
        "req_per_s": round(requests / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "seconds": round(elapsed, 2),
    }


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux ``/proc``): the
    server's own cost per request, which the load on a shared machine does not blur as latency."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])  # fields after "(comm)": state, ppid, ..., utime, stime
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, parent in parents.items() if parent == p and c not in tree]
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def server_histogram(base: str) -> dict[float, int]:
    """Cumulative counts per latency bucket bound (s) of the catalog's GET ``/api/v1`` requests, from
    its ``/metrics``: time inside the server, without the load generator's share of the CPU."""
    counts: dict[float, int] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("ckptd_http_request_duration_seconds_bucket{") and 'method="GET"' in line:
            if 'route="/api/v1/' not in line:
                continue
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            counts[bound] = counts.get(bound, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def histogram_quantile(before: dict[float, int], after: dict[float, int], q: float) -> float | None:
    """Upper bound (ms) of the bucket holding quantile ``q`` of the requests between two scrapes."""
    delta = {b: after[b] - before.get(b, 0) for b in sorted(after)}
    total = delta.get(float("inf"), 0)
    for bound, cumulative in delta.items():
        if total and cumulative >= q * total:
            return bound * 1000
    return None


def measure(
    system: str,
    kind: str,
    proc: subprocess.Popen[bytes],
    base: str,
    ops: dict[str, Any],
    args: argparse.Namespace,
    seeded: float,
) -> list[dict[str, Any]]:
    lines = []
    for name, op in ops.items():
        ckptd = system.startswith("ckptd")
        hist = server_histogram(base) if ckptd else {}
        cpu = server_cpu_s(proc.pid)
        result = asyncio.run(load(base, op, args.clients, args.seconds))
        cpu = server_cpu_s(proc.pid) - cpu
        if ckptd:  # MLflow exports no comparable histogram unless started with --expose-prometheus
            after = server_histogram(base)
            result["server_p50_le_ms"] = histogram_quantile(hist, after, 0.5)
            result["server_p99_le_ms"] = histogram_quantile(hist, after, 0.99)
        result["server_cpu_ms_per_req"] = round(cpu * 1000 / max(result["requests"], 1), 2)
        result["server_cpu_util"] = round(cpu / result["seconds"], 2)
        line = {
            "bench": "W4",
            "system": system,
            "backend": kind,
            "workload": name,
            "clients": args.clients,
            "runs": RUNS,
            "checkpoints": RUNS * PER_RUN,
            "seed_s": round(seeded, 1),
            **result,
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def serve_and_measure(
    system: str, kind: str, start: Any, ops: dict[str, Any], args: argparse.Namespace, seeded: float
) -> list[dict[str, Any]]:
    proc, base = start()
    try:
        return measure(system, kind, proc, base, ops, args, seeded)
    finally:
        proc.terminate()
        proc.wait(20)


def bench_backend(
    kind: str, url: str, args: argparse.Namespace, out: list[dict[str, Any]], tree: Path | None
) -> None:
    """ckptd on ``url`` (the baseline first, on the same rows, when ``tree`` is given)."""
    t = time.perf_counter()
    seed(url)
    seeded = time.perf_counter() - t
    if tree is not None:
        base_rev = (tree / "migrations" / "versions").glob("*.py")
        head = max(p.name.split("_", 1)[0] for p in base_rev)
        db = Database(url)
        db.downgrade(head)  # the schema the baseline knows (drops indexes added since)
        db.dispose()
        system = f"ckptd@{args.baseline_rev}"
        out += serve_and_measure(system, kind, lambda: start_server(url, tree), workloads(), args, seeded)
        db = Database(url)
        db.upgrade()
        db.dispose()
    out += serve_and_measure("ckptd", kind, lambda: start_server(url), workloads(), args, seeded)


def bench_mlflow(kind: str, url: str, args: argparse.Namespace, out: list[dict[str, Any]], tmp: Path) -> None:
    artifacts = tmp / f"mlflow-artifacts-{kind}"
    artifacts.mkdir()
    t = time.perf_counter()
    seed_mlflow(url, args.mlflow_python, artifacts)
    seeded = time.perf_counter() - t
    start = lambda: start_mlflow(url, args.mlflow_python, artifacts)  # noqa: E731
    out += serve_and_measure("mlflow", kind, start, mlflow_workloads(), args, seeded)


def fresh_postgres_db(url: str, prefix: str = "ckptd_bench") -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{int(time.time())}"
    admin = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(normalise_url(url)).set(database=name).render_as_string(hide_password=False)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("CKPTD_TEST_POSTGRES_URL"),
        help="PostgreSQL URL (a fresh database is created on that server)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each workload")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated subset")
    parser.add_argument("--baseline-rev", help="also measure the catalog as committed at this git revision")
    parser.add_argument("--peer", choices=["mlflow"], help="also measure a peer on the same data and load")
    parser.add_argument(
        "--mlflow-python",
        default="/tmp/mlflow-venv/bin/python",
        help="interpreter of a venv with mlflow (and psycopg2-binary for PostgreSQL)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    args = parser.parse_args()
    backends = set(args.backends.split(","))
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tree = baseline_tree(args.baseline_rev, tmp / "baseline") if args.baseline_rev else None
        if "sqlite" in backends:
            bench_backend("sqlite", f"sqlite:///{tmp}/catalog.db", args, out, tree)
            if args.peer == "mlflow":
                bench_mlflow("sqlite", f"sqlite:///{tmp}/mlflow.db", args, out, tmp)
        if args.postgres and "postgresql" in backends:
            bench_backend("postgresql", fresh_postgres_db(args.postgres), args, out, tree)
            if args.peer == "mlflow":
                pg = fresh_postgres_db(args.postgres, "mlflow_bench").replace("+psycopg://", "+psycopg2://")
                bench_mlflow("postgresql", pg, args, out, tmp)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"catalog-{stamp}.jsonl"
        lines = [
            {
                "machine": machine(),
                "note": "each server (1 worker) and the load generator share the cores",
                "baseline_rev": args.baseline_rev,
                "peer": args.peer,
                "argv": sys.argv[1:],
            },
            *out,
            *ratios(out),
        ]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def ratios(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ckptd's p50, p99 and req/s over each other system's, per backend and workload (same run)."""
    by = {(r["system"], r["backend"], r["workload"]): r for r in out}
    lines = []
    for (system, backend, workload), other in by.items():
        mine = by.get(("ckptd", backend, workload))
        if system == "ckptd" or mine is None:
            continue
        lines.append(
            {
                "ratio": f"ckptd / {system}",
                "backend": backend,
                "workload": workload,
                **{
                    k: round(mine[k] / other[k], 3) if other[k] else None
                    for k in ("p50_ms", "p99_ms", "req_per_s")
                },
            }
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
