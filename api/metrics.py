"""Prometheus text exposition for ``/metrics``: request counters and latency histograms
recorded by a pure ASGI middleware (no per-request task or body buffering), plus catalog
gauges computed at scrape time."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ckptd.api.models import Checkpoint, ConversionJob, Run

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted under their own name; any other (clients may invent them) counts as ``OTHER``."""
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[tuple[str, str, str], int] = defaultdict(int)
        self._buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self._sum: dict[tuple[str, str], float] = defaultdict(float)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._count[(method, route, str(status))] += 1
            self._buckets[(method, route)][bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum[(method, route)] += seconds

    def render(self) -> list[str]:
        lines = [
            "# HELP ckptd_http_requests_total HTTP requests served, by method, route template and status.",
            "# TYPE ckptd_http_requests_total counter",
        ]
        with self._lock:
            for (m, r, s), n in sorted(self._count.items()):
                lines.append(f'ckptd_http_requests_total{{method="{m}",route="{_esc(r)}",status="{s}"}} {n}')
            lines += [
                "# HELP ckptd_http_request_duration_seconds Time to serve a request.",
                "# TYPE ckptd_http_request_duration_seconds histogram",
            ]
            for (m, r), counts in sorted(self._buckets.items()):
                labels = f'method="{m}",route="{_esc(r)}"'
                acc = 0
                for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                    acc += n
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'ckptd_http_request_duration_seconds_bucket{{{labels},le="{le}"}} {acc}')
                lines.append(f"ckptd_http_request_duration_seconds_sum{{{labels}}} {self._sum[(m, r)]:.6f}")
                lines.append(f"ckptd_http_request_duration_seconds_count{{{labels}}} {acc}")
        return lines


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: RequestMetrics, prefix: str = "") -> None:
        self.app = app
        self.metrics = metrics
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            # templates, not paths, and known methods: label cardinality stays bounded whatever clients send
            template = getattr(route, "path", None)
            if template is None:
                template = "<unmatched>"
            elif scope["path"].startswith(self.prefix + "/") and not template.startswith(self.prefix):
                template = self.prefix + template  # routes of included routers report their own path
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            self.metrics.observe(method, template, status, time.perf_counter() - start)


def catalog_gauges(session: Session) -> list[str]:
    lines = ["# HELP ckptd_catalog_runs Runs in the catalog.", "# TYPE ckptd_catalog_runs gauge"]
    lines.append(f"ckptd_catalog_runs {session.scalar(select(func.count(Run.id))) or 0}")
    lines += [
        "# HELP ckptd_catalog_checkpoints Checkpoints by state.",
        "# TYPE ckptd_catalog_checkpoints gauge",
    ]
    counts = {
        s: n
        for s, n in session.execute(
            select(Checkpoint.state, func.count(Checkpoint.id)).group_by(Checkpoint.state)
        )
    }
    for state in ("pending", "committed", "deleting", "deleted", "failed"):
        lines.append(f'ckptd_catalog_checkpoints{{state="{state}"}} {counts.get(state, 0)}')
    lines += ["# HELP ckptd_catalog_jobs Conversion jobs by status.", "# TYPE ckptd_catalog_jobs gauge"]
    jobs = {
        s: n
        for s, n in session.execute(
            select(ConversionJob.status, func.count(ConversionJob.id)).group_by(ConversionJob.status)
        )
    }
    for st in ("queued", "running", "succeeded", "failed"):
        lines.append(f'ckptd_catalog_jobs{{status="{st}"}} {jobs.get(st, 0)}')
    return lines
