"""Configuration of one catalog server (``ckptd serve`` builds it from flags and the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ckptd.api.db import default_url

ENV_API_TOKEN = "CKPTD_API_TOKEN"


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

    def __post_init__(self) -> None:
        if self.api_token is not None and len(self.api_token) < 16:
            raise ValueError("CKPTD_API_TOKEN must be at least 16 characters")
        if not 1 <= self.pool_size <= 200:
            raise ValueError("pool_size must be between 1 and 200")
