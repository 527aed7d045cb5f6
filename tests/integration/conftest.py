"""Fixtures of the integration tests that need Redis (see redis_support.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import IN_CI
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
