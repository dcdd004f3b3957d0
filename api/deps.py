"""Typed FastAPI dependencies: the database session, the bearer-token guard, app services.

Dependencies that do no I/O are ``async``: FastAPI runs a plain ``def`` dependency in the thread
pool, and every hop there queues behind the other requests and contends for the GIL (W4 profile).
Read-only endpoints skip :data:`SessionDep` and hand their whole query to :func:`read`: one hop, one
session, its connection returned before the response is serialised.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ckptd.api.db import Database
from ckptd.api.services.jobs import JobRunner
from ckptd.api.services.retention import StorageDeleter
from ckptd.api.settings import CatalogSettings

_bearer = HTTPBearer(auto_error=False, description="CKPTD_API_TOKEN; required by every mutating endpoint")


async def get_settings(request: Request) -> CatalogSettings:
    settings: CatalogSettings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


T = TypeVar("T")


async def read(request: Request, query: Callable[[Session], T]) -> T:
    """Run the read-only ``query`` in a worker thread with a session of its own (autocommit: it must
    not write), at most ``pool_size`` at a time.

    The limiter keeps read threads no more than the pool's connections: a thread beyond that would
    only wait for a connection, and every extra runnable thread takes GIL turns from the event loop
    that reads requests and sends responses (W4: 40 threads, p99 in seconds).
    """
    db: Database = request.app.state.db
    limiter: anyio.CapacityLimiter = request.app.state.read_limiter

    def run() -> T:
        with db.read_sessions() as session:
            return query(session)

    return await anyio.to_thread.run_sync(run, limiter=limiter)


def get_session(db: Annotated[Database, Depends(get_db)]) -> Iterator[Session]:
    """One session per request: committed when the handler returns, rolled back when it raises."""
    with db.session() as session:
        yield session


async def require_token(
    settings: Annotated[CatalogSettings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse a mutating call without the right bearer token. A server without a configured token
    refuses every mutation (fail closed) unless it was started with ``allow_anonymous_writes``."""
    expected = settings.api_token
    if expected is None:
        if settings.allow_anonymous_writes:
            return
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this catalog has no CKPTD_API_TOKEN; it is read-only")
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def get_jobs(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.jobs
    return runner


async def get_deleter(request: Request) -> StorageDeleter:
    deleter: StorageDeleter = request.app.state.deleter
    return deleter


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
"""Committed before the response is sent (scope="function"): a client that got 201 can read its row."""
DatabaseDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[CatalogSettings, Depends(get_settings)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
DeleterDep = Annotated[StorageDeleter, Depends(get_deleter)]
Authorized = Depends(require_token)
"""``dependencies=[Authorized]`` on every mutating route."""
