"""Several catalog servers on one PostgreSQL database claim each conversion job exactly once
(``SELECT ... FOR UPDATE SKIP LOCKED``), a starting server leaves the jobs of the others alone, and
a job whose server died is failed once its lease runs out."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import AUTH, PG_ENV, FreshDatabases, unique
from tests.api.server_process import ServerProcess

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} is not set"),
]
V1 = "/api/v1"


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshDatabases]:
    dbs = FreshDatabases("postgres", tmp_path_factory.mktemp("db-jobs"))
    yield dbs
    dbs.drop_all()


def job_server(url: str, record: Path, root: Path, lease_s: float = 30.0) -> ServerProcess:
    return ServerProcess(["-m", "tests.api.job_server", url, str(record), str(root), str(lease_s)])


def committed_checkpoint(api: httpx.Client, root: Path) -> int:
    run = unique()
    assert api.post(f"{V1}/runs", json={"name": run, "roots": {"local": str(root / run)}}).status_code == 201
    body = {"step": 1, "locations": [{"tier": "local", "uri": str(root / run / "step_0000000001")}]}
    cid: int = api.post(f"{V1}/runs/{run}/checkpoints", json=body).json()["id"]
    assert api.patch(f"{V1}/checkpoints/{cid}", json={"state": "committed"}).status_code == 200
    return cid


def wait_jobs(api: httpx.Client, ids: list[int], timeout: float = 120.0) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {i: api.get(f"{V1}/jobs/{i}").json() for i in ids}
        if all(j["status"] in ("succeeded", "failed") for j in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, {i: j["status"] for i, j in jobs.items()}
        time.sleep(0.2)


def test_two_servers_run_each_job_exactly_once(databases: FreshDatabases, tmp_path: Path) -> None:
    url, record = databases.new(), tmp_path / "ran.txt"
    first = job_server(url, record, tmp_path)
    second = None
    try:
        with httpx.Client(base_url=first.url, headers=AUTH, timeout=30) as a:
            cid = committed_checkpoint(a, tmp_path)
            ids = [
                a.post(f"{V1}/checkpoints/{cid}/convert", json={"dp": n}).json()["id"] for n in range(1, 13)
            ]
            # a server starting now finds queued jobs of a live server: it may help, never duplicate
            second = job_server(url, record, tmp_path)
            with httpx.Client(base_url=second.url, headers=AUTH, timeout=30) as b:
                ids += [
                    b.post(f"{V1}/checkpoints/{cid}/convert", json={"pp": n}).json()["id"]
                    for n in range(1, 13)
                ]
                jobs = wait_jobs(b, ids)
        assert {j["status"] for j in jobs.values()} == {"succeeded"}
        runs = [line.split() for line in record.read_text().splitlines()]
        counts = collections.Counter(int(job) for job, _ in runs)
        assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}, counts
        assert len({pid for _, pid in runs}) == 2  # both servers worked
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_job_whose_server_died_fails_when_its_lease_expires(
    databases: FreshDatabases, tmp_path: Path
) -> None:
    url, record = databases.new(), tmp_path / "ran.txt"
    doomed = job_server(url, record, tmp_path, lease_s=2.0)
    survivor = None
    try:
        with httpx.Client(base_url=doomed.url, headers=AUTH, timeout=30) as a:
            cid = committed_checkpoint(a, tmp_path)
            slow = a.post(f"{V1}/checkpoints/{cid}/convert", json={"tp": 8}).json()["id"]
            deadline = time.monotonic() + 30
            while a.get(f"{V1}/jobs/{slow}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        survivor = job_server(url, record, tmp_path, lease_s=2.0)
        with httpx.Client(base_url=survivor.url, headers=AUTH, timeout=30) as b:
            time.sleep(3.0)  # the doomed server is alive and renews its lease: the job is left alone
            assert b.get(f"{V1}/jobs/{slow}").json()["status"] == "running"
            os.kill(doomed.proc.pid, signal.SIGKILL)
            job = wait_jobs(b, [slow], timeout=60)[slow]
        assert job["status"] == "failed" and "lease" in job["error"]
    finally:
        doomed.stop()
        if survivor is not None:
            survivor.stop()
