"""The store: events, deliveries, attempts and configuration, on SQLite or PostgreSQL."""

from __future__ import annotations

import re

from estafeta.errors import ConfigError, ConfigIssue
from estafeta.store.sqlstore import SqlStore


def engine_url(url: str) -> str:
    """The SQLAlchemy async URL for a configured one: `sqlite:///x.db`, `postgresql://…`."""
    if url.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
        # libpq's `sslmode` is asyncpg's `ssl` (same values); SQLAlchemy passes the query
        # to asyncpg.connect() as keywords, which has no `sslmode`.
        url = re.sub(r"([?&])sslmode=", r"\1ssl=", url)
    if url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return url
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url.removeprefix("sqlite://")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    raise ConfigError(
        [ConfigIssue("storage.url", f"unsupported database URL scheme in {url.split(':')[0]!r}")]
    )


def open_store(url: str) -> SqlStore:
    """The store for a database URL (SQLite or PostgreSQL)."""
    full = engine_url(url)
    if full.startswith("sqlite"):
        from estafeta.store.sqlite import SqliteStore

        return SqliteStore.from_url(full)
    from estafeta.store.postgres import PostgresStore

    return PostgresStore.from_url(full)


__all__ = ["SqlStore", "engine_url", "open_store"]
