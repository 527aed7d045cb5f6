"""A staging and a production estafeta pointed at one Redis database, as the real CLI runs
them: the second one, on the prefix the first uses, does not start (a Redis of the test's
own, so that the default prefix `estafeta:` touches no one's keys)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    http_destination,
    hub_config,
    run_cli,
    write_config,
)
from tests.integration.redis_support import RedisServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def deployment(workdir: Path, redis_url: str, **redis: str) -> Path:
    """An estafeta with its own store and spool, configured like any other (`crm`)."""
    workdir.mkdir(exist_ok=True)
    config = hub_config(
        f"sqlite:///{workdir / 'estafeta.db'}",
        workdir,
        destinations=[http_destination("crm", "http://127.0.0.1:9/crm")],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
    )
    config["redis"] = {"url": redis_url, **redis}
    return write_config(workdir / "estafeta.toml", config)


async def test_a_second_deployment_on_one_redis_starts_only_under_its_own_key_prefix(
    tmp_path: Path, estafeta: Estafeta, redis_server: RedisServer
) -> None:
    staging = deployment(tmp_path / "staging", redis_server.url)
    await estafeta.serve(staging, name="staging")
    staging_worker = estafeta.worker(staging, name="staging-worker")  # the same store: fine
    await staging_worker.wait_log("worker_started")

    # Before: production started and shared staging's circuits and rate limits (`crm`,
    # `clinica-sol` are both's), the run below ran until its timeout.
    production = deployment(tmp_path / "production", redis_server.url)
    for command in ("serve", "worker"):
        refused = await run_cli(command, "--config", str(production), cwd=tmp_path, timeout_s=20)
        assert refused.returncode == 2, refused
        assert "error: the Redis key prefix 'estafeta:' is in use" in refused.stderr, refused
        assert "`[redis] key_prefix`" in refused.stderr and "Traceback" not in refused.stderr
        assert '"event":"serving"' not in refused.stderr

    production = deployment(tmp_path / "production", redis_server.url, key_prefix="prod:")
    served = await estafeta.serve(production, name="production")
    assert '"redis_key_prefix_shared"' not in served.stderr()
    assert staging_worker.running()
