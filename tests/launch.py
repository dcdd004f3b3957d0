"""Launch a gloo job of N real processes the way torchrun does, and judge how it ended.

Every rank gets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a free port) in its environment,
and ``{rank}``, ``{world}`` and ``{port}`` in its command line are filled in. With
``parent_store=True`` the test process holds the rendezvous ``TCPStore`` itself on a
kernel-chosen port (no race for the port; workers connect as clients). Output goes to files,
not pipes, so a chatty rank can never block on a full pipe while another is being joined.
A job that outlives ``timeout`` is killed whole; ranks are never left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from tests.zygote import spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Job:
    procs: list[Any]
    """``subprocess.Popen`` or the zygote's look-alike (tests/zygote.py)."""
    logs: list[IO[bytes]]
    outputs: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    """Ranks still running at the deadline (killed by ``launch``)."""

    @property
    def returncodes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]

    def tail(self, ranks: Collection[int], n: int = 3000) -> str:
        return "\n".join(f"--- rank {r} (exit {self.procs[r].returncode}):\n{self.outputs[r][-n:]}"
                         for r in ranks)


def launch(
    cmd: Sequence[str],
    world: int,
    *,
    timeout: float = 300,
    parent_store: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | None = "/",
    expect_dead: Collection[int] = (),
    during: Callable[[Job], None] | None = None,
) -> Job:
    """Run ``world`` ranks of ``cmd`` (``sys.executable`` is prepended); all must exit 0, except the
    ranks in ``expect_dead``, which must have died of SIGKILL. Raises AssertionError with the
    failed ranks' output otherwise. ``during(job)`` runs while the ranks do (to signal one)."""
    store: Any = None
    if parent_store:
        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
        port = int(store.port)
    else:
        port = free_port()
    base = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", **(env or {})}
    job = Job([], [])
    try:
        for rank in range(world):
            args = [a.format(rank=rank, world=world, port=port) for a in cmd]
            log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _read, after the job
            job.logs.append(log)
            job.procs.append(spawn(args, env={**base, "RANK": str(rank)}, cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT))
        if during is not None:
            during(job)
        _join(job, time.monotonic() + timeout)
    finally:
        for rank, p in enumerate(job.procs):  # stragglers of a failed or timed-out job
            if p.poll() is None:
                job.killed.append(rank)
                p.kill()
                p.wait()
        job.outputs = [_read(log) for log in job.logs]
        del store
    _judge(job, timeout, set(expect_dead))
    return job


def _join(job: Job, deadline: float) -> None:
    for p in job.procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return  # the caller kills what is left and reports it


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


def _judge(job: Job, timeout: float, expect_dead: set[int]) -> None:
    if job.killed:
        late = job.killed
        raise AssertionError(f"ranks {late} did not finish within {timeout:.0f}s:\n" + job.tail(late))
    bad = [r for r, p in enumerate(job.procs) if p.returncode != (-9 if r in expect_dead else 0)]
    if bad:
        raise AssertionError(f"ranks {bad} failed:\n" + job.tail(bad))
