"""``ckptd.api``: the REST catalog of runs and checkpoints (FastAPI, SQLAlchemy 2, Alembic).

* ``ckptd.api.app.create_app(settings)`` — the app factory (``ckptd serve`` runs it under uvicorn);
* ``ckptd.api.services`` — keyword-only service functions shared by the routes and the CLI;
* ``ckptd.api.client.CatalogClient`` — a re-export of :mod:`ckptd.wire.client`, the HTTP client
  the snapshot engine uses (httpx only; it never raises into training).

Nothing is imported here, so ``import ckptd.api.client`` does not pull in FastAPI or SQLAlchemy
(tests/cli/test_import_budget.py pins it).
Migrations live in the repository's ``migrations/`` folder; see ``ckptd.api.db`` for how they
are found (``CKPTD_MIGRATIONS_DIR`` overrides).
"""
