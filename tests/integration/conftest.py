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
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.conftest import IN_CI, SINK_SECRET, base_config
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
async def sink() -> AsyncIterator[Sink]:
    """A real HTTP receiver that verifies the deliveries' signatures with SINK_SECRET."""
    receiver = Sink(secret=SINK_SECRET)
    await receiver.start()
    yield receiver
    await receiver.stop()
