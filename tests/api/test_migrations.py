"""Alembic: upgrade from empty, downgrade/upgrade round trip, and models == migrations."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from ckptd.api.db import Database
from ckptd.api.models import Base
from tests.api.conftest import FreshDatabases

HEAD = "0003"
TABLES = {
    "runs",
    "checkpoints",
    "checkpoint_metrics",
    "checkpoint_tags",
    "locations",
    "aliases",
    "rollbacks",
    "conversion_jobs",
    "alembic_version",
}


def test_upgrade_from_empty_and_round_trip(databases: FreshDatabases) -> None:
    db = Database(databases.new())
    assert db.revision() is None
    db.upgrade()
    assert db.revision() == HEAD
    assert set(inspect(db.engine).get_table_names()) == TABLES
    db.downgrade("base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    assert db.revision() is None
    db.upgrade()
    assert db.revision() == HEAD
    db.upgrade()  # idempotent
    db.dispose()


def test_models_and_migrations_agree(databases: FreshDatabases) -> None:
    db = Database(databases.new())
    db.upgrade()
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    db.dispose()
    assert diff == [], f"autogenerate finds differences; write a migration: {diff}"
