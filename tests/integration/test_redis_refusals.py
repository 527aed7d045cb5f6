"""A Redis that answers but refuses what estafeta sends: one outage, logged once with its
reason, until Redis takes our writes again.

Full (`maxmemory` under `noeviction`: OOM), a read-only replica after a failover (READONLY),
a failing snapshot (MISCONF), an ACL user without write permission (NOPERM) or with a
password changed (WRONGPASS). Reads, and a PING but under MISCONF, still pass: a try that
PINGed ended each outage, and the next write began another, `redis_unavailable` and
`redis_available` every 5 s per component, and the circuits' copy read back from Redis at
each, which forgot every failure counted meanwhile (a failing destination's circuit never
opened). Each state is made on a `redis-server` of the test's own, never the shared one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import load_config_dict
from estafeta.delivery.circuit import Circuit
from estafeta.delivery.circuit_store import FallbackCircuitStore, RedisCircuitStore
from estafeta.delivery.throttle import DestinationThrottle
from estafeta.hub import Hub
from estafeta.ingress.ratelimit import TenantRateLimiter
from estafeta.observability.monitor import AlertMonitor
from estafeta.redis_client import connect_redis
from estafeta.store.sqlstore import SqlStore
from tests.acceptance.conftest import free_port
from tests.clocks import ManualClock
from tests.conftest import base_config
from tests.integration.redis_support import RedisServer, fill_past_maxmemory

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "estafeta", "s3cret-Pw-9"  # no log line may show the password
ADMIN = {"authorization": "Bearer test-admin-key"}
RETRY_S = 5.0


@dataclass
class Refusal:
    """How to make a Redis refuse our writes (`apply`) and take them again (`mend`)."""

    apply: Callable[[redis.Redis, Path], None]
    mend: Callable[[redis.Redis], object]
    reason: str  # in `redis_unavailable`'s reason


def fill(admin: redis.Redis, _directory: Path) -> None:
    fill_past_maxmemory(admin)


def replica(admin: redis.Redis, _directory: Path) -> None:
    admin.replicaof("127.0.0.1", free_port())  # a primary that never answers


def unsaveable(admin: redis.Redis, directory: Path) -> None:
    shutil.rmtree(directory)  # its snapshot cannot be written any more
    admin.config_set("save", "3600 1")
    admin.bgsave()
    deadline = time.monotonic() + 10
    while admin.info("persistence")["rdb_last_bgsave_status"] != "err":
        assert time.monotonic() < deadline, "the snapshot did not fail"
        time.sleep(0.02)  # bounded: the fork's outcome


def read_only_user(admin: redis.Redis, _directory: Path) -> None:
    admin.acl_setuser(USER, enabled=True, categories=["-@write"])


def password_changed(admin: redis.Redis, _directory: Path) -> None:
    admin.acl_setuser(USER, enabled=True, reset_passwords=True, passwords=["+another-one"])
    admin.client_kill_filter(user=USER)  # as a restart would: each connection logs in again


REFUSALS = {
    "oom": Refusal(fill, lambda a: a.config_set("maxmemory", 0), "out of memory"),
    "readonly": Refusal(replica, lambda a: a.replicaof("NO", "ONE"), "read-only replica"),
    "misconf": Refusal(unsaveable, lambda a: a.config_set("save", ""), "MISCONF"),
    "noperm": Refusal(
        read_only_user,
        lambda a: a.acl_setuser(USER, enabled=True, categories=["+@write"]),
        "NOPERM",
    ),
    "wrongpass": Refusal(
        password_changed,
        lambda a: a.acl_setuser(
            USER, enabled=True, reset_passwords=True, passwords=[f"+{PASSWORD}"]
        ),
        "WRONGPASS",
    ),
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, with a user `estafeta` (every permission) for the hub,
    in a directory of its own (MISCONF removes it)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    made = RedisServer(directory)
    made.start()
    try:
        with redis.Redis(port=made.port) as admin:
            admin.acl_setuser(
                USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"]
            )
        yield made
    finally:
        made.kill()


def server_directory(server: RedisServer) -> Path:
    return Path(server._directory)


def as_user(server: RedisServer) -> str:
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def components(
    server: RedisServer,
) -> AsyncIterator[tuple[DestinationThrottle, FallbackCircuitStore, Clock]]:
    """The worker's two users of Redis, as `estafeta`, on one monotonic clock of the test's."""
    clock = Clock()
    throttle = DestinationThrottle(
        {"billing": "100/minute"}, redis_url=as_user(server), monotonic=clock, retry_s=RETRY_S
    )
    client = connect_redis(as_user(server))
    circuits = FallbackCircuitStore(RedisCircuitStore(client), retry_s=RETRY_S, monotonic=clock)
    try:
        yield throttle, circuits, clock
    finally:
        await throttle.aclose()
        await circuits.aclose()
        await client.aclose()


def one_more_failure(c: Circuit) -> Circuit:
    return Circuit(consecutive_failures=c.consecutive_failures + 1)


@pytest.mark.parametrize("kind", REFUSALS)
async def test_a_redis_refusing_our_writes_is_one_outage_until_it_takes_them_again(
    server: RedisServer,
    components: tuple[DestinationThrottle, FallbackCircuitStore, Clock],
    kind: str,
) -> None:
    throttle, circuits, clock = components
    refusal = REFUSALS[kind]
    admin = redis.Redis(port=server.port)
    with capture_logs() as logs:
        assert await throttle.acquire("billing") is None  # counted in Redis
        refusal.apply(admin, server_directory(server))
        sent = 1
        for _ in range(4):  # the first finds it; then a try (and a trial) every RETRY_S
            assert await throttle.acquire("billing") is None
            await circuits.update("crm", one_more_failure)
            await circuits.get_all()  # as /health and the alert monitor read them
            await throttle._failover.probed()
            await circuits._failover.probed()
            sent += 1
            clock.now += RETRY_S + 0.1
        assert not throttle.using_redis and not circuits.using_primary
        # Not forgotten by a read of Redis's stale copy: the circuit opens in time.
        assert (await circuits.get_all())["crm"].consecutive_failures == 4
        # That read was due for a try of Redis: let it fail before Redis is mended, or it
        # may pass after and let the first update below go to Redis.
        await circuits._failover.probed()
        clock.now += RETRY_S + 0.1

        refusal.mend(admin)
        for _ in range(2):  # the try passes, then the next call does
            assert await throttle.acquire("billing") is None
            await circuits.update("crm", one_more_failure)
            await throttle._failover.probed()
            await circuits._failover.probed()
            sent += 1
        assert throttle.using_redis and circuits.using_primary
        # Redis is the truth again: its copy, with only the failure just written there.
        assert await circuits.update("crm", one_more_failure) == (
            Circuit(consecutive_failures=1),
            Circuit(consecutive_failures=2),
        )
    # Every send counted once in Redis: those of the outage added when it ended.
    other = DestinationThrottle({"billing": "100/minute"}, redis_url=as_user(server))
    try:
        assert await other.room("billing") == 100 - sent
    finally:
        await other.aclose()
    admin.close()

    redis_events = [(e["component"], e["event"]) for e in logs if e["event"].startswith("redis_")]
    assert sorted(redis_events) == [
        ("circuit_store", "redis_available"),
        ("circuit_store", "redis_unavailable"),
        ("throttle", "redis_available"),
        ("throttle", "redis_unavailable"),
    ]
    for line in (e for e in logs if e["event"] == "redis_unavailable"):
        assert refusal.reason in line["reason"], line
    assert PASSWORD not in repr(logs)


async def test_a_command_the_acl_user_may_not_run_keeps_the_outage_though_writes_pass(
    server: RedisServer,
    components: tuple[DestinationThrottle, FallbackCircuitStore, Clock],
) -> None:
    """The throttle's scripts (EVALSHA) refused, SET allowed: the try that writes passes,
    the next send's script does not, and that is no new outage."""
    throttle, _circuits, clock = components
    admin = redis.Redis(port=server.port)
    with capture_logs() as logs:
        admin.acl_setuser(USER, enabled=True, categories=["-@scripting"])
        for _ in range(4):
            assert await throttle.acquire("billing") is None
            await throttle._failover.probed()
            clock.now += RETRY_S + 0.1
        assert not throttle.using_redis
        admin.acl_setuser(USER, enabled=True, categories=["+@scripting"])
        for _ in range(2):
            assert await throttle.acquire("billing") is None
            await throttle._failover.probed()
        assert throttle.using_redis
    admin.close()
    events = [e["event"] for e in logs if e["event"].startswith("redis_")]
    assert events == ["redis_unavailable", "redis_available"]
    assert "NOPERM" in logs[0]["reason"], logs[0]


async def test_a_read_that_passes_where_our_writes_are_refused_ends_no_outage(
    server: RedisServer,
    components: tuple[DestinationThrottle, FallbackCircuitStore, Clock],
) -> None:
    """Reads of every key allowed, writes of the try's key only: the try passes and a read
    (a lease's `room`, /health's circuits, an update that writes nothing) would pass too,
    but our writes still fail. A read taking the trial ended the outage, read Redis's stale
    circuits back over the failures counted meanwhile, and the next write began another
    outage, every 5 s."""
    throttle, circuits, clock = components
    admin = redis.Redis(port=server.port)
    with capture_logs() as logs:
        admin.acl_setuser(USER, enabled=True, reset_keys=True, keys=["%R~*", "%RW~estafeta:probe"])
        for _ in range(4):
            assert await throttle.acquire("billing") is None
            await circuits.update("crm", one_more_failure)
            await throttle._failover.probed()
            await circuits._failover.probed()
            # Read between the try and the next write, as a lease and /health do, and a
            # healthy destination's success changes nothing of its circuit: no write.
            assert await throttle.room("billing") is not None
            await circuits.get_all()
            await circuits.update("billing", lambda c: c)
            clock.now += RETRY_S + 0.1
        assert not throttle.using_redis and not circuits.using_primary
        assert (await circuits.get_all())["crm"].consecutive_failures == 4
    admin.close()
    events = sorted((e["component"], e["event"]) for e in logs if e["event"].startswith("redis_"))
    assert events == [("circuit_store", "redis_unavailable"), ("throttle", "redis_unavailable")]


async def test_health_and_the_alert_say_redis_refuses_writes_though_it_answers_ping(
    database_url: str, store: SqlStore, server: RedisServer
) -> None:
    config = load_config_dict({**base_config(database_url), "redis": {"url": as_user(server)}})
    clock = ManualClock()
    hub = Hub(config, store, clock)
    assert hub.redis is not None
    monitor = AlertMonitor(
        store, threshold=1000, redis=hub.redis, redis_down_after_s=60, clock=clock
    )
    admin = redis.Redis(port=server.port)
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            with capture_logs() as logs:
                fill(admin, server_directory(server))
                await monitor.check()
                clock.now += 60_000
                await monitor.check()
                r = await http.get("/health/detailed", headers=ADMIN)
                admin.config_set("maxmemory", 0)
                await monitor.check()
    finally:
        await hub.close()
        admin.close()
    assert (r.status_code, r.json()["status"]) == (200, "degraded")
    check = r.json()["checks"]["redis"]
    assert check["status"] == "unavailable" and "out of memory" in check["reason"], check
    alerts = [(e["event"], e.get("reason", "")) for e in logs if e.get("alert") == "redis_down"]
    assert [event for event, _ in alerts] == ["alert_fired", "alert_resolved"]
    assert "out of memory" in alerts[0][1]


async def test_scripts_flushed_mid_run_are_loaded_again_without_an_outage(
    server: RedisServer,
    components: tuple[DestinationThrottle, FallbackCircuitStore, Clock],
) -> None:
    """SCRIPT FLUSH (or a Redis restarted in between): the throttle's and the inbound
    limit's next EVALSHA finds no script; each loads it again and counts in Redis."""
    throttle, _circuits, _clock = components
    client = connect_redis(as_user(server))
    config = load_config_dict(
        {"tenants": [{"id": "acme", "name": "Acme", "ingress_rate_limit": "10/minute"}]}
    )
    limiter = TenantRateLimiter(config, redis=client, clock=lambda: 1_000_020.0)
    admin = redis.Redis(port=server.port)
    try:
        with capture_logs() as logs:
            for _ in range(2):
                assert await throttle.acquire("billing") is None
                assert limiter.retry_after("acme") is None
                await limiter.share()
                admin.script_flush()
            assert throttle.using_redis
        other = DestinationThrottle({"billing": "100/minute"}, redis_url=as_user(server))
        try:
            assert await other.room("billing") == 98
        finally:
            await other.aclose()
        keys = [k for k in admin.scan_iter("estafeta:ingress:acme:*") if b":processes" not in k]
        assert [int(admin.get(key) or 0) for key in keys] == [2]  # the window's total
    finally:
        await limiter.aclose()
        await client.aclose()
        admin.close()
    assert [e for e in logs if e["event"].startswith("redis_")] == []
