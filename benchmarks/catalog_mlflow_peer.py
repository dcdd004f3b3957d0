"""The MLflow tracking server as the W4 peer: the same data set and comparable queries.

See the mapping table in catalog_bench.py's docstring: each ckptd run is an MLflow experiment,
each checkpoint an MLflow run (metrics and tags carried over)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import httpx
from bench_server import free_port, wait_ready
from catalog_data import PER_RUN, RUNS, T0

MLFLOW_SEED = """
import random, sys, uuid
from mlflow.store.tracking.dbmodels import models as m
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from sqlalchemy import insert
from sqlalchemy.orm import sessionmaker

url, artifacts, runs, per_run, t0_ms = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
store = SqlAlchemyStore(url, artifacts)  # creates MLflow's schema at its newest revision
rng = random.Random(0)
exps, rows, metrics, params, tags = [], [], [], [], []
for r in range(runs):
    exps.append({"experiment_id": r + 1, "name": f"run-{r:03d}", "artifact_location": f"{artifacts}/{r + 1}",
                 "lifecycle_stage": "active", "creation_time": t0_ms + r * 60_000,
                 "last_update_time": t0_ms + r * 60_000})
    for i in range(per_run):
        step = (i + 1) * 500
        rid = uuid.UUID(int=rng.getrandbits(128)).hex
        committed = bool(i % 17)
        rows.append({"run_uuid": rid, "name": f"step_{step:010d}", "source_type": "LOCAL", "source_name": "",
                     "entry_point_name": "", "user_id": "bench",
                     "status": "FINISHED" if committed else "FAILED",
                     "start_time": t0_ms + step * 1000, "end_time": t0_ms + (step + 5) * 1000,
                     "source_version": "", "lifecycle_stage": "active",
                     "artifact_uri": f"{artifacts}/{r + 1}/{rid}/artifacts", "experiment_id": r + 1})
        for key, base in (("loss", 3.0), ("val_loss", 3.1)):
            metrics.append({"key": key, "value": base * 0.999**i + rng.random() * 0.05,
                            "timestamp": t0_ms + step * 1000, "step": step, "is_nan": False, "run_uuid": rid})
        params += [{"key": "step", "value": str(step), "run_uuid": rid},
                   {"key": "nbytes", "value": str(1_500_000_000 + i), "run_uuid": rid}]
        tags += [{"key": "mlflow.runName", "value": f"step_{step:010d}", "run_uuid": rid},
                 {"key": "state", "value": "committed" if committed else "failed", "run_uuid": rid},
                 {"key": "tier.local", "value": f"/ckpt/run-{r:03d}/step_{step:010d}", "run_uuid": rid}]
        if i % 2 == 0:
            tags.append({"key": "even", "value": "true", "run_uuid": rid})
        if i % 10 == 0:
            uri = f"s3://bench/run-{r:03d}/step_{step:010d}"
            tags.append({"key": "tier.remote", "value": uri, "run_uuid": rid})
with sessionmaker(store.engine)() as s:
    for model, data in ((m.SqlExperiment, exps), (m.SqlRun, rows), (m.SqlMetric, metrics),
                        (m.SqlLatestMetric, metrics), (m.SqlParam, params), (m.SqlTag, tags)):
        s.execute(insert(model.__table__), data)
    s.commit()
store.engine.dispose()
"""


def seed_mlflow(url: str, python: str, artifacts: Path) -> None:
    """The W4 data set in MLflow's tables (see the mapping in the module docstring)."""
    t0_ms = int(T0.timestamp() * 1000)
    args = [url, artifacts.as_uri(), str(RUNS), str(PER_RUN), str(t0_ms)]
    subprocess.run([python, "-c", MLFLOW_SEED, *args], check=True)


def start_mlflow(url: str, python: str, artifacts: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    mlflow = str(Path(python).with_name("mlflow"))
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--backend-store-uri",
            url,
            "--default-artifact-root",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{base}/health", "mlflow server")
    return proc, base


def mlflow_workloads() -> dict[str, Any]:
    """The ckptd workloads as MLflow requests (same random streams: the same runs and bounds)."""
    rng = random.Random(1)
    search = "/api/2.0/mlflow/runs/search"
    t0_ms = int(T0.timestamp() * 1000)

    def exp() -> list[str]:
        return [str(rng.randrange(RUNS) + 1)]

    async def post(c: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await c.post(path, json=body)
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    async def list_page(c: httpx.AsyncClient) -> int:
        body = {"experiment_ids": exp(), "max_results": 50, "order_by": ["attributes.start_time DESC"]}
        await post(c, search, body)
        return 1

    async def filter_sort(c: httpx.AsyncClient) -> int:
        body = {
            "experiment_ids": exp(),
            "filter": "tags.state = 'committed' and tags.even = 'true'",
            "order_by": ["metrics.val_loss ASC"],
            "max_results": 20,
        }
        await post(c, search, body)
        return 1

    async def paginate(c: httpx.AsyncClient) -> int:
        body: dict[str, Any] = {
            "experiment_ids": exp(),
            "max_results": 25,
            "order_by": ["attributes.start_time ASC"],
        }
        n = 0
        while True:
            doc = await post(c, search, body)
            n += 1
            if not doc.get("next_page_token"):
                return n
            body["page_token"] = doc["next_page_token"]

    async def global_filter(c: httpx.AsyncClient) -> int:
        since = t0_ms + rng.randrange(0, 40_000) * 1000
        body = {
            "experiment_ids": [str(i + 1) for i in range(RUNS)],
            "filter": f"tags.`tier.remote` LIKE 's3://%' and attributes.start_time >= {since}",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 50,
        }
        await post(c, search, body)
        return 1

    async def runs_list(c: httpx.AsyncClient) -> int:
        await post(c, "/api/2.0/mlflow/experiments/search", {"max_results": 100})
        return 1

    return {
        "list_run_page": list_page,
        "filter_sort_metric": filter_sort,
        "paginate_run": paginate,
        "filter_all_runs": global_filter,
        "list_runs": runs_list,
    }
