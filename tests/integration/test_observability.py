"""/metrics, the backlog alert and /health/detailed, seen from outside."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.api.health import FROZEN_CIRCUITS, circuits_check
from estafeta.clock import iso_from_ms
from estafeta.config import Config, load_config_dict
from estafeta.connectors.http import sign_webhook
from estafeta.delivery.breakers import Breakers
from estafeta.delivery.circuit import Circuit
from estafeta.delivery.circuit_store import FallbackCircuitStore, RedisCircuitStore
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.presence import Presence
from estafeta.delivery.state import DeliveryState
from estafeta.delivery.worker import Worker
from estafeta.errors import HttpError, StoreUnavailable
from estafeta.hub import Hub
from estafeta.ingress.journal import encode
from estafeta.ingress.spool import Spool, SpoolDrainer
from estafeta.observability.metrics import REGISTRY, render
from estafeta.observability.monitor import AlertMonitor
from estafeta.observability.reads import READ_TIMEOUT_S
from estafeta.observability.unrouted import Unrouted
from estafeta.store import sqlite as sqlite_store
from estafeta.store.records import DeadLetterFilter
from estafeta.store.sqlstore import SqlStore
from estafeta.supervise import Tasks
from tests.acceptance.conftest import execute
from tests.chaos.conftest import TcpProxy
from tests.clocks import ManualClock
from tests.conftest import SOURCE_SECRET, base_config, lease_any, signed
from tests.integration.redis_support import RedisServer
from tests.integration.store_support import attempt, only_delivery, store_as_role
from tests.slow_render import render_waiting_for_the_loop

PERMANENT = OutcomeKind.PERMANENT

ADMIN = {"authorization": "Bearer test-admin-key"}


async def metrics(http: httpx.AsyncClient) -> str:
    """What a Prometheus scrape of `GET /metrics` reads."""
    r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


@pytest.fixture
async def hub(config: Config, store: SqlStore) -> AsyncIterator[Hub]:
    made = Hub(config, store)
    yield made
    await made.close()


async def accept(hub: Hub, n: int) -> None:
    for i in range(n):
        await hub.accept(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={"i": i},
            idempotency_key=None,
        )


async def test_metrics_report_accepted_events_and_the_queue(hub: Hub) -> None:
    await accept(hub, 3)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'estafeta_deliveries{state="pending"} 3.0' in text
    assert 'estafeta_events_accepted_total{outcome="stored",source="crm-events"}' in text
    # Every configured destination has its circuit's series, closed while it never failed,
    # as /health/detailed lists it: an alert on the gauge sees the destination from the start.
    for destination in ("billing", "crm", "outra-sink"):
        assert f'estafeta_circuit_state{{destination="{destination}"}} 0.0' in text


async def test_a_scrape_renders_while_the_event_loop_keeps_turning(hub: Hub) -> None:
    # Before: a hub of ~900 destinations rendered for 180-400 ms on serve's event loop, and
    # ingest and in-process delivery stalled that long at every scrape.
    transport = httpx.ASGITransport(app=create_app(hub))
    async with (
        render_waiting_for_the_loop() as slow,
        httpx.AsyncClient(transport=transport, base_url="http://hub") as http,
    ):
        assert 'estafeta_circuit_state{destination="crm"} 0.0' in await metrics(http)
    assert slow.saw_the_loop_turn == [True]


async def test_the_backlog_alert_fires_and_resolves_once(hub: Hub, store: SqlStore) -> None:
    monitor = AlertMonitor(store, threshold=3)
    with capture_logs() as logs:
        await accept(hub, 2)
        await monitor.check()
        assert monitor.firing == set()
        await accept(hub, 1)
        await monitor.check()
        await monitor.check()  # still over: no second alert
        assert monitor.firing == {"queue_backlog"}
        leased = await lease_any(store, now_ms=hub.clock.now_ms(), limit=10)
        assert len(leased) == 3
        await monitor.check()  # nothing pending any more
    assert monitor.firing == set()
    assert [e["event"] for e in logs if e["event"].startswith("alert_")] == [
        "alert_fired",
        "alert_resolved",
    ]


async def test_the_dead_letter_alert_fires_while_deliveries_wait_for_an_operator(
    hub: Hub, store: SqlStore
) -> None:
    # A destination that refuses for good (a CRM's expired token, 401) sends every delivery
    # to the DLQ at its first attempt and never opens its circuit: before this alert the
    # operator heard nothing.
    monitor = AlertMonitor(store, threshold=1000, dead_threshold=2)
    with capture_logs() as logs:
        await accept(hub, 3)
        now = hub.clock.now_ms()
        leased = await lease_any(store, now_ms=now, limit=10)
        assert len(leased) == 3
        await store.complete([attempt(leased[0], DeliveryState.DEAD, kind=PERMANENT, at=now)], now)
        await monitor.check()
        assert monitor.firing == set()  # one dead: under this hub's threshold of two
        await store.complete(
            [attempt(d, DeliveryState.DEAD, kind=PERMANENT, at=now) for d in leased[1:]], now
        )
        await monitor.check()
        await monitor.check()  # still there: no second alert
        assert monitor.firing == {"dead_letters"}
        assert REGISTRY.get_sample_value("estafeta_alert_firing", {"alert": "dead_letters"}) == 1
        # The operator decides: one replayed, the others discarded (kept, no longer waiting).
        await store.replay(DeadLetterFilter(delivery_ids=(leased[0].id,)), actor="t", now_ms=now)
        await monitor.check()
        assert monitor.firing == {"dead_letters"}  # two still wait
        await store.discard(DeadLetterFilter(destination_id="crm"), actor="t", now_ms=now)
        await monitor.check()
    assert monitor.firing == set()
    alerts = [e for e in logs if e["event"].startswith("alert_")]
    assert [(e["event"], e["alert"], e["dead"]) for e in alerts] == [
        ("alert_fired", "dead_letters", 3),
        ("alert_resolved", "dead_letters", 0),
    ]


async def test_events_no_route_sends_anywhere_are_counted_and_each_kind_logged_once(
    hub: Hub,
) -> None:
    # A route's glob or filter that matches nothing (here: no route for `lead.*`, and the
    # appointments route refusing drafts) leaves events stored and sent nowhere: nothing said so.
    hub.unrouted = Unrouted(max_named=2)  # two pairs named, then "other"

    def counted(event_type: str) -> float:
        labels = {"source": "crm-events", "type": event_type}
        return REGISTRY.get_sample_value("estafeta_events_unrouted_total", labels) or 0.0

    before = {t: counted(t) for t in ("lead.created", "appointment.booked", "other")}

    async def publish(event_type: str, data: dict[str, Any], key: str | None = None) -> None:
        await hub.accept(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type=event_type,
            data=data,
            idempotency_key=key,
        )

    with capture_logs() as logs:
        await publish("lead.created", {"n": 1}, key="lead-1")
        await publish("lead.created", {"n": 1}, key="lead-1")  # a duplicate: counted once
        await publish("lead.created", {"n": 2})
        await publish("appointment.booked", {"status": "draft"})
        await publish("appointment.booked", {"status": "confirmed"})  # routed: not counted
        await publish("message.received", {"text": "hola"})  # routed
        await publish("invoice.paid", {"n": 3})  # past the named pairs
    assert {t: counted(t) - before[t] for t in before} == {
        "lead.created": 2,
        "appointment.booked": 1,
        "other": 1,
    }
    assert counted("invoice.paid") == 0
    lines = [(e["source"], e["type"]) for e in logs if e["event"] == "event_unrouted"]
    assert lines == [("crm-events", "lead.created"), ("crm-events", "appointment.booked")]
    stored = await hub.store.queue_stats()
    assert stored.by_state == {"pending": 3}  # 1 confirmed appointment × 2, 1 message


async def test_each_tenants_unrouted_api_events_are_logged_for_that_tenant(
    store: SqlStore, database_url: str
) -> None:
    # Every tenant's published events share the source `api`: clinica-sol's unrouted
    # `lead.created` must not hide outra's, whose route may be the one that is wrong.
    data = base_config(database_url)
    data["routes"][-1]["events"] = ["order.*"]  # outra routes no `lead.*`
    hub = Hub(load_config_dict(data), store)
    try:
        with capture_logs() as logs:
            for tenant in ("clinica-sol", "outra", "outra"):
                await hub.accept(
                    tenant_id=tenant,
                    source_id="api",
                    event_type="lead.created",
                    data={},
                    idempotency_key=None,
                )
    finally:
        await hub.close()
    lines = [(e["tenant"], e["type"]) for e in logs if e["event"] == "event_unrouted"]
    assert lines == [("clinica-sol", "lead.created"), ("outra", "lead.created")]


async def test_detailed_health_shows_circuits_and_queue(hub: Hub) -> None:
    from estafeta.delivery.circuit import CircuitPolicy, record

    policy = CircuitPolicy(failures=1)
    await hub.circuit_states.update("billing", lambda c: record(c, policy, success=False, now_ms=1))
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        body = (await http.get("/health/detailed", headers=ADMIN)).json()
    assert body["checks"]["circuits"]["billing"]["state"] == "open"
    assert body["checks"]["store"]["status"] == "ok"


async def test_detailed_health_names_every_destination_and_every_queue_state(hub: Hub) -> None:
    """DESIGN §3.3: "each destination's circuit, queue depths". A destination that never
    failed (its circuit on record nowhere) and a state of the queue no delivery is in are
    still there, closed and 0: a probe reading `circuits.crm.state` or `by_state.dead` must
    not find nothing exactly when all is well. The history (succeeded, discarded) is not
    the queue's depth, and counting it would walk every delivery the store keeps."""
    await accept(hub, 1)  # one pending delivery, to crm; nothing in any other state
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        checks = (await http.get("/health/detailed", headers=ADMIN)).json()["checks"]
    healthy = {"state": "closed", "consecutive_failures": 0, "opened_at": None}
    assert checks["circuits"] == {"billing": healthy, "crm": healthy, "outra-sink": healthy}
    assert checks["queue"]["by_state"] == {"pending": 1, "in_flight": 0, "dead": 0}


async def test_detailed_health_reports_redis_and_stays_up_without_it(
    database_url: str, store: SqlStore, own_redis: RedisServer
) -> None:
    config = load_config_dict({**base_config(database_url), "redis": {"url": own_redis.url}})
    hub = Hub(config, store)
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            r = await http.get("/health/detailed", headers=ADMIN)
            assert (r.status_code, r.json()["status"]) == (200, "ok")
            assert r.json()["checks"]["redis"] == {"status": "ok"}
            assert 'estafeta_circuit_state{destination="crm"} 0.0' in (await metrics(http))
            own_redis.kill()
            r = await http.get("/health/detailed", headers=ADMIN)
            scraped = await metrics(http)
    finally:
        await hub.close()
    # Degraded, not down: circuits and rate limits carry on from process memory.
    assert (r.status_code, r.json()["status"]) == (200, "degraded")
    redis_check = r.json()["checks"]["redis"]
    assert redis_check["status"] == "unavailable" and "per process" in redis_check["effect"]
    assert r.json()["checks"]["store"]["status"] == "ok"
    # This app runs no workers: its copy of the circuits is the one read before the outage,
    # which nothing updates. Neither health nor metrics passes it off as the circuits now.
    assert r.json()["checks"]["circuits"] == {"status": "unavailable", "error": FROZEN_CIRCUITS}
    assert "estafeta_circuit_state{" not in scraped
    assert 'estafeta_deliveries{state="pending"}' in scraped


@pytest.mark.postgres
async def test_detailed_health_answers_in_bounded_time_when_the_store_hangs(
    proxied_hub: tuple[Hub, TcpProxy],
) -> None:
    hub, proxy = proxied_hub
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub", timeout=60) as http:
        assert (await http.get("/health/detailed", headers=ADMIN)).status_code == 200
        proxy.freeze()  # the database stops answering; its connections stay open
        started = time.monotonic()
        r = await http.get("/health/detailed", headers=ADMIN)
        elapsed = time.monotonic() - started
    # A probe gives up after a few seconds: without a bound this took the driver's 30 s
    # command timeout and more, and the probe learnt nothing.
    assert elapsed < READ_TIMEOUT_S + 2, elapsed
    assert (r.status_code, r.json()["status"]) == (503, "degraded")
    assert r.json()["checks"]["store"]["status"] == "unavailable"


@contextlib.contextmanager
def sqlite_disk_full(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SQLite connections opened meanwhile answer SQLITE_FULL ("database or disk is full")
    to a write that needs another page of the database, as on a full disk: their
    `max_page_count` is the file's size (SQLite raises 1 to that)."""
    configure = sqlite_store._configure

    def full(dbapi_connection: Any) -> None:
        configure(dbapi_connection)
        dbapi_connection.execute("PRAGMA max_page_count = 1")

    with monkeypatch.context() as disk:
        disk.setattr(sqlite_store, "_configure", full)
        yield


async def refused_for_want_of_space(hub: Hub) -> None:
    """A webhook the full disk refuses: it needs many pages more than the file has."""
    with pytest.raises(StoreUnavailable):
        await hub.accept(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={"text": "x" * 200_000},
            idempotency_key=None,
        )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_detailed_health_says_when_the_sqlite_disk_is_full(
    hub: Hub, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk SQLite still answers reads, so the store's ping passed and health said
    `ok` while every write failed: ingest refused or spooled every webhook, and workers
    could record nothing."""

    async def announce(destinations: list[str]) -> None:  # a process's heartbeat: a write
        now = int(time.time() * 1000)
        await store.announce_process(
            "p-1",
            destinations,
            delivers=True,
            delivering=True,
            started_ms=now,
            now_ms=now,
            forget_before_ms=0,
        )

    big = ["d" * 200_000]  # many pages more than the file has
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        with sqlite_disk_full(monkeypatch):
            await store.engine.dispose()  # connections opened from here on see a full disk
            with pytest.raises(StoreUnavailable):
                await announce(big)
            full = await http.get("/health/detailed", headers=ADMIN)
        await store.engine.dispose()  # space freed: the next write commits
        await announce(["crm"])
        freed = await http.get("/health/detailed", headers=ADMIN)
        with sqlite_disk_full(monkeypatch):  # and a webhook's write, on ingest's own connection
            await refused_for_want_of_space(hub)
            ingest_full = await http.get("/health/detailed", headers=ADMIN)

    assert (full.status_code, full.json()["status"]) == (503, "degraded"), full.json()
    store_state = full.json()["checks"]["store"]
    assert (store_state["status"], store_state["engine"]) == ("full", "sqlite")
    assert "SQLITE_FULL" in store_state["error"], store_state
    assert "queue" in full.json()["checks"]  # reads still answer
    assert (freed.status_code, freed.json()["checks"]["store"]["status"]) == (200, "ok")
    assert ingest_full.status_code == 503
    assert ingest_full.json()["checks"]["store"]["status"] == "full"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_log_says_when_the_sqlite_disk_fills_and_when_it_has_room_again(
    hub: Hub, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk webhooks were spooled (`events_spooled`, no reason), a worker's
    records were retried in silence for its whole lease, and reads went on answering (no
    `store_down`): nothing in the log said the disk was full until a minute later, if at
    all. One line as writes begin to fail for want of space, not one per write, and one
    once a write commits again."""
    with capture_logs() as logs:
        with sqlite_disk_full(monkeypatch):
            for _ in range(3):  # the same full disk, webhook after webhook
                await refused_for_want_of_space(hub)
        await store.engine.dispose()  # space freed: connections opened from here on have room
        now = int(time.time() * 1000)
        await store.announce_process(  # a process's heartbeat: a write that commits
            "p-1",
            ["crm"],
            delivers=True,
            delivering=True,
            started_ms=now,
            now_ms=now,
            forget_before_ms=0,
        )
    said = [
        (line["event"], line["log_level"], line.get("error"))
        for line in logs
        if line["event"].startswith("store_")
    ]
    full = "the store cannot write: OperationalError (SQLITE_FULL: database or disk is full)"
    assert said == [("store_full", "warning", full), ("store_writable", "info", None)], logs


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_idle_workers_lease_does_not_say_the_full_disk_has_room_again(
    hub: Hub, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker leases every poll (a second or less) and rescues every few seconds; one
    that finds nothing due writes nothing, so it commits on a full disk: it cleared `full`,
    and health said `ok` a moment after each webhook the disk refused."""
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        with sqlite_disk_full(monkeypatch):
            await store.engine.dispose()  # connections opened from here on see a full disk
            await refused_for_want_of_space(hub)
            now = int(time.time() * 1000)
            leased = await store.lease(
                now_ms=now, rooms={"crm": 10}, limit=10, lease_ms=30_000, worker_id="w"
            )
            assert leased == []
            after_lease = await http.get("/health/detailed", headers=ADMIN)
            assert await store.claim_expired(now_ms=now, lease_ms=30_000, worker_id="w") == []
            after_rescue = await http.get("/health/detailed", headers=ADMIN)

    for answer in (after_lease, after_rescue):
        assert answer.status_code == 503, answer.json()
        assert answer.json()["checks"]["store"]["status"] == "full"


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_detailed_health_says_when_postgresql_refuses_a_webhook_for_want_of_disk(
    hub: Hub, store: SqlStore
) -> None:
    """PostgreSQL stores webhooks on connections of their own (store/held.py), not through
    the general write path: a full disk refused every webhook while health said `ok`."""

    async def webhook() -> None:
        await hub.accept(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="crm.webhook",
            data={"n": 1},
            idempotency_key=None,
        )

    async with store.engine.begin() as conn:  # inserts fail as on a full disk (53100)
        await conn.execute(
            text(
                "CREATE FUNCTION disk_is_full() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full';"
                " END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER disk_is_full BEFORE INSERT ON events"
                " FOR EACH ROW EXECUTE FUNCTION disk_is_full()"
            )
        )
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            with pytest.raises(StoreUnavailable):
                await webhook()
            full = await http.get("/health/detailed", headers=ADMIN)
            async with store.engine.begin() as conn:  # space freed
                await conn.execute(text("DROP TRIGGER disk_is_full ON events"))
            await webhook()
            freed = await http.get("/health/detailed", headers=ADMIN)
    finally:
        async with store.engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER IF EXISTS disk_is_full ON events"))
            await conn.execute(text("DROP FUNCTION IF EXISTS disk_is_full()"))

    assert full.status_code == 503, full.json()
    store_state = full.json()["checks"]["store"]
    assert (store_state["status"], store_state["engine"]) == ("full", "postgresql")
    assert "53100" in store_state["error"], store_state
    assert (freed.status_code, freed.json()["checks"]["store"]["status"]) == (200, "ok")


@pytest.mark.postgres
async def test_metrics_are_served_while_the_store_is_unreachable(
    proxied_hub: tuple[Hub, TcpProxy],
) -> None:
    hub, proxy = proxied_hub
    spooled = {"outcome": "spooled", "source": "crm-events"}
    before = REGISTRY.get_sample_value("estafeta_events_accepted_total", spooled) or 0.0
    await accept(hub, 1)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub", timeout=60) as http:
        await proxy.cut()
        await accept(hub, 2)  # spooled: the store cannot be reached
        cut = await http.get("/metrics")
        await proxy.restore()
        await http.get("/metrics")  # the store answers again
        proxy.freeze()
        started = time.monotonic()
        frozen = await http.get("/metrics")
        elapsed = time.monotonic() - started
    # What the operator alerts on during an outage (the spool filling, events spooled) is in
    # the scrape; the queue depth, which only the store knows, is left out rather than stale.
    assert cut.status_code == 200, cut.text
    assert "estafeta_spool_segments 1.0" in cut.text
    spooled_line = (
        f'estafeta_events_accepted_total{{outcome="spooled",source="crm-events"}} {before + 2}'
    )
    assert spooled_line in cut.text
    assert 'estafeta_events_accepted_total{outcome="stored",source="crm-events"}' in cut.text
    assert "estafeta_deliveries{" not in cut.text
    assert elapsed < READ_TIMEOUT_S + 2, elapsed
    assert frozen.status_code == 200 and "estafeta_spool_segments" in frozen.text
    assert "estafeta_deliveries{" not in frozen.text


@pytest.fixture
async def clocked_hub(config: Config, store: SqlStore) -> AsyncIterator[tuple[Hub, ManualClock]]:
    """A hub on a clock that moves only when the test moves it."""
    clock = ManualClock()
    made = Hub(config, store, clock)
    yield made, clock
    await made.close()


@pytest.fixture
async def spooling_hub(
    config: Config, store: SqlStore, tmp_path: Path
) -> AsyncIterator[tuple[Hub, ManualClock]]:
    """A hub with a spool and no drainer running (the ASGI transport starts no lifespan):
    what an operator has when the drainer is stuck or keeps crashing."""
    clock = ManualClock()
    made = Hub(
        config, store, clock, spool=Spool(tmp_path / "spool", max_bytes=1 << 20, clock=clock)
    )
    yield made, clock
    await made.close()


async def spool_one(hub: Hub) -> None:
    assert hub.spool is not None
    await hub.spool.append(
        hub.new_event(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={"i": 0},
            idempotency_key=None,
        )
    )


async def test_detailed_health_degrades_when_the_spool_stops_draining(
    spooling_hub: tuple[Hub, ManualClock], store: SqlStore
) -> None:
    hub, clock = spooling_hub
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        empty = (await http.get("/health/detailed", headers=ADMIN)).json()
        await spool_one(hub)  # an event kept while the store was down, not imported yet
        fresh = await http.get("/health/detailed", headers=ADMIN)
        clock.now += 61_000  # the store answers, and the drain gets nowhere for a minute
        stuck = await http.get("/health/detailed", headers=ADMIN)
        assert hub.spool is not None
        assert await hub.spool.drain(store) == 1  # a drainer that works again
        drained = (await http.get("/health/detailed", headers=ADMIN)).json()

    assert (empty["status"], empty["checks"]["spool"]["status"]) == ("ok", "ok")
    # Events waiting a moment for the drainer are what a store outage leaves: not a problem.
    assert fresh.status_code == 200 and fresh.json()["status"] == "ok", fresh.json()
    assert fresh.json()["checks"]["spool"]["status"] == "draining"
    assert fresh.json()["checks"]["spool"]["stalled"] is False
    # Before: "ok", while the spool held events the store could have taken for a minute.
    assert (stuck.status_code, stuck.json()["status"]) == (200, "degraded"), stuck.json()
    spool = stuck.json()["checks"]["spool"]
    assert (spool["status"], spool["stalled"], spool["segments"]) == ("draining", True, 1)
    assert spool["waiting_s"] >= 60
    assert (drained["status"], drained["checks"]["spool"]["status"]) == ("ok", "ok")


async def test_detailed_health_says_when_the_spool_cannot_be_written(
    spooling_hub: tuple[Hub, ManualClock], tmp_path: Path
) -> None:
    hub, _ = spooling_hub
    spool_dir = tmp_path / "spool"
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        writable = await http.get("/health/detailed", headers=ADMIN)
        left = sorted(p.name for p in spool_dir.iterdir())
        spool_dir.rmdir()  # a clean-up job, or a disk unmounted: nothing to spool into
        unwritable = await http.get("/health/detailed", headers=ADMIN)

    assert writable.json()["checks"]["spool"]["status"] == "ok"
    assert left == []  # the check leaves nothing behind
    # Before: "ok" until the store went down and every webhook got 503 spool_unavailable.
    # Degraded, not down: the store still takes every event.
    assert (unwritable.status_code, unwritable.json()["status"]) == (200, "degraded")
    spool = unwritable.json()["checks"]["spool"]
    assert (spool["status"], spool["error"]) == ("unwritable", "ENOENT"), spool
    with pytest.raises(HttpError) as refused:  # what the check warned about
        await spool_one(hub)
    assert refused.value.error == "spool_unavailable"


async def test_a_destination_down_is_alerted_once_it_stays_down_and_resolved_when_back(
    config: Config, store: SqlStore, clocked_hub: tuple[Hub, ManualClock]
) -> None:
    # Its deliveries wait pending while the circuit is open, spending no attempts: nothing
    # reaches the DLQ, and a clinic's backlog stays far under queue_backlog's depth.
    hub, clock = clocked_hub
    breakers = Breakers(hub.circuit_states, config)
    monitor = AlertMonitor(
        store,
        threshold=1000,
        circuits=hub.circuit_states,
        destinations=["crm", "billing"],
        down_after_s=300,
        clock=clock,
    )
    failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=503, error_class="http_503")
    succeeded = Outcome(OutcomeKind.SUCCESS, 1.0, status_code=200)
    outage_began = clock.now
    with capture_logs() as logs:
        for _ in range(5):  # the default circuit: five failures in a row open it
            await breakers.record("crm", failed, started_at=clock.now, now_ms=clock.now)
            # A destination removed from the configuration left its circuit open on
            # record: nothing will probe it again, and it is nobody's outage.
            await breakers.record("removed", failed, started_at=clock.now, now_ms=clock.now)
        await monitor.check()
        assert monitor.firing == set()
        # Every reset_s (30 s) a probe fails and reopens it: the outage goes on.
        for _ in range(10):
            clock.now += 31_000
            assert await breakers.try_probe("crm", clock.now)
            await breakers.record("crm", failed, started_at=clock.now, now_ms=clock.now)
            await monitor.check()
        assert monitor.firing == {"destination_down"}
        assert monitor.down == {"crm"}
        gauge = {"alert": "destination_down"}
        assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 1
        clock.now += 31_000
        assert await breakers.try_probe("crm", clock.now)
        await breakers.record("crm", succeeded, started_at=clock.now, now_ms=clock.now)
        await monitor.check()
        assert monitor.firing == set()
        assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 0
    alerts = [e for e in logs if e["event"].startswith("alert_")]
    assert [(e["event"], e["alert"], e["destination"]) for e in alerts] == [
        ("alert_fired", "destination_down", "crm"),
        ("alert_resolved", "destination_down", "crm"),
    ]
    # Since the outage began, not since the last failed probe reopened the circuit.
    fired = alerts[0]
    assert fired["since"] == iso_from_ms(outage_began)
    assert fired["circuit"] == "open" and fired["down_s"] >= 300


async def open_circuit(breakers: Breakers, destination: str, now_ms: int) -> None:
    failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=503, error_class="http_503")
    for _ in range(5):  # the default circuit: five failures in a row open it
        await breakers.record(destination, failed, started_at=now_ms, now_ms=now_ms)


@pytest.mark.parametrize("delivers", [False, True], ids=["no-workers", "with-workers"])
async def test_redis_down_is_alerted_and_destination_down_judges_only_a_live_view_meanwhile(
    database_url: str, store: SqlStore, own_redis: RedisServer, delivers: bool
) -> None:
    # During a Redis outage circuits are each process's own. A serve that does not deliver
    # has only the copy it read before, frozen: a destination it saw open may have been
    # mended since, so it neither fires nor resolves on it. One that delivers acts on its
    # copy and judges it. Either way redis_down says the picture is per process.
    config = load_config_dict({**base_config(database_url), "redis": {"url": own_redis.url}})
    clock = ManualClock()
    hub = Hub(config, store, clock)
    assert hub.redis is not None
    circuits = FallbackCircuitStore(
        RedisCircuitStore(hub.redis), monotonic=lambda: clock.now / 1000
    )
    breakers = Breakers(circuits, config)
    monitor = AlertMonitor(
        store,
        threshold=1000,
        circuits=circuits,
        destinations=["crm", "billing"],
        down_after_s=300,
        redis=hub.redis,
        redis_down_after_s=60,
        delivers=delivers,
        clock=clock,
    )
    gauge = {"alert": "redis_down"}
    try:
        with capture_logs() as logs:
            await open_circuit(breakers, "crm", clock.now)
            clock.now += 301_000
            await open_circuit(breakers, "billing", clock.now)  # just before Redis goes
            await monitor.check()
            assert monitor.down == {"crm"}
            assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 0

            own_redis.kill()
            outage_began = clock.now
            await monitor.check()
            assert monitor.firing == {"destination_down"}  # a blip does not fire redis_down
            clock.now += 60_000
            await monitor.check()
            assert monitor.firing == {"destination_down", "redis_down"}
            assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 1
            # billing has been open 360 s by the copy; crm is closed in this process's own
            # view, as a worker's successful probe leaves it.
            clock.now += 300_000
            await circuits.update("crm", lambda _: Circuit())
            await monitor.check()
            assert monitor.down == ({"billing"} if delivers else {"crm"})
            # /health/detailed and /metrics read the circuits by the same rule.
            shown = await circuits_check(circuits, ["crm", "billing"], delivers=delivers)
            scraped = (await render(store, circuits, None, ["crm"], delivers=delivers))[0]
            if delivers:
                assert {d: c["state"] for d, c in shown.items()} == {  # type: ignore[index]
                    "crm": "closed",
                    "billing": "open",
                }
                assert b'estafeta_circuit_state{destination="billing"} 2.0' in scraped
            else:
                assert shown == {"status": "unavailable", "error": FROZEN_CIRCUITS}
                assert b"estafeta_circuit_state{" not in scraped

            own_redis.start()  # empty: every circuit closed, as the workers' probes left them
            clock.now += 5_000  # the circuit store tries Redis again every 5 s
            await monitor.check()  # starts the try, in the background
            await circuits._failover.probed()
            await monitor.check()
            assert monitor.firing == set()
            assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 0
    finally:
        await hub.close()
    alerts = [(e["event"], e["alert"], e.get("destination")) for e in logs if "alert" in e]
    assert alerts == [
        ("alert_fired", "destination_down", "crm"),
        ("alert_fired", "redis_down", None),
        *(
            [("alert_resolved", "destination_down", "crm"),
             ("alert_fired", "destination_down", "billing")]
            if delivers
            else []
        ),
        ("alert_resolved", "redis_down", None),
        ("alert_resolved", "destination_down", "billing" if delivers else "crm"),
    ]  # fmt: skip
    fired = next(e for e in logs if e.get("alert") == "redis_down")
    assert fired["since"] == iso_from_ms(outage_began) and fired["down_s"] == 60
    assert fired["error"] == "ConnectionError"


def watching_workers(store: SqlStore, clock: ManualClock) -> AlertMonitor:
    """A monitor of processes that deliver, on `clock`: `no_workers` after 120 s."""
    return AlertMonitor(
        store, threshold=1000, watch_workers=True, no_workers_after_s=120, clock=clock
    )


def worker_whose_task_crashes(
    store: SqlStore, config: Config, clock: ManualClock
) -> tuple[Presence, Tasks]:
    """worker-1 on `clock`, and its tasks, which the test crashes (`tasks.crashed`) and
    restarts (`tasks.down.clear()`)."""
    tasks = Tasks()
    return Presence(store, config, process_id="worker-1", clock=clock, tasks=tasks), tasks


async def test_no_workers_is_alerted_while_deliveries_wait_and_no_process_delivers(
    config: Config, store: SqlStore, clocked_hub: tuple[Hub, ManualClock]
) -> None:
    # `serve --no-workers` accepts every webhook while no `estafeta worker` runs (never
    # started, or crashing): before this alert nothing said so until queue_backlog's 10,000.
    hub, clock = clocked_hub
    monitor = watching_workers(store, clock)
    http_only = Presence(store, config, process_id="http-1", clock=clock, delivers=False)
    worker = Presence(store, config, process_id="worker-1", clock=clock)
    gauge = {"alert": "no_workers"}
    with capture_logs() as logs:
        await http_only.announce()  # it runs, but delivers nothing
        await accept(hub, 2)
        clock.now += 119_000
        await http_only.announce()
        await monitor.check()
        assert monitor.firing == set()  # a worker may be starting beside this process
        clock.now += 1_000
        await monitor.check()
        await monitor.check()  # still none: no second alert
        assert monitor.firing == {"no_workers"}
        assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 1
        await worker.announce()  # a worker starts
        await monitor.check()
        assert monitor.firing == set()
        worker_seen = clock.now
        clock.now += 119_000  # killed: it announces no more
        await monitor.check()
        assert monitor.firing == set()
        clock.now += 1_000
        await monitor.check()
        assert monitor.firing == {"no_workers"}
        await worker.announce()  # restarted, then stopped for good
        await monitor.check()
        clock.now += 10_000
        await worker.retire()
        stopped = clock.now
        clock.now += 119_000
        await monitor.check()
        assert monitor.firing == set()  # stopped, but not for long enough yet
        clock.now += 1_000
        await monitor.check()
        assert monitor.firing == {"no_workers"}
        # Leased (by a worker that then died): in flight, they wait for a live worker.
        leased = await lease_any(store, now_ms=clock.now, limit=10)
        assert len(leased) == 2
        await monitor.check()
        assert monitor.firing == {"no_workers"}
        # Delivered (by hand here): nothing waits for a worker.
        done = [attempt(d, DeliveryState.SUCCEEDED, at=clock.now) for d in leased]
        await store.complete(done, clock.now)
        await monitor.check()
        assert monitor.firing == set()
        assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 0
    alerts = [e for e in logs if e["event"].startswith("alert_")]
    waiting = [(e["event"], e["pending"], e["in_flight"], e.get("last_seen")) for e in alerts]
    assert waiting == [
        ("alert_fired", 2, 0, None),
        ("alert_resolved", 2, 0, None),
        ("alert_fired", 2, 0, iso_from_ms(worker_seen)),
        ("alert_resolved", 2, 0, None),
        ("alert_fired", 2, 0, iso_from_ms(stopped)),
        ("alert_resolved", 0, 0, None),
    ]


async def test_no_workers_hears_of_a_worker_whose_delivery_task_keeps_crashing(
    config: Config, store: SqlStore, clocked_hub: tuple[Hub, ManualClock]
) -> None:
    # A worker that runs and announces itself, but whose delivery task crashes and is
    # restarted over and over (a bug, a role that may not update deliveries), delivers
    # nothing: it must count as no worker, from its last steady announcement on.
    hub, clock = clocked_hub
    monitor = watching_workers(store, clock)
    worker, tasks = worker_whose_task_crashes(store, config, clock)
    with capture_logs() as logs:
        await worker.announce()  # started: its delivery task has not crashed yet
        steady = clock.now
        await accept(hub, 1)
        for _ in range(12):  # two minutes of announcements, a crash between each two
            tasks.crashed("worker", RuntimeError("boom"))
            clock.now += 10_000
            await worker.announce()
            tasks.down.clear()  # restarted after its pause
        await monitor.check()
        assert monitor.firing == {"no_workers"}
        (listed,) = await store.live_processes(seen_since_ms=clock.now - 60_000)
        assert (listed.seen_at, listed.delivering_at) == (clock.now, steady)

        clock.now += 10_000
        await worker.announce()  # restarted since the last one, down when it was made
        await monitor.check()
        assert monitor.firing == {"no_workers"}
        clock.now += 10_000
        await worker.announce()  # ten seconds up and without a crash: it delivers again
        await monitor.check()
        assert monitor.firing == set()
    alerts = [(e["event"], e.get("last_seen")) for e in logs if e["event"].startswith("alert_")]
    assert alerts == [("alert_fired", iso_from_ms(steady)), ("alert_resolved", None)]


@pytest.mark.postgres
async def test_no_workers_does_not_blame_workers_for_a_store_outage(
    proxied_hub: tuple[Hub, TcpProxy],
) -> None:
    # While the store cannot be reached no process can record itself: once it is back, the
    # workers' last records are as old as the outage, and that is not a worker gone.
    hub, proxy = proxied_hub
    clock = ManualClock()
    monitor = watching_workers(hub.store, clock)
    worker = Presence(hub.store, hub.config, process_id="worker-1", clock=clock)
    with capture_logs() as logs:
        await worker.announce()
        await accept(hub, 1)
        await proxy.cut()
        clock.now += 10_000
        await monitor.check()  # the store is unreachable: noted
        clock.now += 290_000  # a five-minute outage
        await monitor.check()
        await proxy.restore()
        clock.now += 5_000
        await monitor.check()
        assert monitor.firing == set()  # the worker records itself within 10 s of this
        await worker.announce()
        back = clock.now
        clock.now += 119_000
        await monitor.check()
        assert monitor.firing == set()
        clock.now += 1_000  # and then it is gone for good
        await monitor.check()
        assert monitor.firing == {"no_workers"}
    # The outage itself is store_down's (fired past its minute, resolved once back).
    fired = [e for e in logs if e["event"] == "alert_fired" and e["alert"] != "store_down"]
    assert [(e["alert"], e["last_seen"]) for e in fired] == [("no_workers", iso_from_ms(back))]


async def test_detailed_health_names_a_crashed_task_and_when_each_process_last_delivered(
    hub: Hub, store: SqlStore
) -> None:
    tasks = Tasks()
    clock = ManualClock()
    worker = Presence(store, hub.config, process_id="worker-1", clock=clock, tasks=tasks)
    http_only = Presence(
        store, hub.config, process_id="http-1", clock=clock, delivers=False, tasks=Tasks()
    )
    clock.now = hub.clock.now_ms()
    await worker.announce()
    await http_only.announce()
    tasks.crashed("spool-drainer", OSError("disk"))
    transport = httpx.ASGITransport(app=create_app(hub, tasks=tasks))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        r = await http.get("/health/detailed", headers=ADMIN)
        # Still accepting webhooks: degraded, not a 503 that takes it out of the balancer.
        assert (r.status_code, r.json()["status"]) == (200, "degraded")
        assert r.json()["checks"]["tasks"] == {
            "status": "down",
            "crashed": [{"task": "spool-drainer", "error": "OSError"}],
        }
        processes = {p["id"]: p for p in r.json()["checks"]["processes"]}
        assert processes["worker-1"]["delivering_at"] == iso_from_ms(clock.now)
        assert processes["http-1"]["delivering_at"] is None
        tasks.down.clear()  # started again
        r = await http.get("/health/detailed", headers=ADMIN)
        assert (r.status_code, r.json()["status"]) == (200, "ok")
        assert r.json()["checks"]["tasks"] == {"status": "ok"}


async def test_a_source_whose_webhooks_keep_being_refused_is_alerted_until_one_is_accepted(
    config: Config, store: SqlStore
) -> None:
    # A rotated app secret or auth token: every webhook of the source is refused, and the
    # provider gives up after its retries (Twilio does not retry). Only a log line said so.
    clock = ManualClock(int(time.time() * 1000))  # signatures are checked at the real time
    hub = Hub(config, store, clock)
    monitor = AlertMonitor(
        store, threshold=1000, refusals=hub.refusals, refused_after_s=300, clock=clock
    )
    body = b'{"type": "message.received", "data": {"text": "hola"}}'
    gauge = {"alert": "webhooks_refused"}

    async def post(path: str, headers: dict[str, str]) -> int:
        headers = {"content-type": "application/json", **headers}
        return (await http.post(path, content=body, headers=headers)).status_code

    forged = {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time()))}
    forged["webhook-signature"] = "v1,c2lnbmVkIHdpdGggdGhlIG9sZCBzZWNyZXQ="
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            with capture_logs() as logs:
                first = clock.now
                assert await post("/in/crm-events", forged) == 401
                assert await post("/in/crm-events", forged) == 401
                assert await post("/in/no-such-source", forged) == 404  # not a source of ours
                clock.now += 400_000
                await monitor.check()
                assert monitor.firing == set()  # two stray requests are not an outage
                assert await post("/in/crm-events", forged) == 401
                await monitor.check()
                assert monitor.firing == {"webhooks_refused"}
                assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 1
                await monitor.check()  # still: no second line

                stamp = str(int(time.time()))
                good = {"webhook-id": "msg_2", "webhook-timestamp": stamp}
                good["webhook-signature"] = sign_webhook(SOURCE_SECRET, "msg_2", int(stamp), body)
                assert await post("/in/crm-events", good) == 202  # the secret is fixed
                await monitor.check()
                assert monitor.firing == set()
                assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 0

                for _ in range(5):  # refused again, but not for long yet
                    assert await post("/in/crm-events", forged) == 401
                clock.now += 299_000
                await monitor.check()
                assert monitor.firing == set()
    finally:
        await hub.close()
    alerts = [e for e in logs if e["event"].startswith("alert_")]
    assert [(e["event"], e["source"], e.get("refused"), e.get("since")) for e in alerts] == [
        ("alert_fired", "crm-events", 3, iso_from_ms(first)),
        ("alert_resolved", "crm-events", None, None),
    ]
    assert alerts[0]["error"] == "invalid_signature"


@contextlib.contextmanager
def hung_disk(spool: Spool) -> Iterator[None]:
    """Listing or writing the spool's directory hangs, as on an NFS mount whose server is
    gone, until the block ends (10 s at most)."""
    released = threading.Event()
    scandir = Path._scandir  # type: ignore[attr-defined]  # what Path.glob lists with
    probe = spool._probe_write

    def hung_scandir(path: Path) -> Any:
        if path == spool.directory:
            released.wait(10)
        return scandir(path)

    def hung_probe() -> str | None:
        released.wait(10)
        return probe()

    with pytest.MonkeyPatch.context() as disk:
        disk.setattr(Path, "_scandir", hung_scandir)
        disk.setattr(spool, "_probe_write", hung_probe)
        try:
            yield
        finally:
            released.set()


async def test_a_hung_spool_disk_holds_neither_webhooks_nor_health_nor_metrics(
    spooling_hub: tuple[Hub, ManualClock], store: SqlStore
) -> None:
    """The spool's directory was listed on the event loop (the drainer's every second, the
    health check's, the scrape's): a disk that hung held every request of the process,
    webhooks the store would commit included, and /health/detailed past its 3 s."""
    hub, _ = spooling_hub
    assert hub.spool is not None
    stop = asyncio.Event()
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        with hung_disk(hub.spool):
            started = time.monotonic()
            # Its first round lists the spool, as the webhook waits for the store.
            drainer = asyncio.create_task(SpoolDrainer(hub.spool, store).run(stop))
            accepted = await hub.accept(
                tenant_id="clinica-sol",
                source_id="crm-events",
                event_type="message.received",
                data={"i": 1},
                idempotency_key=None,
            )
            accepted_s = time.monotonic() - started
            started = time.monotonic()
            health = await http.get("/health/detailed", headers=ADMIN)
            health_s = time.monotonic() - started
            started = time.monotonic()
            metrics = await http.get("/metrics")
            metrics_s = time.monotonic() - started
            stop.set()
        await drainer
    assert accepted_s < READ_TIMEOUT_S and not accepted.spooled, accepted_s  # stored at once
    assert health_s < READ_TIMEOUT_S + 2, health_s
    assert (health.status_code, health.json()["status"]) == (200, "degraded")
    spool = health.json()["checks"]["spool"]
    assert (spool["status"], spool["error"]) == ("unwritable", "the disk gave no answer within 3 s")
    assert metrics_s < READ_TIMEOUT_S + 2, metrics_s
    assert metrics.status_code == 200 and "estafeta_spool_segments 0.0" in metrics.text


async def test_the_spool_alerts_fire_and_resolve_once(
    spooling_hub: tuple[Hub, ManualClock], store: SqlStore, tmp_path: Path
) -> None:
    hub, clock = spooling_hub
    assert hub.spool is not None
    monitor = AlertMonitor(store, threshold=1000, spool=hub.spool, clock=clock)
    spool_dir = tmp_path / "spool"
    with capture_logs() as logs:
        await monitor.check()
        await spool_one(hub)
        await monitor.check()
        assert monitor.firing == set()  # waiting a moment for the drainer is normal
        clock.now += 61_000
        await monitor.check()
        await monitor.check()  # still stalled: no second alert
        assert monitor.firing == {"spool_stalled"}
        assert REGISTRY.get_sample_value("estafeta_alert_firing", {"alert": "spool_stalled"}) == 1
        await hub.spool.drain(store)
        await monitor.check()
        assert monitor.firing == set()
        spool_dir.rmdir()
        await monitor.check()
        assert monitor.firing == {"spool_unwritable"}
        spool_dir.mkdir()
        await monitor.check()
    assert monitor.firing == set()
    alerts = [(e["event"], e["alert"]) for e in logs if e["event"].startswith("alert_")]
    assert alerts == [
        ("alert_fired", "spool_stalled"),
        ("alert_resolved", "spool_stalled"),
        ("alert_fired", "spool_unwritable"),
        ("alert_resolved", "spool_unwritable"),
    ]
    unwritable = next(e for e in logs if e.get("alert") == "spool_unwritable")
    assert unwritable["error"] == "ENOENT"


async def test_an_event_moved_back_from_quarantine_is_not_reported_stalled_at_once(
    spooling_hub: tuple[Hub, ManualClock], store: SqlStore, tmp_path: Path
) -> None:
    """operations.md, quarantined events: "move the file back into `spool_dir` (keep its
    name: it starts with the segment's creation time)". The drain's progress was counted
    from its last round with anything to drain, hours before on a quiet hub, and the file's
    name is as old: the spool read `stalled` (`spool_stalled` fired) the moment the file
    was back, before the drainer's next round could even look at it."""
    hub, clock = spooling_hub
    assert hub.spool is not None
    monitor = AlertMonitor(store, threshold=1000, spool=hub.spool, clock=clock)
    segment_ms = clock.now
    with capture_logs() as logs:
        await monitor.check()
        clock.now += 3 * 3_600_000  # hours with nothing spooled; the monitor looks every 5 s
        await monitor.check()
        event = hub.new_event(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={"i": 0},
            idempotency_key=None,
        )
        moved_back = f"{segment_ms:013d}-host-1-000000001-{event.id}.journal"
        (tmp_path / "spool" / moved_back).write_bytes(encode(event))
        clock.now += 1_000
        await monitor.check()
    assert monitor.firing == set()
    assert not [e for e in logs if e["event"] == "alert_fired"]


async def test_a_full_spool_degrades_health_and_fires_its_alert_once(
    config: Config, store: SqlStore, tmp_path: Path
) -> None:
    clock = ManualClock()
    spool = Spool(tmp_path / "spool", max_bytes=64, clock=clock)  # one event fills it
    hub = Hub(config, store, clock, spool=spool)
    monitor = AlertMonitor(store, threshold=1000, spool=spool, clock=clock)
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            with capture_logs() as logs:
                await spool_one(hub)  # kept during an outage, up to the bound
                full = await http.get("/health/detailed", headers=ADMIN)
                await monitor.check()
                await monitor.check()
                with pytest.raises(HttpError) as refused:  # what the status says
                    await spool_one(hub)
                assert refused.value.error == "spool_full"
                assert await spool.drain(store) == 1
                emptied = await http.get("/health/detailed", headers=ADMIN)
                await monitor.check()
    finally:
        await hub.close()
    # Before: "draining", and "ok" overall, while every webhook of an outage got 503.
    assert (full.status_code, full.json()["status"]) == (200, "degraded"), full.json()
    assert full.json()["checks"]["spool"]["status"] == "full"
    assert emptied.json()["checks"]["spool"]["status"] == "ok"
    alerts = [(e["event"], e["alert"]) for e in logs if e["event"].startswith("alert_")]
    assert alerts == [("alert_fired", "spool_full"), ("alert_resolved", "spool_full")]


class Outage:
    """The store as a `serve` process sees it, while `down` is true unreachable."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> Any:
        if self.down and name in ("queue_depths", "insert_events", "ping"):
            return self._unreachable
        return getattr(self.store, name)

    async def _unreachable(self, *_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailable("the store cannot be reached: ConnectionRefusedError")


def spool_monitor_through(
    outage: Outage, hub: Hub, clock: ManualClock
) -> tuple[Spool, AlertMonitor]:
    """The hub's spool, and a monitor of it that reads the store through `outage`."""
    spool = hub.spool
    assert spool is not None
    return spool, AlertMonitor(cast(SqlStore, outage), threshold=1000, spool=spool, clock=clock)


async def test_the_events_of_a_long_outage_are_not_stalled_the_moment_the_store_is_back(
    spooling_hub: tuple[Hub, ManualClock], store: SqlStore
) -> None:
    """Two hours of outage, the drainer trying every round: the store is back, and the drain
    is under way. Not a stuck drainer: no alert, not degraded; a drain that then gets
    nowhere for a minute still is one."""
    hub, clock = spooling_hub
    outage = Outage(store)
    spool, monitor = spool_monitor_through(outage, hub, clock)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        with capture_logs() as logs:
            outage.down = True
            await spool_one(hub)
            for _ in range(2):  # the monitor every 5 s, the drainer every second
                clock.now += 3600_000
                await monitor.check()
                with contextlib.suppress(StoreUnavailable):
                    await spool.drain(cast(SqlStore, outage))
            outage.down = False
            clock.now += 5_000  # back, the first segment being imported
            await monitor.check()
            firing_back = set(monitor.firing)
            back = (await http.get("/health/detailed", headers=ADMIN)).json()
            clock.now += 61_000  # and then nothing for a minute
            await monitor.check()
            stuck = (await http.get("/health/detailed", headers=ADMIN)).json()
    # Before: `spool_stalled` fired (and health said "degraded", waiting 2 h) at once.
    assert firing_back == set()
    alerts = [(e["event"], e["alert"]) for e in logs if e["event"].startswith("alert_")]
    assert alerts == [  # the outage, then once stuck, a minute later
        ("alert_fired", "store_down"),
        ("alert_resolved", "store_down"),
        ("alert_fired", "spool_stalled"),
    ]
    assert (back["status"], back["checks"]["spool"]["stalled"]) == ("ok", False), back
    assert back["checks"]["spool"]["waiting_s"] < 60
    assert (stuck["status"], stuck["checks"]["spool"]["stalled"]) == ("degraded", True)


async def test_a_full_spool_on_a_full_disk_fires_both_alerts_and_resolves_neither(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool reached its bound during an outage, and then the disk filled up as well:
    both are true, and `spool_full` must not read as over while it still holds max_bytes."""
    clock = ManualClock()
    spool = Spool(tmp_path / "spool", max_bytes=64, clock=clock)  # one event fills it
    hub = Hub(config, store, clock, spool=spool)
    monitor = AlertMonitor(store, threshold=1000, spool=spool, clock=clock)
    try:
        with capture_logs() as logs:
            await spool_one(hub)
            await monitor.check()
            monkeypatch.setattr(spool, "_probe_write", lambda: "ENOSPC")  # the disk is full
            await monitor.check()
    finally:
        await hub.close()
    assert monitor.firing == {"spool_full", "spool_unwritable"}
    alerts = [(e["event"], e["alert"]) for e in logs if e["event"].startswith("alert_")]
    # Before: ("alert_resolved", "spool_full") while the spool still held its bound.
    assert alerts == [("alert_fired", "spool_full"), ("alert_fired", "spool_unwritable")]


async def test_spool_stalled_fires_while_another_process_holds_the_segment_locked(
    config: Config, store: SqlStore, tmp_path: Path
) -> None:
    # operations.md, spool_stalled: "A segment another process holds locked (two `serve`
    # processes sharing one `spool_dir`, which they must not) is not drained here" -- a
    # cause of the alert. The drainer comes round every second and skips the segment; the
    # events wait, and no alert ever says so.
    clock = ManualClock()
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20, clock=clock)
    hub = Hub(config, store, clock, spool=spool)
    monitor = AlertMonitor(store, threshold=1000, spool=spool, clock=clock)
    try:
        await spool_one(hub)
        spool._close_segment()  # this process writes it no more ...
        (segment,) = sorted((tmp_path / "spool").glob("*.journal"))
        with open(segment, "rb") as other:  # ... held by another process
            fcntl.flock(other.fileno(), fcntl.LOCK_EX)
            with capture_logs():
                for _ in range(13):  # the drainer every second, the monitor every 5 s
                    for _ in range(5):
                        clock.now += 1_000
                        assert await spool.drain(store) == 0
                    await monitor.check()
            assert spool.stats().segments == 1  # the event still waits
            assert monitor.firing == {"spool_stalled"}
    finally:
        await hub.close()


async def test_no_workers_is_not_resolved_by_a_delivery_task_between_two_crashes(
    config: Config, store: SqlStore, clocked_hub: tuple[Hub, ManualClock]
) -> None:
    # A delivery task that runs a few seconds and crashes (a poison delivery whose result
    # cannot be recorded), restarted by `supervised` after its 30 s pause, is up about 5 s
    # in every 35 and delivers nothing. presence.py: it counts as delivering when its task
    # "ran the whole time since the one before"; the runbook: "runs while its delivery task
    # keeps crashing" is what no_workers is for.
    hub, clock = clocked_hub
    monitor = watching_workers(store, clock)
    worker, tasks = worker_whose_task_crashes(store, config, clock)
    start = clock.now
    with capture_logs() as logs:
        await worker.announce()
        await accept(hub, 1)
        # Crash at 0 s of each 35 s cycle, restarted at 30 s, crashes again at 35 s.
        for second in range(1, 601):
            clock.now = start + second * 1000
            phase = second % 35
            if phase == 0:
                tasks.crashed("worker", RuntimeError("boom"))
            elif phase == 30:
                tasks.down.clear()  # restarted after its pause
            if second % 10 == 0:
                await worker.announce()
            if second % 5 == 0:
                await monitor.check()
    alerts = [e["event"] for e in logs if e["event"].startswith("alert_")]
    # Fired once two minutes after the last steady run, standing while the task crashes.
    assert alerts == ["alert_fired"], alerts


@pytest.mark.postgres
async def test_the_monitor_comes_round_in_bounded_time_when_the_store_hangs(
    proxied_hub: tuple[Hub, TcpProxy],
) -> None:
    # operations.md: the alerts are "checked by every serve process every 5 s"; a hung
    # database (its connections open, nothing answered) held each round for the driver's
    # 30 s command timeout, and with it redis_down, the spool's alerts and no_workers.
    hub, proxy = proxied_hub
    monitor = AlertMonitor(hub.store, threshold=1000, spool=hub.spool, watch_workers=True)
    await monitor.check()
    proxy.freeze()
    started = time.monotonic()
    await monitor.check()
    elapsed = time.monotonic() - started
    assert elapsed < READ_TIMEOUT_S + 2, elapsed


async def test_a_webhook_retried_during_an_outage_is_counted_once_and_then_as_a_duplicate(
    config: Config, store: SqlStore, tmp_path: Path
) -> None:
    """A provider retries a webhook it sent while the store was down: answered as a
    duplicate of the spooled event, it is counted as one, as a retry answered by the store
    is; and the drain that imports the event counts nothing again."""
    outage = Outage(store)
    hub = Hub(config, cast(SqlStore, outage), spool=Spool(tmp_path / "spool", max_bytes=1 << 20))
    body = b'{"type": "message.received", "data": {"text": "hola"}}'

    def counted(outcome: str) -> float:
        labels = {"source": "crm-events", "outcome": outcome}
        return REGISTRY.get_sample_value("estafeta_events_accepted_total", labels) or 0.0

    async def post(webhook_id: str) -> httpx.Response:
        return await http.post("/in/crm-events", content=body, headers=signed(body, webhook_id))

    before = {outcome: counted(outcome) for outcome in ("stored", "duplicate", "spooled")}
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            outage.down = True
            first = await post("msg_outage")
            retried = await post("msg_outage")  # the provider's retry, still in the outage
            outage.down = False
            assert hub.spool is not None
            assert await hub.spool.drain(store) == 1
    finally:
        await hub.close()
    assert (first.status_code, first.headers.get("x-estafeta-spooled")) == (202, "1")
    assert (retried.status_code, retried.json()["duplicate"]) == (200, True)
    added = {outcome: counted(outcome) - was for outcome, was in before.items()}
    # Before: the retry answered from the spool was counted nowhere.
    assert added == {"stored": 0, "duplicate": 1, "spooled": 1}


async def test_the_attempt_of_a_worker_that_died_mid_send_is_counted_when_rescued(
    hub: Hub, store: SqlStore, config: Config
) -> None:
    """A worker killed mid-send never counted its attempt; the worker that rescues the lease
    records it (`lease_expired`, spending one of `max_attempts`) and so counts it: a
    delivery that kills its worker every time showed no failed attempt in
    estafeta_delivery_attempts_total, only, at last, a dead letter."""
    await accept(hub, 1)  # to crm
    retryable = {"destination": "crm", "outcome": "retryable"}
    before = REGISTRY.get_sample_value("estafeta_delivery_attempts_total", retryable) or 0.0
    # A worker leases it and dies without a word: a lease that has already expired.
    [lost] = await lease_any(store, now_ms=hub.clock.now_ms(), lease_ms=-1, worker_id="gone")
    assert await Worker(store, config).rescue_expired() == 1
    delivery = await only_delivery(store, lost.event_id)
    assert [a.error_class for a in delivery.attempt_log] == ["lease_expired"]
    after = REGISTRY.get_sample_value("estafeta_delivery_attempts_total", retryable) or 0.0
    assert after - before == 1


async def blip(outage: Outage, clock: ManualClock, monitor: AlertMonitor) -> None:
    """One round of the monitor the store does not answer, then one it does, 5 s apart."""
    outage.down = True
    clock.now += 5_000
    await monitor.check()
    outage.down = False
    clock.now += 5_000
    await monitor.check()


async def test_no_workers_stands_through_a_store_blip_while_no_worker_delivers(
    config: Config, store: SqlStore, clocked_hub: tuple[Hub, ManualClock]
) -> None:
    # The runbook: no_workers "resolves at the next check once one delivers". The grace after
    # a store outage (no process can record itself meanwhile) is for a worker's records to
    # catch up, not a sign that one delivers: a store that failed one round resolved the
    # alert, with no worker anywhere, and two minutes later it fired again.
    hub, clock = clocked_hub
    outage = Outage(store)
    monitor = watching_workers(cast(SqlStore, outage), clock)
    worker = Presence(store, config, process_id="worker-1", clock=clock)
    with capture_logs() as logs:
        await accept(hub, 1)
        clock.now += 120_000
        await monitor.check()
        assert monitor.firing == {"no_workers"}  # none was ever started
        await blip(outage, clock, monitor)
        assert monitor.firing == {"no_workers"}  # still no worker
        clock.now += 60_000
        await monitor.check()
        await worker.announce()  # one starts, and delivers
        await monitor.check()
        assert monitor.firing == set()
    alerts = [e["event"] for e in logs if e["event"].startswith("alert_")]
    # Before: fired, resolved by the blip, fired again 120 s after it, resolved.
    assert alerts == ["alert_fired", "alert_resolved"], alerts


async def test_spool_stalled_stands_through_a_store_blip_while_the_drain_gets_nowhere(
    spooling_hub: tuple[Hub, ManualClock], store: SqlStore
) -> None:
    # The runbook: spool_stalled "resolves once the drain gets through (spool_drained).
    # During a store outage it neither fires nor resolves." A store that failed one of the
    # monitor's rounds resolved it the moment it answered again, the drainer still stuck.
    hub, clock = spooling_hub
    outage = Outage(store)
    spool, monitor = spool_monitor_through(outage, hub, clock)
    with capture_logs() as logs:
        await spool_one(hub)
        clock.now += 61_000
        await monitor.check()
        assert monitor.firing == {"spool_stalled"}
        await blip(outage, clock, monitor)
        assert monitor.firing == {"spool_stalled"}  # nothing was drained
        clock.now += 60_000
        await monitor.check()
        assert await spool.drain(store) == 1  # a drainer that works again
        await monitor.check()
        assert monitor.firing == set()
    alerts = [(e["event"], e["alert"]) for e in logs if e["event"].startswith("alert_")]
    # Before: fired, resolved by the blip, fired again a minute later, resolved.
    assert alerts == [("alert_fired", "spool_stalled"), ("alert_resolved", "spool_stalled")]


async def test_a_store_down_for_long_is_alerted_and_resolved_when_it_answers(
    store: SqlStore,
) -> None:
    # The runbook's alerts had none for the store itself: a database down all day fired
    # nothing (spool_stalled and no_workers wait for the store by design, and the spool
    # takes the webhooks), so only a probe of /health/detailed could hear of it.
    clock = ManualClock(1_000_000)
    outage = Outage(store)
    monitor = AlertMonitor(
        cast(SqlStore, outage), threshold=1000, store_down_after_s=60, clock=clock
    )
    gauge = {"alert": "store_down"}
    with capture_logs() as logs:
        await monitor.check()
        outage.down = True
        await monitor.check()
        clock.now += 59_000
        await monitor.check()
        assert monitor.firing == set()  # a short outage fires nothing
        clock.now += 1_000
        await monitor.check()
        assert monitor.firing == {"store_down"}
        assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 1
        clock.now += 60_000
        await monitor.check()  # fired once
        outage.down = False
        await monitor.check()
        assert monitor.firing == set()
        assert REGISTRY.get_sample_value("estafeta_alert_firing", gauge) == 0
    alerts = [e for e in logs if e["event"].startswith("alert_")]
    assert [(e["event"], e["alert"]) for e in alerts] == [
        ("alert_fired", "store_down"),
        ("alert_resolved", "store_down"),
    ]
    fired = alerts[0]
    assert fired["down_s"] == 60 and fired["since"] == iso_from_ms(1_000_000)
    assert "ConnectionRefusedError" in fired["error"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_store_that_refuses_the_monitors_read_is_alerted_not_crashed_on(
    store: SqlStore, database_url: str
) -> None:
    # A role that may not read the deliveries (a grant missed when the database was set up,
    # or revoked since): the read failed with `the store failed: permission denied …`,
    # which the monitor did not expect, so every round crashed (`task_crashed`) before it
    # reached the other alerts, and nothing fired for the store that answered nothing.
    async with store_as_role(database_url, "noread") as (restricted, role):
        clock = ManualClock(1_000_000)
        monitor = AlertMonitor(restricted, threshold=1000, store_down_after_s=60, clock=clock)
        with capture_logs() as logs:
            await monitor.check()
            clock.now += 60_000
            await monitor.check()
            assert monitor.firing == {"store_down"}
            await execute(database_url, f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
            await monitor.check()
            assert monitor.firing == set()
        alerts = [e for e in logs if e["event"].startswith("alert_")]
        assert [(e["event"], e["alert"]) for e in alerts] == [
            ("alert_fired", "store_down"),
            ("alert_resolved", "store_down"),
        ]
        assert "permission denied" in alerts[0]["error"], alerts[0]
        assert "SQLSTATE 42501" in alerts[0]["error"], alerts[0]
