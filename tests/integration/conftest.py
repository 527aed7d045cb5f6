"""Fixtures of the integration tests: Redis (see redis_support.py) and the hub's HTTP app with
every provider configured (see providers_support.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from estafeta.api.app import create_app
from estafeta.config import load_config_dict
from estafeta.hub import Hub
from estafeta.ingress.spool import Spool
from estafeta.store import open_store
from estafeta.store.sqlstore import SqlStore
from tests.chaos.conftest import TcpProxy, pg_target, via_proxy
from tests.conftest import IN_CI, base_config, fresh_database
from tests.integration.providers_support import provider_sources
from tests.integration.redis_support import SHARED_REDIS_URL, RedisServer


@pytest.fixture
def shared_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted after.

    Synchronous, so that async fixtures can ask for it with `request.getfixturevalue`.
    """
    with redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5) as client:
        try:
            client.ping()
        except redis.RedisError as exc:
            if IN_CI:
                pytest.fail(f"Redis is required under CI=true and is not reachable: {exc}")
            pytest.skip(f"Redis not reachable: {exc}")
        prefix = f"estafeta-test:{uuid.uuid4().hex}:"
        try:
            yield prefix
        finally:
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def http(store: SqlStore, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    hub = Hub(load_config_dict(data), store)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client
    await hub.close()


@pytest.fixture
async def proxied_hub(tmp_path: Path) -> AsyncIterator[tuple[Hub, TcpProxy]]:
    """A hub whose PostgreSQL is reached through a proxy the test can cut or freeze, with a
    spool, as `estafeta serve` has."""
    proxy = TcpProxy(*pg_target())
    await proxy.start()
    with fresh_database("estafeta_proxied") as database_url:
        config = load_config_dict(base_config(via_proxy(database_url, proxy.port)))
        store = open_store(config.storage.url)
        await store.migrate()
        await store.sync_config(config, 1_700_000_000_000)
        hub = Hub(config, store, spool=Spool(tmp_path / "spool", max_bytes=1 << 20))
        try:
            yield hub, proxy
        finally:
            proxy.thaw()
            await hub.close()
            await store.close()
            await proxy.close()
