"""The catalog's FastAPI application factory.

``create_app(settings)`` builds one app with its own :class:`~ckptd.api.db.Database` (no
module-global engine), applies the migrations, and maps every domain error to HTTP in one
exception handler. Routes live under ``/api/v1`` (pinned); ``/healthz``, ``/metrics``,
``/openapi.json`` and the web page at ``/`` sit at the root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ckptd.api.db import Database
from ckptd.api.deps import DatabaseDep, SessionDep
from ckptd.api.errors import (
    CatalogError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    StorageDeleteError,
)
from ckptd.api.limits import BodyLimitMiddleware
from ckptd.api.metrics import MetricsMiddleware, RequestMetrics, catalog_gauges
from ckptd.api.routes import checkpoints as checkpoint_routes
from ckptd.api.routes import runs as run_routes
from ckptd.api.schemas import Health
from ckptd.api.services.jobs import Converter, JobRunner, default_converter
from ckptd.api.services.retention import StorageDeleter, fsspec_delete
from ckptd.api.settings import CatalogSettings
from ckptd.format.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    LayoutError,
    MetadataError,
    StorageError,
)

API_PREFIX = "/api/v1"
# resolve(): a strict editable install links each file of the package; StaticFiles refuses to serve a
# link that leads outside its directory, so serve the folder the links point into (a no-op in a wheel).
STATIC_DIR = Path(__file__).resolve().parent / "static"


def http_status(error: Exception) -> int:
    """The one place domain errors become HTTP statuses."""
    if isinstance(error, NotFoundError | CheckpointNotFoundError):
        return 404
    if isinstance(error, ConflictError | IntegrityError):
        return 409
    if isinstance(error, InvalidRequestError | MetadataError | LayoutError | ConfigError):
        return 422
    if isinstance(error, StorageDeleteError | StorageError):
        return 502
    if isinstance(error, OperationalError):
        return 503
    return 500


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status = http_status(exc)
    detail = str(exc) if status != 503 else "the catalog database is unavailable"
    if isinstance(exc, IntegrityError):
        detail = "the request conflicts with a concurrent change; retry"
    return JSONResponse({"detail": detail, "error": type(exc).__name__}, status_code=status)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 without echoing the input: a hostile body (``1e999``, huge strings) must not come back, and
    non-finite numbers in it would make FastAPI's default handler fail with a 500."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:500], "type": e.get("type")}
        for e in errors
    ]
    return JSONResponse({"detail": detail, "error": "RequestValidationError"}, status_code=422)


def create_app(
    settings: CatalogSettings | None = None,
    *,
    converter: Converter = default_converter,
    deleter: StorageDeleter = fsspec_delete,
) -> FastAPI:
    settings = settings or CatalogSettings()
    db = Database(settings.database_url, pool_size=settings.pool_size)
    if settings.migrate_on_start:
        db.upgrade()
    runner = JobRunner(db, converter, poll_s=settings.job_poll_s, lease_s=settings.job_lease_s)
    app = FastAPI(
        title="ckptd catalog",
        version="1",
        description="Runs and checkpoints of PyTorch distributed training: query, restore, roll back.",
        lifespan=_lifespan(settings, db, runner),
    )
    app.state.settings = settings
    app.state.db = db
    app.state.jobs = runner
    app.state.deleter = deleter
    request_metrics = RequestMetrics()
    # the last added runs first: metrics see every answer, the guards run before any routing
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(MetricsMiddleware, metrics=request_metrics, prefix=API_PREFIX)
    for error in (CheckpointError, IntegrityError, OperationalError):
        app.add_exception_handler(error, _domain_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.include_router(run_routes.router, prefix=API_PREFIX)
    app.include_router(checkpoint_routes.router, prefix=API_PREFIX)
    _add_system_routes(app, request_metrics)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _lifespan(
    settings: CatalogSettings, db: Database, runner: JobRunner
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the job runner with the app; stop it and close the database pool at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # read-only endpoints run at most pool_size queries at a time (ckptd.api.deps.read)
        app.state.read_limiter = anyio.CapacityLimiter(settings.pool_size)
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            db.dispose()

    return lifespan


def _add_system_routes(app: FastAPI, request_metrics: RequestMetrics) -> None:
    """``/healthz``, ``/metrics`` and the web page ``/``."""

    @app.get("/healthz", response_model=Health, tags=["system"])
    def healthz(session: SessionDep, database: DatabaseDep) -> Health:
        session.execute(text("SELECT 1"))
        return Health(status="ok", database=database.kind, schema_revision=database.revision())

    @app.get("/metrics", response_class=PlainTextResponse, tags=["system"])
    def metrics(session: SessionDep) -> PlainTextResponse:
        lines = request_metrics.render() + catalog_gauges(session)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


__all__ = ["API_PREFIX", "CatalogError", "create_app", "http_status"]
