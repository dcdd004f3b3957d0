"""Configuration of one catalog server (``ckptd serve`` builds it from flags and the environment).

Every field has an environment variable, because ``ckptd serve`` starts the app through uvicorn's
factory (each worker process builds its own app from the environment).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.api.db import DEFAULT_DB_PATH, default_url

ENV_API_TOKEN = "CKPTD_API_TOKEN"
ENV_ALLOW_ROOTS = "CKPTD_ALLOW_ROOTS"
ENV_MAX_BODY_BYTES = "CKPTD_MAX_BODY_BYTES"
ENV_ALLOWED_HOSTS = "CKPTD_ALLOWED_HOSTS"
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
"""Room for a registration with the largest layout the catalog accepts (20,000 arrays, ~3.6 MB)."""
# os.pathsep is ':' on POSIX, which also starts '://' in a URI: split on it only where no '//' follows
_ROOT_SEPARATORS = (
    re.compile(r",|:(?!//)") if os.pathsep == ":" else re.compile(rf",|{re.escape(os.pathsep)}")
)


def data_dir() -> Path:
    """The server's own data directory (where the default SQLite catalog lives)."""
    return DEFAULT_DB_PATH.expanduser().parent


def parse_allow_roots(value: str) -> tuple[str, ...]:
    """``CKPTD_ALLOW_ROOTS``: prefixes separated by ``os.pathsep`` or commas, each checked."""
    from ckptd.api.roots import check_allowed_root

    return tuple(check_allowed_root(p) for p in _ROOT_SEPARATORS.split(value) if p.strip())


def _default_allow_roots() -> tuple[str, ...]:
    env = os.environ.get(ENV_ALLOW_ROOTS)
    return parse_allow_roots(env) if env else (str(data_dir()),)


def _default_max_body() -> int:
    env = os.environ.get(ENV_MAX_BODY_BYTES)
    return int(env) if env else DEFAULT_MAX_BODY_BYTES


def parse_allowed_hosts(value: str) -> tuple[str, ...]:
    """``CKPTD_ALLOWED_HOSTS``: host names separated by commas."""
    return tuple(h.strip() for h in value.split(",") if h.strip())


def _default_hosts() -> tuple[str, ...]:
    return parse_allowed_hosts(os.environ.get(ENV_ALLOWED_HOSTS, ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogSettings:
    database_url: str = field(default_factory=default_url)
    """SQLAlchemy URL; ``CKPTD_DATABASE_URL`` or a SQLite file under ``~/.local/share/ckptd``."""
    api_token: str | None = field(default_factory=lambda: os.environ.get(ENV_API_TOKEN) or None)
    """Bearer token every mutating request must carry (``CKPTD_API_TOKEN``)."""
    allow_anonymous_writes: bool = False
    """Accept mutations without a token when none is configured (local experiments only)."""
    migrate_on_start: bool = True
    """Apply Alembic migrations when the app starts."""
    pool_size: int = 10
    allow_roots: tuple[str, ...] = field(default_factory=_default_allow_roots)
    """Prefixes (paths or URIs) every run root must lie under (``CKPTD_ALLOW_ROOTS``, ``--allow-root``);
    by default only :func:`data_dir`. They bound what GC may ever delete."""
    max_body_bytes: int = field(default_factory=_default_max_body)
    """Larger request bodies are refused with 413 before they are read (``CKPTD_MAX_BODY_BYTES``)."""
    allowed_hosts: tuple[str, ...] = field(default_factory=_default_hosts)
    """When not empty, requests whose ``Host`` is not one of these get 400 (DNS rebinding;
    ``CKPTD_ALLOWED_HOSTS``, ``--allowed-host``); ``*.example.com`` matches subdomains."""
    job_poll_s: float = 2.0
    """How often the job worker looks for queued jobs that another server process created."""
    job_lease_s: float = 60.0
    """A running job whose server has not renewed its claim for this long is failed (its server died)."""

    def __post_init__(self) -> None:
        from ckptd.api.roots import check_allowed_root

        if self.api_token is not None and len(self.api_token) < 16:
            raise ValueError("CKPTD_API_TOKEN must be at least 16 characters")
        if not 1 <= self.pool_size <= 200:
            raise ValueError("pool_size must be between 1 and 200")
        if not self.allow_roots:
            raise ValueError("allow_roots must name at least one prefix")
        object.__setattr__(self, "allow_roots", tuple(check_allowed_root(r) for r in self.allow_roots))
        if not 1024 <= self.max_body_bytes <= 2**30:
            raise ValueError("max_body_bytes must be between 1 KiB and 1 GiB")
        if not 0.01 <= self.job_poll_s <= 3600 or not 0.1 <= self.job_lease_s <= 86_400:
            raise ValueError("job_poll_s or job_lease_s out of range")
