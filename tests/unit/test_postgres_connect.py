"""How a configured PostgreSQL URL is made into SQLAlchemy's URL and asyncpg's connect
arguments (store/postgres_connect.py): libpq's spellings translated, the rest as written."""

from __future__ import annotations

from typing import Any

import pytest

from estafeta.store.postgres_connect import postgres_engine_args

AS_WRITTEN = "postgresql+asyncpg://hub:p%40ss%2Fw0rd@db.example:5432/estafeta"


@pytest.mark.parametrize(
    ("url", "engine_url", "connect_args"),
    [
        ("postgres://hub:p%40ss%2Fw0rd@db.example:5432/estafeta", AS_WRITTEN, {}),
        ("postgresql://hub:p%40ss%2Fw0rd@db.example:5432/estafeta", AS_WRITTEN, {}),
        (AS_WRITTEN, AS_WRITTEN, {}),
        (
            "postgresql://postgres.abcd@pooler.example:6543/postgres?sslmode=require",
            "postgresql+asyncpg://postgres.abcd@pooler.example:6543/postgres?ssl=require",
            {},
        ),
        (
            "postgresql://u@db/e?application_name=estafeta&options=-c%20jit%3Doff",
            "postgresql+asyncpg://u@db/e",
            {"server_settings": {"application_name": "estafeta", "options": "-c jit=off"}},
        ),
        (
            "postgresql://u@db/e?connect_timeout=10&statement_cache_size=0&target_session_attrs=primary",
            "postgresql+asyncpg://u@db/e?target_session_attrs=primary",
            {"timeout": 10.0, "statement_cache_size": 0},
        ),
        (  # libpq's socket directory as the host
            "postgresql://u@%2Fvar%2Frun%2Fpostgresql/e",
            "postgresql+asyncpg://u@/e?host=%2Fvar%2Frun%2Fpostgresql",
            {},
        ),
        (
            "postgresql://u@%2Fvar%2Frun%2Fpostgresql:5433/e",
            "postgresql+asyncpg://u@/e?host=%2Fvar%2Frun%2Fpostgresql&port=5433",
            {},
        ),
        (  # as config.example.toml and the docs write a socket: as written
            "postgresql:///e?host=/var/run/postgresql&user=hub",
            "postgresql+asyncpg:///e?host=%2Fvar%2Frun%2Fpostgresql&user=hub",
            {},
        ),
        (  # libpq's host lists, each host with its port (the default where none is given)
            "postgresql://u@h1,h2:5433/e",
            "postgresql+asyncpg://u@/e?host=h1%3A5432&host=h2%3A5433",
            {},
        ),
        (
            "postgresql://u@/e?host=h1&host=h2",
            "postgresql+asyncpg://u@/e?host=h1%3A5432&host=h2%3A5432",
            {},
        ),
        (
            "postgresql:///e?host=h1,h2&port=6000,6001",
            "postgresql+asyncpg:///e?host=h1%3A6000&host=h2%3A6001",
            {},
        ),
        (
            "postgresql:///e?host=h1,h2&port=6000",
            "postgresql+asyncpg:///e?host=h1%3A6000&host=h2%3A6000",
            {},
        ),
        (  # libpq: the port written after the URL's (empty) host serves `?host=`'s hosts
            "postgresql://u@:6000/e?host=h1,h2",
            "postgresql+asyncpg://u@/e?host=h1%3A6000&host=h2%3A6000",
            {},
        ),
        (
            "postgresql://u@db:6000/e?host=h1&host=h2",
            "postgresql+asyncpg://u@/e?host=h1%3A6000&host=h2%3A6000",
            {},
        ),
    ],
)
def test_engine_url_and_connect_args(
    url: str, engine_url: str, connect_args: dict[str, Any]
) -> None:
    assert postgres_engine_args(url) == (engine_url, connect_args)
