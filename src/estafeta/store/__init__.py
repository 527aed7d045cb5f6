"""The store: events, deliveries, attempts and configuration, on SQLite or PostgreSQL."""

from __future__ import annotations

from estafeta.errors import ConfigError, ConfigIssue
from estafeta.store.postgres_connect import postgres_engine_args
from estafeta.store.sqlstore import SqlStore

_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


def engine_url(url: str) -> str:
    """The SQLAlchemy async URL for a configured one: `sqlite:///x.db`, `postgresql://…`
    (without what goes to asyncpg as `connect_args`: store/postgres_connect.py)."""
    if url.startswith(_POSTGRES_SCHEMES):
        return postgres_engine_args(url)[0]
    if url.startswith("sqlite+aiosqlite://"):
        return url
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url.removeprefix("sqlite://")
    raise ConfigError(
        [ConfigIssue("storage.url", f"unsupported database URL scheme in {url.split(':')[0]!r}")]
    )


def open_store(url: str) -> SqlStore:
    """The store for a database URL (SQLite or PostgreSQL)."""
    if url.startswith(_POSTGRES_SCHEMES):
        from estafeta.store.postgres import PostgresStore

        return PostgresStore.from_url(url)
    from estafeta.store.sqlite import SqliteStore

    return SqliteStore.from_url(engine_url(url))


__all__ = ["SqlStore", "engine_url", "open_store"]
