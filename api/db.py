"""Database engines, sessions and schema migrations of the catalog.

The catalog keeps no module-global engine: :class:`Database` is created by the app factory,
the CLI or a test, and owns one engine and its session factory.

Migrations live in the repository's top-level ``migrations/`` folder (Alembic), which the wheel
ships as the package data ``ckptd/migrations`` (and the strict editable install links there too).
``CKPTD_MIGRATIONS_DIR`` overrides where they are read from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from ckptd.api.errors import CatalogError

DEFAULT_DB_PATH = Path("~/.local/share/ckptd/catalog.db")
ENV_DATABASE_URL = "CKPTD_DATABASE_URL"
ENV_MIGRATIONS_DIR = "CKPTD_MIGRATIONS_DIR"


def default_url() -> str:
    """``CKPTD_DATABASE_URL`` when set, else a SQLite file under the user's data directory."""
    url = os.environ.get(ENV_DATABASE_URL)
    if url:
        return url
    path = DEFAULT_DB_PATH.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` URLs and use the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def migrations_dir() -> Path:
    """The Alembic script directory: ``CKPTD_MIGRATIONS_DIR`` when set, else the package data."""
    env = os.environ.get(ENV_MIGRATIONS_DIR)
    if env:
        if not (Path(env) / "env.py").is_file():
            raise CatalogError(f"{ENV_MIGRATIONS_DIR}={env} holds no Alembic env.py")
        return Path(env)
    # Alembic reads scripts from a directory, so the package must be installed unzipped.
    shipped = resources.files("ckptd") / "migrations"
    if isinstance(shipped, Path) and (shipped / "env.py").is_file():
        return shipped
    raise CatalogError(
        f"Alembic migrations not found in the installed package ({shipped}); set {ENV_MIGRATIONS_DIR}"
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """``pool_size`` connections kept open, as many again opened for bursts (and closed after)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        in_memory = make_url(url).database in (None, "", ":memory:")  # a single-connection pool
        pool = {} if in_memory else {"pool_size": pool_size, "max_overflow": pool_size}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


class Database:
    """One engine and its sessions; ``upgrade()`` brings the schema to the newest revision."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, pool_size=pool_size)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"))
        """Sessions for reads only: no BEGIN and COMMIT round trips. A read of several statements sees
        what each statement sees under READ COMMITTED (PostgreSQL's default) anyway."""

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self.sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir()))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        command.upgrade(self.alembic_config(), revision)

    def downgrade(self, revision: str) -> None:
        command.downgrade(self.alembic_config(), revision)

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            rev: str | None = MigrationContext.configure(conn).get_current_revision()
            return rev

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def kind(self) -> str:
        return self.engine.dialect.name
