"""``ckptd serve``, ``ckptd db upgrade`` and ``ckptd catalog sync``: the catalog's commands.

Thin wrappers over ``ckptd.api``; FastAPI, SQLAlchemy and uvicorn are imported only when one
of these commands runs, so the rest of the CLI stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `ckptd --help` stays fast
if TYPE_CHECKING:
    from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8471


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the REST catalog (FastAPI under uvicorn)")
    _db_option(serve)
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"interface to listen on (default {DEFAULT_HOST})"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--allow-root",
        action="append",
        metavar="PATH_OR_URL",
        help="a prefix run roots may lie under (repeatable; also $CKPTD_ALLOW_ROOTS, separated by "
        "os.pathsep or commas); default: only ~/.local/share/ckptd. GC deletes nothing outside these",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        metavar="N",
        help="refuse larger request bodies with 413 before reading them (default 4 MiB; "
        "$CKPTD_MAX_BODY_BYTES)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="HOST",
        help="answer only requests whose Host header names HOST (repeatable; *.example.com for "
        "subdomains; $CKPTD_ALLOWED_HOSTS): stops DNS rebinding. Default: any host",
    )
    serve.set_defaults(func=_serve)

    db = subparsers.add_parser("db", help="catalog database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="COMMAND")
    db_sub.required = True
    upgrade = db_sub.add_parser("upgrade", help="apply Alembic migrations up to REVISION (default head)")
    _db_option(upgrade)
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(func=_db_upgrade)

    catalog = subparsers.add_parser("catalog", help="catalog operations")
    cat_sub = catalog.add_subparsers(dest="catalog_command", metavar="COMMAND")
    cat_sub.required = True
    sync = cat_sub.add_parser("sync", help="reconcile the catalog from the manifests under a run root URI")
    sync.add_argument("uri", help="run root (local path, file://, s3://, ...)")
    _db_option(sync)
    sync.add_argument("--run", help="run name (default: the last segment of URI)")
    sync.add_argument("--tier", choices=["local", "remote"], help="tier of URI (default: from its scheme)")
    sync.set_defaults(func=_sync)


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="URL",
        help="SQLAlchemy URL (default: $CKPTD_DATABASE_URL, else a SQLite file in ~/.local/share/ckptd)",
    )


def _url(args: argparse.Namespace) -> str:
    from ckptd.api.db import default_url

    return str(args.db) if args.db else default_url()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ckptd.api.settings import CatalogSettings
    from ckptd.format.errors import ConfigError

    # The app factory reads its settings from the environment so that every uvicorn worker builds its
    # own app: the flags travel there. They are validated first, so that a refused flag leaves this
    # process's environment as it was (a caller that catches the error keeps running with it).
    try:
        exports, fields = _exports(args)
        settings = CatalogSettings(**fields)  # what each worker will build: refuse bad values in one line
    except ValueError as e:
        raise ConfigError(str(e)) from e
    os.environ.update(exports)
    print(f"ckptd serve: run roots allowed under {list(settings.allow_roots)}", file=sys.stderr)
    if not os.environ.get("CKPTD_API_TOKEN"):
        print("ckptd serve: CKPTD_API_TOKEN is not set; the catalog is read-only", file=sys.stderr)
    uvicorn.run(
        "ckptd.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        # Longer than clients' idle-connection expiry (httpx: 5 s), so a client never sends a
        # request on a connection the server is closing at that very moment.
        timeout_keep_alive=30,
    )
    return 0


def _exports(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Any]]:
    """The environment variables ``serve``'s flags set, and the ``CatalogSettings`` fields they give
    (parsed as the settings parse the environment; fields without a flag keep their defaults)."""
    from ckptd.api.db import ENV_DATABASE_URL
    from ckptd.api.settings import (
        ENV_ALLOW_ROOTS,
        ENV_ALLOWED_HOSTS,
        ENV_MAX_BODY_BYTES,
        parse_allow_roots,
        parse_allowed_hosts,
    )
    from ckptd.format.errors import ConfigError

    url = _url(args)
    exports: dict[str, str] = {ENV_DATABASE_URL: url}
    fields: dict[str, Any] = {"database_url": url}
    if args.allow_root:
        if any("," in r for r in args.allow_root):
            raise ConfigError("--allow-root: a prefix cannot contain ','")
        exports[ENV_ALLOW_ROOTS] = ",".join(args.allow_root)
        fields["allow_roots"] = parse_allow_roots(exports[ENV_ALLOW_ROOTS])
    if args.max_body_bytes is not None:
        exports[ENV_MAX_BODY_BYTES] = str(args.max_body_bytes)
        fields["max_body_bytes"] = args.max_body_bytes
    if args.allowed_host:
        exports[ENV_ALLOWED_HOSTS] = ",".join(args.allowed_host)
        fields["allowed_hosts"] = parse_allowed_hosts(exports[ENV_ALLOWED_HOSTS])
    return exports, fields


def _db_upgrade(args: argparse.Namespace) -> int:
    from ckptd.api.db import Database

    db = Database(_url(args))
    try:
        db.upgrade(args.revision)
        print(f"catalog schema at revision {db.revision()} ({db.kind})")
    finally:
        db.dispose()
    return 0


def _sync(args: argparse.Namespace) -> int:
    from ckptd.api.db import Database
    from ckptd.api.services.sync import sync_from_storage
    from ckptd.api.uris import check_uri, tier_of
    from ckptd.format.names import check_segment

    root = check_uri(args.uri)
    run = check_segment(args.run or root.rstrip("/").rsplit("/", 1)[-1])
    tier = args.tier or tier_of(root)
    db = Database(_url(args))
    try:
        db.upgrade()
        with db.session() as session:
            report = sync_from_storage(session, run_name=run, tier=tier, root=root)
    finally:
        db.dispose()
    print(json.dumps(report.model_dump(), indent=2))
    return 1 if report.rejected else 0
