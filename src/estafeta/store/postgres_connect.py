"""How estafeta connects to PostgreSQL: a URL as hosting panels and libpq's documentation
write it, made into what SQLAlchemy and asyncpg take, and the check for a pooler that
asyncpg's statement cache cannot work behind.

SQLAlchemy passes a URL's query to `asyncpg.connect()` as keywords, so only asyncpg's own
names may stay in it; libpq's other spellings are translated here, and the config validator
(config/models.py) refuses every parameter neither knows:

* `sslmode` is asyncpg's `ssl` (same values);
* `application_name` and `options` are startup parameters (asyncpg's `server_settings`);
* `connect_timeout` (seconds) is asyncpg's `timeout`;
* `statement_cache_size` (asyncpg's own name; `0` behind PgBouncer in transaction mode) is
  a number, where the query would pass it as a string;
* libpq's host lists (`h1,h2:5433`) and a Unix socket's directory written as the host,
  percent-encoded (`%2Fvar%2Frun%2Fpostgresql`), become asyncpg's `host` parameters, which
  SQLAlchemy's URL parser would otherwise take for a host name (a DNS failure at start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from sqlalchemy.ext.asyncio import AsyncEngine

from estafeta.errors import StoreError
from estafeta.store.base import POOLER_HINT, statement_cache_lost, store_errors

DEFAULT_PORT = 5432
# Startup parameters the server applies to the session (`server_settings`).
_SERVER_SETTINGS = ("application_name", "options")


def _split(url: str) -> tuple[str, str, str, str]:
    """`scheme`, `user:password` (or ""), the host part, and the rest (`/db?query`)."""
    scheme, _, after = url.partition("://")
    end = min((i for i in (after.find("/"), after.find("?")) if i >= 0), default=len(after))
    # The password runs to the last `@` before the path (config/models.py refuses a `/` or
    # `?` in it unencoded).
    netloc, rest = after[:end], after[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    return scheme, userinfo + at, hosts, rest


def _hosts(netloc_hosts: str, query: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """asyncpg's `host` (and `port`) parameters for every host the URL names, when it names
    several (libpq: `h1,h2:5433`, `?host=h1,h2&port=5432,5433`, `?host=h1&host=h2`) or a
    socket directory as its host; None for one host written as SQLAlchemy reads it."""
    listed = [h for key, v in query if key == "host" for h in v.split(",")]
    ports = [p for key, v in query if key == "port" for p in v.split(",")]
    if not listed:
        if "," not in netloc_hosts and not netloc_hosts.lower().startswith("%2f"):
            return None
        listed = [unquote(h) for h in netloc_hosts.split(",")]
        if len(listed) == 1:  # a socket directory, and maybe its port
            directory, _, port = listed[0].partition(":")
            return [("host", directory)] + ([("port", port)] if port else [])
    elif len(listed) == 1:
        return None  # `?host=…` (a socket directory, or a name) with `?port=`: as written
    elif not ports:  # libpq: the URL's own port (`//u@:6000/db?host=h1,h2`) serves them all
        _host, colon, port = netloc_hosts.rpartition(":")
        ports = [port] if colon and port.isdigit() and "," not in netloc_hosts else []
    found = []
    for i, host in enumerate(listed):
        name, colon, port = host.rpartition(":") if not host.startswith("/") else ("", "", "")
        if not colon:
            name, port = host, ""
        given = ports[i] if len(ports) == len(listed) else ports[0] if len(ports) == 1 else ""
        found.append(("host", f"{name}:{port or given or DEFAULT_PORT}"))
    return found


def postgres_engine_args(url: str) -> tuple[str, dict[str, Any]]:
    """The `postgresql+asyncpg://` URL for SQLAlchemy and the `connect_args` taken out of
    its query, for a validated PostgreSQL URL (config/models.py)."""
    _scheme, userinfo, netloc_hosts, rest = _split(url)
    path, _, query_text = rest.partition("?")
    query = parse_qsl(query_text, keep_blank_values=True)
    hosts = _hosts(netloc_hosts, query)
    kept = [] if hosts is None else list(hosts)
    connect_args: dict[str, Any] = {}
    settings: dict[str, str] = {}
    for key, value in query:
        if key in _SERVER_SETTINGS:
            settings[key] = value
        elif key == "connect_timeout":
            connect_args["timeout"] = float(value)
        elif key == "statement_cache_size":
            connect_args["statement_cache_size"] = int(value)
        elif key == "sslmode":
            kept.append(("ssl", value))
        elif hosts is None or key not in ("host", "port"):
            kept.append((key, value))
    if settings:
        connect_args["server_settings"] = settings
    tail = f"?{urlencode(kept)}" if kept else ""
    host_part = "" if hosts is not None else netloc_hosts
    return f"postgresql+asyncpg://{userinfo}{host_part}{path}{tail}", connect_args


async def refuse_transaction_pooling(engine: AsyncEngine, connect_args: Mapping[str, Any]) -> None:
    """Refuse to start on a pooler in transaction mode (PgBouncer's `pool_mode =
    transaction`) while asyncpg's statement cache is on: its named prepared statements
    are kept by one server connection and the pooler runs the next statement on any, so
    statements failed at random, "prepared statement … does not exist" or "already exists"
    (even `migrate`, run twice). Two sessions of our own open at once that share a server
    backend, or such a failure, show one; a false "no" (another client took the backend
    meanwhile) leaves the runtime error, which says the same (store/base.py)."""
    if connect_args.get("statement_cache_size") == 0:
        return
    with store_errors():
        try:
            async with engine.connect() as first, engine.connect() as second:
                backends = []
                for conn in (first, second):
                    driver: Any = (await conn.get_raw_connection()).driver_connection
                    # Outside a transaction, so that the pooler may hand the backend over.
                    backends.append(await driver.fetchval("SELECT pg_backend_pid()"))
                # Closed, not pooled: two idle sessions kept from start-up would each fail
                # one request after the server ended them (a restart, a failover).
                await first.invalidate()
                await second.invalidate()
        except Exception as exc:
            if statement_cache_lost(exc):
                raise StoreError(f"the store failed: {POOLER_HINT}") from None
            raise
    if backends[0] == backends[1]:
        raise StoreError(f"the store failed: {POOLER_HINT}")
