"""Fixtures of the catalog tests: real databases (a SQLite file; PostgreSQL when
``CKPTD_TEST_POSTGRES_URL`` is set) and a real uvicorn server on 127.0.0.1, port 0.

Tests never depend on each other's rows: each one names its runs with :func:`unique`.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ckptd.api.app import create_app
from ckptd.api.db import normalise_url
from ckptd.api.services.jobs import ConversionTask
from ckptd.api.settings import CatalogSettings
from tests.uvicorn_thread import serve_in_thread

TOKEN = "test-token-" + "x" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PG_ENV = "CKPTD_TEST_POSTGRES_URL"

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgres",
        id="postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} is not set"),
        ],
    ),
]


def unique(prefix: str = "run") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class FreshDatabases:
    """Creates empty databases of one kind and drops them at the end of the session."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp, self.created = kind, tmp, []

    def new(self) -> str:
        name = f"ckptd_test_{uuid.uuid4().hex[:12]}"
        if self.kind == "sqlite":
            return f"sqlite:///{self.tmp / (name + '.db')}"
        url = make_url(normalise_url(os.environ[PG_ENV]))
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        self.created.append(name)
        return url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        if not self.created:
            return
        admin = create_engine(normalise_url(os.environ[PG_ENV]), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def databases(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshDatabases]:
    dbs = FreshDatabases(backend, tmp_path_factory.mktemp(f"db-{backend}"))
    yield dbs
    dbs.drop_all()


def write_conversion(task: ConversionTask) -> dict[str, Any]:
    """A real converter for the job machinery: writes a conversion report under the output URI."""
    if task.target_mesh.get("tp") == 3:
        raise RuntimeError("tp=3 does not divide the heads")  # lets tests exercise a failing job
    out = Path(task.output_uri)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "arrays": sorted(task.layout.get("arrays", {})),
        "mesh": task.target_mesh,
        "source": task.source_uri,
    }
    (out / "conversion.json").write_text(json.dumps(report))
    return {"written": str(out / "conversion.json"), "arrays": len(report["arrays"])}


@dataclass
class LiveServer:
    url: str
    database_url: str
    app: Any

    def client(self, *, token: bool = True) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH if token else {}, timeout=30)


ALLOWED_ROOTS = (tempfile.gettempdir(), "s3://bucket")
"""Where the test servers let runs put their roots: pytest's temporary directories, a fake bucket."""


def start_server(
    database_url: str, *, settings: dict[str, Any] | None = None, **app_kw: Any
) -> tuple[LiveServer, Callable[[], None]]:
    """The catalog on a real uvicorn server (port 0); returns it and the function that stops it.
    ``settings`` overrides :class:`CatalogSettings` fields (allowed roots, body limit, hosts)."""
    # the job worker looks for other servers' jobs only when told (its own wake it at once): its
    # polling would otherwise show up in the statement counts of tests/api/test_query_counts.py
    fields: dict[str, Any] = {"allow_roots": ALLOWED_ROOTS, "job_poll_s": 3600.0, **(settings or {})}
    settings_ = CatalogSettings(database_url=database_url, api_token=TOKEN, **fields)
    app = create_app(settings_, **app_kw)
    url, stop = serve_in_thread(app)
    return LiveServer(url, database_url, app), stop


@pytest.fixture(scope="session")
def live(databases: FreshDatabases) -> Iterator[LiveServer]:
    live, stop = start_server(databases.new(), converter=write_conversion)
    yield live
    stop()


@pytest.fixture
def api(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as c:
        yield c


@pytest.fixture
def anon(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client(token=False) as c:
        yield c


def layout(mesh: dict[str, int] | None = None) -> dict[str, Any]:
    """A small registered layout: a tp-split weight, a replicated bias, a tied head."""
    return {
        "mesh": mesh or {"dp": 2, "tp": 2},
        "arrays": {
            "model/emb.weight": {
                "dtype": "bfloat16",
                "shape": [8, 4],
                "layout": {"partition": [["tp"], []]},
                "nbytes": 64,
            },
            "model/ln.bias": {
                "dtype": "float32",
                "shape": [4],
                "layout": {"partition": [], "replicated": ["dp", "tp"]},
                "nbytes": 16,
            },
            "model/head.weight": {
                "dtype": "bfloat16",
                "shape": [8, 4],
                "layout": {"partition": [["tp"], []], "alias_of": "model/emb.weight"},
                "nbytes": 64,
            },
        },
    }


def make_run(api: httpx.Client, root: Path | None = None, **extra: Any) -> str:
    name = unique()
    body: dict[str, Any] = {"name": name, **extra}
    if root is not None:
        body["roots"] = {"local": str(root / name)}
    r = api.post("/api/v1/runs", json=body)
    assert r.status_code == 201, r.text
    return name


def add_checkpoint(
    api: httpx.Client, run: str, step: int, *, root: Path | None = None, commit: bool = True, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"step": step, **extra}
    if root is not None:
        d = root / run / f"step_{step:010d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text("{}")
        body.setdefault("locations", [{"tier": "local", "uri": str(d)}])
    r = api.post(f"/api/v1/runs/{run}/checkpoints", json=body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    if commit:
        r = api.patch(f"/api/v1/checkpoints/{doc['id']}", json={"state": "committed"})
        assert r.status_code == 200, r.text
        doc = r.json()
    return doc
