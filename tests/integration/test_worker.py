"""The delivery worker against real sinks on 127.0.0.1, on both engines."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
from sqlalchemy import update
from structlog.testing import capture_logs

from estafeta.clock import Clock, StoreClock, SystemClock
from estafeta.config import Config, load_config_dict
from estafeta.connectors.http import MAX_INTERIM_ANSWERS, HttpConnector
from estafeta.delivery.breakers import Breakers, StoreCircuitStore, circuit_state_store
from estafeta.delivery.circuit_store import (
    CircuitStateStore,
    FallbackCircuitStore,
    MemoryCircuitStore,
    RedisCircuitStore,
)
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import LOCAL_RESOURCES, Outcome, OutcomeKind
from estafeta.delivery.presence import Presence
from estafeta.delivery.rescue import Rescue
from estafeta.delivery.throttle import DestinationThrottle
from estafeta.delivery.worker import Worker
from estafeta.errors import LeaseRaced, StoreError, StoreUnavailable
from estafeta.hub import Hub
from estafeta.ids import new_id
from estafeta.observability.log_throttle import LogThrottle
from estafeta.observability.metrics import DEAD_LETTERED
from estafeta.redis_client import connect_redis
from estafeta.store import open_store, schema
from estafeta.store.records import DeadLetterFilter, EventView, NewDelivery
from estafeta.store.sqlstore import SqlStore
from estafeta.supervise import supervised
from estafeta.testing.sink import Sink
from tests.clocks import ManualClock
from tests.conftest import SINK_SECRET, base_config, lease_any
from tests.events import new_event
from tests.integration.redis_support import SHARED_REDIS_URL, LateRedis, RedisServer
from tests.integration.store_support import only_delivery

# A circuit that opens at the first failure and stays open 30 s: long enough that only the
# test's clock, moved by hand, lets a probe through.
OPENS_AT_ONCE = {"failures": 1, "reset_s": 30}


def config_for(database_url: str, sink: Sink, **destination: Any) -> Config:
    data = base_config(database_url)
    for d in data["destinations"]:
        d["url"] = f"{sink.url}/{d['id']}"
        d.update(destination)
    return load_config_dict(data)


async def publish(hub: Hub, event_type: str = "message.received", **data: Any) -> str:
    """Accept one event of clinica-sol through the API source; its id."""
    result = await hub.accept(
        tenant_id="clinica-sol",
        source_id="api",
        event_type=event_type,
        data=data,
        idempotency_key=None,
    )
    return result.event_id


class Running:
    """A hub and a worker in this event loop, wired as `estafeta serve` wires them (fresh
    deliveries handed over as they are stored) unless `handoff` is False (as `estafeta
    worker` runs); the worker starts at once, or at `start()` when `started` is False (to
    publish a backlog first); `stop()` shuts it down gracefully."""

    def __init__(
        self, store: SqlStore, config: Config, *, handoff: bool = True, started: bool = True
    ) -> None:
        self.hub = Hub(config, store)
        self.worker = Worker(
            store,
            config,
            wake=self.hub.deliveries_ready,
            handoff=self.hub.handoff if handoff else None,
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if started:
            self.start()

    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.run(self._stop))

    async def publish(self, event_type: str = "message.received", **data: Any) -> str:
        return await publish(self.hub, event_type, **data)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.hub.close()


@pytest.fixture
async def running(
    store: SqlStore, sink: Sink, database_url: str
) -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*, handoff: bool = True, **destination: Any) -> Running:
        hub = Running(store, config_for(database_url, sink, **destination), handoff=handoff)
        started.append(hub)
        return hub

    yield start
    for hub in started:
        await hub.stop()


async def settled(store: SqlStore, event_id: str, timeout_s: float = 10) -> EventView:
    """The event once none of its deliveries is pending or in flight."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        view = await store.get_event(event_id, None)
        assert view is not None
        if all(d.state not in ("pending", "in_flight") for d in view.deliveries):
            return view
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.05)


async def test_events_are_delivered_signed_with_the_event_id(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    hub = running()
    ids = [await hub.publish(n=n) for n in range(20)]
    assert await sink.wait_for(lambda s: len(s.delivered_ids) == 20, 10)
    assert sink.delivered_ids == set(ids) and sink.duplicates == 0
    assert sink.bad_signatures == []
    view = await settled(store, ids[0])
    [delivery] = view.deliveries
    assert delivery.state == "succeeded" and delivery.attempts == 1
    assert delivery.attempt_log[0].status_code == 200


async def test_failures_are_retried_with_backoff_then_delivered(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    sink.fail_first(2, 503)
    hub = running(max_attempts=5)
    event_id = await hub.publish()
    view = await settled(store, event_id)
    [delivery] = view.deliveries
    assert delivery.state == "succeeded" and delivery.attempts == 3
    outcomes = [(a.outcome, a.status_code, a.error_class) for a in delivery.attempt_log]
    assert outcomes == [
        ("retryable", 503, "http_503"),
        ("retryable", 503, "http_503"),
        ("success", 200, None),
    ]
    gaps = [
        b.started_at - a.started_at
        for a, b in zip(delivery.attempt_log, delivery.attempt_log[1:], strict=False)
    ]
    assert gaps[0] >= 50 and gaps[1] >= 100  # base 0.05 s, factor 2, no jitter


async def test_retry_after_is_honoured(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    sink.fail_first(1, 429, headers={"Retry-After": "1"})
    hub = running(max_attempts=3)
    event_id = await hub.publish()
    view = await settled(store, event_id, timeout_s=15)
    first, second = view.deliveries[0].attempt_log
    assert first.status_code == 429 and second.status_code == 200
    assert second.started_at - first.started_at >= 1000


@pytest.mark.parametrize("retry_after", ["0", "-1"])
async def test_a_retry_after_that_asks_no_wait_keeps_the_backoff(
    running: Callable[..., Running], sink: Sink, store: SqlStore, retry_after: str
) -> None:
    """`Retry-After: 0` asks for no wait, and "-1" is not RFC 9110's delay-seconds: the
    backoff decides. Before: both retried at once, so a destination answering every request
    so spent all of a delivery's attempts within milliseconds and sent it to the DLQ."""
    sink.fail_first(2, 503, headers={"Retry-After": retry_after})
    backoff = {"base_s": 0.2, "factor": 2, "max_s": 1, "jitter": 0}
    hub = running(max_attempts=3, backoff=backoff)
    event_id = await hub.publish()
    view = await settled(store, event_id, timeout_s=15)
    [delivery] = view.deliveries
    assert delivery.state == "succeeded" and delivery.attempts == 3
    first, second, third = delivery.attempt_log
    assert second.started_at - first.started_at >= 200
    assert third.started_at - second.started_at >= 400


async def test_a_permanent_error_goes_to_the_dlq_at_once(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    sink.respond(404)
    hub = running(max_attempts=5)
    event_id = await hub.publish()
    view = await settled(store, event_id)
    [delivery] = view.deliveries
    assert (delivery.state, delivery.attempts) == ("dead", 1)
    assert delivery.last_error == "http_404: Not Found"


async def test_an_answer_holding_a_nul_byte_is_recorded_once_not_resent(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    """PostgreSQL text cannot hold U+0000: the excerpt of such an answer is stored with
    U+FFFD instead of failing the attempt's record (which would resend after every lease),
    and so on SQLite, which kept the NUL: the same answer reads the same on both engines."""
    sink.respond(404, body=b"no such\x00patient")
    hub = running(max_attempts=5)
    event_id = await hub.publish()
    view = await settled(store, event_id)
    [delivery] = view.deliveries
    assert (delivery.state, delivery.attempts) == ("dead", 1)
    assert [a.response_excerpt for a in delivery.attempt_log] == ["no such\ufffdpatient"]
    assert len(sink.received) == 1


async def test_out_of_attempts_goes_to_the_dlq_and_replay_delivers(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    sink.respond(500)
    hub = running(max_attempts=2)
    event_id = await hub.publish()
    view = await settled(store, event_id)
    assert (view.deliveries[0].state, view.deliveries[0].attempts) == ("dead", 2)
    assert sink.delivered_ids == set()

    sink.respond(200)
    [dead] = await store.list_dead(DeadLetterFilter())
    assert await store.replay(
        DeadLetterFilter(delivery_ids=(dead.id,)), actor="t", now_ms=hub.hub.clock.now_ms()
    ) == [dead.id]
    hub.hub.deliveries_ready.set()
    view = await settled(store, event_id)
    [delivery] = view.deliveries
    assert delivery.state == "succeeded" and delivery.replays == 1
    assert sink.delivered_ids == {event_id}
    assert [a.status_code for a in delivery.attempt_log] == [500, 500, 200]


async def test_an_unreachable_destination_is_retried_as_a_connection_error(
    store: SqlStore, database_url: str
) -> None:
    data = base_config(database_url)  # destinations point at 127.0.0.1:9 (discard): refused
    data["destinations"][0]["max_attempts"] = 2
    hub = Running(store, load_config_dict(data))
    try:
        event_id = await hub.publish()
        view = await settled(store, event_id)
    finally:
        await hub.stop()
    [delivery] = view.deliveries
    assert delivery.state == "dead"
    assert {a.error_class for a in delivery.attempt_log} <= {
        "connection_refused",
        "connection_error",
    }


async def test_a_send_this_process_had_no_descriptor_for_spends_no_attempt_nor_circuit(
    running: Callable[..., Running],
    sink: Sink,
    store: SqlStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of descriptors (a flood of client connections on this host), sends fail before
    reaching the destination (test_http_connector.py shows the connector's outcome). That
    is no failure of the destination: its circuit, shared by every process, opened and
    fired `destination_down` for a sound destination, and the delivery was dead-lettered
    at its last attempt. It is retried instead, and delivered once descriptors are free."""
    real_deliver = HttpConnector.deliver
    short = 3  # sends made while descriptors are short

    async def out_of_descriptors_first(self: HttpConnector, delivery: LeasedDelivery) -> Outcome:
        nonlocal short
        if short > 0:
            short -= 1
            excerpt = "OSError: [Errno 24] Too many open files"
            return Outcome(
                OutcomeKind.RETRYABLE, 0.1, error_class=LOCAL_RESOURCES, response_excerpt=excerpt
            )
        return await real_deliver(self, delivery)

    monkeypatch.setattr(HttpConnector, "deliver", out_of_descriptors_first)
    with capture_logs() as logs:
        hub = running(max_attempts=2, circuit=OPENS_AT_ONCE)
        event_id = await hub.publish()
        view = await settled(store, event_id)
    [delivery] = view.deliveries
    assert delivery.state == "succeeded" and sink.delivered_ids == {event_id}
    assert [a.error_class for a in delivery.attempt_log] == [LOCAL_RESOURCES] * 3 + [None]
    assert [e for e in logs if e["event"].startswith("circuit_")] == []


async def test_results_the_circuit_store_cannot_take_log_a_line_a_minute_not_one_each(
    running: Callable[..., Running],
    sink: Sink,
    store: SqlStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of descriptors, pooled store connections answer (sends and their records go on)
    and new ones fail, as the circuits' updates did: `circuit_not_recorded` was logged for
    every failed attempt, hundreds a second. Now the first at once, then a minute apart
    with the count since the last line, as `store_unavailable` is."""

    async def unreachable(*_: Any, **__: Any) -> None:
        raise StoreUnavailable("the store cannot be reached: OSError (EMFILE: Too many open files)")

    monkeypatch.setattr(Breakers, "record", unreachable)
    sink.respond(503)
    with capture_logs() as logs:
        hub = running(max_attempts=1)
        for event_id in [await hub.publish(n=n) for n in range(5)]:
            assert (await settled(store, event_id)).deliveries[0].state == "dead"
    lines = [e for e in logs if e["event"] == "circuit_not_recorded"]
    assert [(e["destination"], e.get("count")) for e in lines] == [("crm", 1)]


async def _read_one_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
    length = next(int(v) for k, v in fields if k.strip().lower() == b"content-length")
    await reader.readexactly(length)


async def _cut_in_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_one_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")


async def _interim_without_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_one_request(reader)
    # One interim answer more than a client takes, then no final one until the client
    # hangs up (a client that waited for it would time out, past the test's deadline).
    # Written in a loop until the client hung up, they held this process's event loop, and
    # billing's sink with it, long enough for billing's 2 s timeout on a loaded machine.
    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * (MAX_INTERIM_ANSWERS + 1))
    await writer.drain()
    await reader.read()  # EOF: the client hung up


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("hostile", "last_error"),
    [
        (_cut_in_head, "connection_error: Server disconnected in the middle of the answer's head"),
        (
            _interim_without_end,
            "invalid_response: more than 100 interim (1xx) answers to one request",
        ),
    ],
    ids=["cut-in-head", "endless-1xx"],
)
async def test_a_hostile_destination_fails_its_delivery_with_a_reason_and_spares_the_others(
    store: SqlStore,
    sink: Sink,
    database_url: str,
    hostile: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    last_error: str,
) -> None:
    """crm's server breaks HTTP; billing's deliveries (the same events) go meanwhile, and
    crm's is dead-lettered at once, its last error saying why (not `code=200`, not a
    timeout after the worker spent it parsing what crm sent)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await hostile(reader, writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    data = base_config(database_url)
    crm, billing = data["destinations"][:2]
    crm.update(url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/crm", max_attempts=1)
    crm.update(timeout_s=30)  # the test's own deadline (10 s) is well before it
    billing["url"] = f"{sink.url}/billing"
    hub = Running(store, load_config_dict(data))
    try:
        ids = [await hub.publish("appointment.booked", status="confirmed", n=n) for n in range(5)]
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
        views = [await settled(store, event_id) for event_id in ids]
    finally:
        await hub.stop()
        server.close()
    for view in views:
        [to_crm] = [d for d in view.deliveries if d.destination_id == "crm"]
        assert (to_crm.state, to_crm.last_error) == ("dead", last_error)
        [attempt] = to_crm.attempt_log
        assert attempt.status_code is None
        assert attempt.duration_ms < 5_000


async def test_stopping_gives_unfinished_sends_back_without_an_attempt(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    sink.respond(200, delay_s=5)
    data = base_config(database_url)
    data["worker"]["shutdown_grace_s"] = 0.1
    for d in data["destinations"]:
        d["url"] = f"{sink.url}/{d['id']}"
        d["timeout_s"] = 10
    hub = Running(store, load_config_dict(data))
    event_id = await hub.publish()
    assert await sink.wait_for(lambda s: len(s.received) == 1, 5)
    await hub.stop()
    delivery = await only_delivery(store, event_id)
    assert (delivery.state, delivery.attempts) == ("pending", 0)


async def test_a_send_answered_when_the_grace_ends_keeps_its_result_and_is_not_sent_again(
    store: SqlStore, sink: Sink, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination answered 200 at once, but recording the result is slow (a contended
    circuits row, a slow Redis) and outlasts the grace: the send is over, so its result is
    recorded; given back unsent, the destination would get it twice."""
    sink.respond(200)
    data = base_config(database_url)
    data["worker"]["shutdown_grace_s"] = 0.05
    for d in data["destinations"]:
        d["url"] = f"{sink.url}/{d['id']}"
    hub = Running(store, load_config_dict(data))
    recording = asyncio.Event()

    async def slow_record(*args: Any, **kwargs: Any) -> None:
        recording.set()
        await asyncio.sleep(1)  # far longer than the grace

    monkeypatch.setattr(hub.worker.breakers, "record", slow_record)
    event_id = await hub.publish()
    await asyncio.wait_for(recording.wait(), 5)
    await hub.stop()
    delivery = await only_delivery(store, event_id)
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)
    assert len(sink.received) == 1


async def test_one_keys_deliveries_follow_each_other_without_waiting_for_the_poll(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Five deliveries of one ordering key (as every WhatsApp send to one recipient is) to a
    destination that answers at once, with a 30 s poll: each completion that frees the next
    of its key wakes the lease, so the chain takes far less than one poll, not one each."""
    hub = Running(store, worker_config(database_url, sink, poll_interval_s=30))
    try:
        ids = [
            (
                await hub.hub.accept(
                    tenant_id="clinica-sol",
                    source_id="api",
                    event_type="message.received",
                    data={"n": n},
                    idempotency_key=None,
                    ordering_key="5511999990000",
                )
            ).event_id
            for n in range(5)
        ]
        views = [await settled(store, event_id, timeout_s=10) for event_id in ids]
        assert {(d.state, d.attempts) for v in views for d in v.deliveries} == {("succeeded", 1)}
        assert [r.webhook_id for r in sink.received] == ids  # still one after another
    finally:
        await hub.stop()


async def rescued_while_leased(
    store: SqlStore, config: Config, leasing: Clock, lease_ms: int, rescuing: Clock
) -> tuple[int, list[tuple[str, int]]]:
    """One event published and its delivery leased for `lease_ms` by a worker on `leasing`'s
    clock, then a rescue by a worker on `rescuing`'s: how many it rescued, and the event's
    deliveries as (state, attempts)."""
    hub = Hub(config, store, clock=leasing)
    try:
        event_id = await publish(hub)
        await lease_any(store, now_ms=leasing.now_ms(), lease_ms=lease_ms, worker_id="leasing")
        rescued = await Worker(store, config, clock=rescuing).rescue_expired()
        view = await store.get_event(event_id, None)
        assert view is not None
        return rescued, [(d.state, d.attempts) for d in view.deliveries]
    finally:
        await hub.close()


async def test_a_worker_whose_machine_is_minutes_ahead_leaves_live_leases_alone(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Two machines whose clocks are 2 minutes apart, each process on the store's clock as
    `serve` and `worker` run: the worker ahead does not take the other's live lease for
    expired (which would send the delivery a second time)."""
    config = config_for(database_url, sink)
    real = SystemClock().now_ms()
    behind = StoreClock(store.clock_ms, wall=ManualClock(real - 120_000))
    ahead = StoreClock(store.clock_ms, wall=ManualClock(real + 120_000))
    await behind.sync()
    # The process ahead takes the store's time as it records its presence.
    await Presence(store, config, process_id="ahead", clock=ahead).announce()
    # Leased for 60 s by the machine behind, whose send is still under way.
    assert await rescued_while_leased(store, config, behind, 60_000, ahead) == (
        0,
        [("in_flight", 0)],
    )


async def test_a_worker_whose_store_time_came_late_leaves_live_leases_alone(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A process takes the store's time again at each record of its presence, taking it as
    read halfway through the round trip. A busy process's read first waits its turn for a
    pooled connection (seconds), the store answering at the end of the wait, not halfway:
    its clock went ahead by half the wait, and its worker took another's live lease for
    expired and sent the delivery again (a slow destination's lease outlives its longest
    send by a second). Such a slow read changes nothing."""
    config = config_for(database_url, sink)
    began_ns = [0]  # how long ago the next read of the store began, without sleeping

    def ticks() -> int:
        now, began_ns[0] = time.monotonic_ns() - began_ns[0], 0
        return now

    ahead = StoreClock(store.clock_ms, ticks_ns=ticks)
    await ahead.sync()
    busy = Presence(store, config, process_id="busy", clock=ahead)
    began_ns[0] = 6_000_000_000  # 6 s waiting for a connection, then a quick read
    await busy.announce()
    other = StoreClock(store.clock_ms)
    await other.sync()
    # Leased by the other process, whose send has 1.5 s left.
    assert await rescued_while_leased(store, config, other, 1_500, ahead) == (
        0,
        [("in_flight", 0)],
    )


async def test_a_keys_events_go_in_the_order_accepted_when_the_clock_steps_back(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A process's clock may step back: its store clock's every sync can move it back a
    millisecond or two (rounding, a round trip taken for symmetric), a step of the store's
    own clock by the step. A key's event accepted just after still goes after the one
    accepted just before: its delivery's id (the key's order) sorted before it, and the
    second event was sent first."""
    config = config_for(database_url, sink)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    worker = Worker(store, config, clock=clock)  # no handoff: polls by hand
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        accepted = []
        for n in range(2):
            result = await hub.accept(
                tenant_id="clinica-sol",
                source_id="api",
                event_type="message.received",
                data={"n": n},
                idempotency_key=None,
                ordering_key="5511999990000",
            )
            accepted.append(result.event_id)
            clock.now -= 2  # a sync took the store's time, 2 ms behind this process's count
        clock.now += 10
        deadline = asyncio.get_running_loop().time() + 10
        while len(sink.received) < 2:
            assert asyncio.get_running_loop().time() < deadline, sink.received
            await worker._step()
        assert [r.webhook_id for r in sink.received] == accepted
    finally:
        await worker._shutdown()
        await hub.close()


async def test_a_dead_workers_lease_is_rescued_and_counted(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    config = config_for(database_url, sink)
    hub = Hub(config, store)
    event_id = await publish(hub)
    # A worker leases it and dies without a word: a lease that has already expired.
    [lost] = await lease_any(store, now_ms=hub.clock.now_ms(), lease_ms=-1, worker_id="gone")
    worker = Worker(store, config)
    assert await worker.rescue_expired() == 1
    delivery = await only_delivery(store, event_id)
    assert (delivery.state, delivery.attempts) == ("pending", 1)
    assert delivery.attempt_log[0].error_class == "lease_expired"
    assert lost.id == delivery.id
    await hub.close()


async def test_a_busy_destination_is_not_failed_for_sends_that_waited_for_a_connection(
    running: Callable[..., Running], sink: Sink, store: SqlStore
) -> None:
    """200 deliveries at once to one destination that takes 5 s per request with a 9 s
    timeout: each is sent once and succeeds. A send waiting its turn for a connection must
    not spend its timeout while it waits: with a pool smaller than the worker's concurrency
    (aiohttp's default of 100, say) the second wave would start at 5 s and time out at 9
    without ever reaching the destination. The 4 s between answer and timeout is for a
    loaded host to open 200 connections in, the sink answering them on the same loop (0.6 s,
    1.2 s, then 1.8 s were not always enough: one send timed out in a full run on a 2-core
    host, its circuit opened and the rest waited past the test's bound)."""
    sink.respond(200, delay_s=5)
    hub = running(timeout_s=9)
    event_ids = await asyncio.gather(*(hub.publish(n=n) for n in range(200)))
    views = [await settled(store, event_id, timeout_s=30) for event_id in event_ids]
    attempts = [a for view in views for d in view.deliveries for a in d.attempt_log]
    assert [a.error_class for a in attempts if a.outcome != "success"] == []
    assert len(attempts) == 200
    assert len(sink.delivered_ids) == 200


async def test_a_send_that_outlives_its_timeout_is_ended_by_the_worker_and_retried(
    running: Callable[..., Running], store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connector that never returns (a bug, or a library ignoring its own timeout) must
    not hold its slot and its lease forever: the worker ends the send at the destination's
    timeout plus a 1 s margin and records it as a retryable timeout."""
    never = asyncio.Event()

    async def hang(self: HttpConnector, delivery: LeasedDelivery) -> Outcome:
        await never.wait()
        raise AssertionError("the hanging send was never ended")

    monkeypatch.setattr(HttpConnector, "deliver", hang)
    hub = running(timeout_s=0.2, max_attempts=2)
    event_id = await hub.publish()
    view = await settled(store, event_id, timeout_s=15)
    [delivery] = view.deliveries
    assert (delivery.state, delivery.attempts) == ("dead", 2)
    for attempt in delivery.attempt_log:
        assert (attempt.outcome, attempt.error_class) == ("retryable", "timeout")
        assert 1_100 <= attempt.duration_ms < 3_000  # 0.2 s + the 1 s margin, not forever
        assert attempt.response_excerpt == "no answer within 1.2 s"


def worker_config(database_url: str, sink: Sink, *, timeout_s: float = 2, **worker: Any) -> Config:
    data = base_config(database_url)
    data["worker"].update(worker)
    for d in data["destinations"]:
        d["url"] = f"{sink.url}/{d['id']}"
        d["timeout_s"] = timeout_s
    return load_config_dict(data)


async def test_fresh_deliveries_go_straight_to_the_worker_in_the_process_unleased(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """As `estafeta serve` runs: ingest stores each delivery in flight under its worker's
    lease and hands it over, so no lease statement is spent on fresh work (the poll lease
    is 30 s away here), and each is still sent once and recorded."""
    hub = Running(store, worker_config(database_url, sink, poll_interval_s=30))
    try:
        await settled(store, await hub.publish())  # the worker has started and leased
        leases = hub.worker.leases
        ids = [await hub.publish(n=n) for n in range(20)]
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
        assert hub.worker.leases == leases
        views = [await settled(store, event_id) for event_id in ids]
        assert {(d.state, d.attempts) for v in views for d in v.deliveries} == {("succeeded", 1)}
        assert sink.duplicates == 0
    finally:
        await hub.stop()


async def test_handed_over_and_leased_by_another_process_each_delivery_is_sent_once(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """`estafeta serve` (handing fresh deliveries to its worker) and an `estafeta worker` on
    its own connection to the same database, while events pour in; serve's worker stops
    half-way (hand-overs then go pending for the other). Each delivery reaches its receiver
    exactly once: a handed-over one is stored in flight, so no lease can take it too."""
    # serve's worker has slots to spare, so it takes fresh deliveries as they are stored
    # (never a backlog behind them); the other polls the store every 50 ms meanwhile. A send
    # that timed out would be resent, by design: on a loaded machine (a full `make test`
    # beside other work) a 2 s timeout expired, so the sends here have time to spare.
    config = worker_config(database_url, sink, timeout_s=30, concurrency=64, batch_size=64)
    sink.respond(200, delay_s=0.02)  # sends overlap the hand-overs and the other's leases
    serve = Running(store, config)
    elsewhere = open_store(config.storage.url)
    other = Worker(
        elsewhere, worker_config(database_url, sink, timeout_s=30, concurrency=8, batch_size=8)
    )
    stop_other = asyncio.Event()
    other_run = asyncio.create_task(other.run(stop_other))
    ids: list[str] = []
    half_way = asyncio.Event()

    async def publishing(k: int) -> None:
        for n in range(25):
            ids.append(await serve.publish("appointment.booked", status="confirmed", k=k, n=n))
            if len(ids) >= 100:
                half_way.set()

    async def stopping_serves_worker() -> None:
        await half_way.wait()
        serve._stop.set()
        assert serve._task is not None
        await serve._task

    def answered(s: Sink) -> Counter[tuple[str, str | None]]:
        return Counter((r.path, r.webhook_id) for r in s.received if r.status == 200)

    try:
        # Once serve's worker has leased and found nothing more waiting, it takes fresh work.
        ids.append(await serve.publish("appointment.booked", status="confirmed"))
        await settled(store, ids[0])
        await asyncio.gather(stopping_serves_worker(), *(publishing(k) for k in range(8)))
        expected = {(f"/{d}", i) for i in ids for d in ("crm", "billing")}
        assert await sink.wait_for(lambda s: set(answered(s)) >= expected, 30)
        assert serve.worker.sent > 0 and other.sent > 0
        stop_other.set()
        await other_run  # nothing left in flight: a late second send would be in `received`
        assert set(answered(sink)) == expected
        assert max(answered(sink).values()) == 1
        assert (await store.queue_stats(history=True)).by_state == {"succeeded": len(expected)}
    finally:
        stop_other.set()
        await other_run
        await serve.stop()
        await elsewhere.close()


async def test_without_the_handoff_the_worker_leases_what_ingest_stored(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """As `estafeta worker` runs (and the control for the test above): fresh deliveries
    wait pending and are leased."""
    hub = Running(store, worker_config(database_url, sink, poll_interval_s=30), handoff=False)
    try:
        await settled(store, await hub.publish())
        leases = hub.worker.leases
        ids = [await hub.publish(n=n) for n in range(5)]
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
        assert hub.worker.leases > leases
    finally:
        await hub.stop()


async def test_fresh_deliveries_wait_their_turn_behind_a_backlog(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """After a lease that filled its batch, more may be waiting in the store: fresh
    deliveries are then stored pending like any, not handed over ahead of older ones."""
    config = worker_config(database_url, sink, batch_size=2, concurrency=10)
    hub = Hub(config, store)
    worker = Worker(store, config, handoff=hub.handoff)
    hub.handoff.attach(worker)  # what `run` does first; its loop is driven by hand here
    leased: list[str] = []
    lease = store.lease

    async def recording_lease(**kwargs: Any) -> list[LeasedDelivery]:
        batch = await lease(**kwargs)
        leased.extend(d.event_id for d in batch)
        return batch

    store.lease = recording_lease  # type: ignore[method-assign]
    try:
        backlog = [await publish(hub) for _ in range(5)]
        assert await worker._step() == 2  # a full batch: the store may hold more
        fresh = await publish(hub)
        for _ in range(3):
            await worker._step()
        assert leased == [*backlog, fresh]  # the fresh one was leased, after the backlog
        # The last lease came back short: nothing due is left in the store, so fresh
        # deliveries are stored in flight for the worker, and not leased.
        assert await worker._step() == 0
        handed = await publish(hub)
        view = await store.get_event(handed, None)
        assert view is not None and view.deliveries[0].state == "in_flight"
        assert handed not in leased
    finally:
        store.lease = lease  # type: ignore[method-assign]
        await worker._shutdown()
        await hub.close()


@contextlib.contextmanager
def commits_held(store: SqlStore) -> Iterator[tuple[asyncio.Event, asyncio.Event]]:
    """(reached, release): inside, a batch being stored (already reserved for the worker)
    sets `reached` and waits for `release` before it is written."""
    reached, release = asyncio.Event(), asyncio.Event()
    insert_events = store.insert_events

    async def held(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await release.wait()
        return await insert_events(*args, **kwargs)

    store.insert_events = held  # type: ignore[method-assign]
    try:
        yield reached, release
    finally:
        store.insert_events = insert_events  # type: ignore[method-assign]


async def stopped_while_committing(store: SqlStore, config: Config) -> str:
    """Publish one event and stop the hub's worker while the batch that holds it, reserved
    for that worker, is being committed; returns the event's id once it is answered."""
    hub = Hub(config, store)
    worker = Worker(store, config, handoff=hub.handoff)
    hub.handoff.attach(worker)
    assert await worker._step() == 0
    try:
        with commits_held(store) as (committing, stopped):
            accepting = asyncio.create_task(publish(hub))
            await committing.wait()  # the batch is reserved for the worker and being stored
            await worker._shutdown()
            stopped.set()
            return await accepting
    finally:
        await hub.close()


async def test_deliveries_handed_to_a_worker_that_is_stopping_are_given_back_pending(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A batch whose commit ends after the worker began to stop: its deliveries, stored
    under that worker's lease, are made pending again at once for any worker to lease
    (not left to expire, which would cost them an attempt)."""
    event_id = await stopped_while_committing(store, worker_config(database_url, sink))
    delivery = await only_delivery(store, event_id)
    assert (delivery.state, delivery.attempts) == ("pending", 0)
    [leased] = await lease_any(store, now_ms=SystemClock().now_ms(), worker_id="another")
    assert leased.id == delivery.id


async def test_a_committed_batch_whose_leases_cannot_be_given_back_is_still_accepted(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """As above, but giving the leases back fails for a reason other than an unreachable
    store. The batch is committed: its request is answered with its id, not an error, and
    the batch is not stored again (a retry would fail on the event's id, or store a sender's
    retry twice). Its delivery stays leased until the lease expires and it is rescued."""

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the store failed: test")

    store.release = refused  # type: ignore[method-assign]
    try:
        event_id = await stopped_while_committing(store, worker_config(database_url, sink))
    finally:
        del store.release
    view = await store.get_event(event_id, None)
    assert view is not None
    assert [d.state for d in view.deliveries] == ["in_flight"]
    assert (await store.queue_stats(history=True)).by_state == {"in_flight": 1}


async def test_a_failed_commit_gives_the_reserved_slots_back(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """With one slot, a slot kept for a batch that then failed to commit would stall the
    worker for good; after the failure, fresh events are still handed over and sent."""
    hub = Running(store, worker_config(database_url, sink, concurrency=1, poll_interval_s=30))
    insert_events = store.insert_events
    try:
        await settled(store, await hub.publish())

        async def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("the store cannot be reached: test")

        store.insert_events = unreachable  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await hub.publish()
        store.insert_events = insert_events  # type: ignore[method-assign]
        ids = [await hub.publish(n=n) for n in range(3)]
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
    finally:
        store.insert_events = insert_events  # type: ignore[method-assign]
        await hub.stop()


async def test_a_commit_whose_answer_was_lost_gives_its_handed_deliveries_back(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """The batch reserved for the worker was committed, but the store's answer was lost (the
    connection dropped after PostgreSQL's one-statement commit): ingest fails the request
    (a sender's retry is a duplicate of it). Its delivery, stored in flight under the
    worker's lease, is given back and sent at once, not left until the lease expires (60 s)
    and rescued as an attempt never made."""
    hub = Running(store, worker_config(database_url, sink, poll_interval_s=30))
    insert_events = store.insert_events
    committed: list[str] = []

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        await insert_events(*args, **kwargs)
        committed.extend(e.id for e in args[0])
        raise StoreUnavailable("the connection dropped after the commit: test")

    try:
        await settled(store, await hub.publish())
        store.insert_events = answer_lost  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await hub.publish()
        store.insert_events = insert_events  # type: ignore[method-assign]
        [event_id] = committed
        assert await sink.wait_for(lambda s: event_id in s.delivered_ids, 10)
        view = await settled(store, event_id)
        assert [(d.state, d.attempts) for d in view.deliveries] == [("succeeded", 1)]
    finally:
        store.insert_events = insert_events  # type: ignore[method-assign]
        await hub.stop()


async def test_a_hand_over_during_a_lease_never_takes_the_slots_the_lease_fills(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Four slots, four deliveries waiting in the store; while the lease statement for them
    runs, four fresh events arrive. Both counted the same four slots free, and eight sends
    went out at once; the lease's slots are now taken until its deliveries are in flight."""
    sink.respond(200, delay_s=30)  # sends stay in flight until the stop cuts them short
    config = worker_config(
        database_url, sink, concurrency=4, poll_interval_s=30, shutdown_grace_s=0
    )
    hub = Hub(config, store)
    worker = Worker(store, config, handoff=hub.handoff)
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    assert await worker._step() == 0  # nothing waits: no backlog, fresh work is handed over
    for n in range(4):  # stored pending: nothing is attached to take them
        await publish(hub, n=n)
    hub.handoff.attach(worker)
    lease, leasing, proceed = store.lease, asyncio.Event(), asyncio.Event()

    async def held(**kwargs: Any) -> list[LeasedDelivery]:
        leasing.set()
        await proceed.wait()
        return await lease(**kwargs)

    store.lease = held  # type: ignore[method-assign]
    try:
        stepping = asyncio.create_task(worker._step())
        await leasing.wait()
        for n in range(4):  # fresh events while the lease statement runs
            await publish(hub, n=10 + n)
        proceed.set()
        assert await stepping == 4
        await worker._start_handed()
        assert len(worker._attempts.in_flight) == 4
    finally:
        store.lease = lease  # type: ignore[method-assign]
        await worker._shutdown()
        await hub.close()


async def test_a_snooze_the_store_refused_is_given_back_at_the_next_step_not_left_to_expire(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A delivery over its rate limit is snoozed (its lease given back, no attempt): the
    budget was spent since the lease (by another process). If the store cannot take that at
    the moment, the worker tries again at its next step: left in flight, its lease would
    expire and be rescued as a failed attempt never made."""
    hub, worker, published = await a_worker_with_budget_for_one_of_two(store, sink, database_url)
    with release_unreachable(store):
        assert await worker._step() == 0  # one sent, one snoozed: the snooze failed
    try:
        await worker._step()
        assert await sink.wait_for(lambda s: len(s.delivered_ids) == 1, 5)
        [snoozed] = published - sink.delivered_ids
        delivery = await only_delivery(store, snoozed)
        assert (delivery.state, delivery.attempts) == ("pending", 0)  # due at the refill
    finally:
        await worker._shutdown()
        await hub.close()


async def test_a_snooze_the_store_refuses_at_shutdown_is_logged_and_the_stop_completes(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A snoozed lease the store cannot take back when the worker stops is logged as
    `leases_not_released` with its count (operations.md): the stop completes, and the lease
    expires and is rescued later."""
    hub, worker, _ = await a_worker_with_budget_for_one_of_two(store, sink, database_url)
    try:
        with release_unreachable(store):
            assert await worker._step() == 0  # one sent, one snoozed: the snooze failed
            assert await sink.wait_for(lambda s: len(s.delivered_ids) == 1, 5)
            with capture_logs() as logs:
                await worker._shutdown()
        not_released = [entry for entry in logs if entry["event"] == "leases_not_released"]
        assert [entry["count"] for entry in not_released] == [1]
    finally:
        await hub.close()


async def a_worker_with_budget_for_one_of_two(
    store: SqlStore, sink: Sink, database_url: str
) -> tuple[Hub, Worker, set[str]]:
    """A worker whose rate-limit budget sends one delivery, and two events published: the
    worker's next step sends one and snoozes the other."""
    config = config_for(database_url, sink)
    hub = Hub(config, store)
    budget = Budget()
    budget.grant(1)
    worker = Worker(store, config, throttle=budget)  # type: ignore[arg-type]
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    return hub, worker, {await publish(hub, n=1), await publish(hub, n=2)}


@contextlib.contextmanager
def release_unreachable(store: SqlStore) -> Iterator[None]:
    """Meanwhile the store cannot take a lease given back."""
    release = store.release

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("the store cannot be reached: test")

    store.release = unreachable  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.release = release  # type: ignore[method-assign]


async def test_a_lease_that_lost_an_ordering_race_is_logged_and_the_next_one_delivers(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Two leases raced for one ordering key and this worker's lost (the database refused
    it, test_ordering_races.py): the worker logs it, does not stop, and leases at once."""
    config = config_for(database_url, sink)
    hub = Hub(config, store)
    worker = Worker(store, config)
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    event_id = await publish(hub)
    lease = store.lease

    async def raced(*args: Any, **kwargs: Any) -> Any:
        raise LeaseRaced()

    store.lease = raced  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            assert await worker._step() == 0
        assert [entry["event"] for entry in logs] == ["lease_raced"]
    finally:
        store.lease = lease  # type: ignore[method-assign]
    try:
        assert worker._wake.is_set()  # the next lease comes without waiting for the poll
        assert await worker._step() >= 1
        assert await sink.wait_for(lambda s: event_id in s.delivered_ids, 5)
    finally:
        await worker._shutdown()
        await hub.close()


async def test_a_store_that_fails_every_other_step_logs_a_line_a_minute(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Out of file descriptors, the store fails the steps that need a new connection and
    answers those a pooled one serves: logged once per outage, that was a
    `store_unavailable` and a `store_available` line at every other step, several a second
    for as long as it lasted. Now one of each, then at most one a minute, with the number
    of outages since the last."""
    ticks = [0.0]
    config = config_for(database_url, sink)
    worker = Worker(store, config)
    worker._store_lines = LogThrottle(monotonic=lambda: ticks[0])
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    lease = store.lease
    calls = 0

    async def flapping(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise StoreUnavailable("the store cannot be reached: OSError (EMFILE: …)")
        return await lease(*args, **kwargs)

    store.lease = flapping  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            for _ in range(20):  # ten outages within the minute
                ticks[0] += 1
                await worker._step()
            ticks[0] += 60
            for _ in range(4):  # two more, a minute later
                await worker._step()
    finally:
        store.lease = lease  # type: ignore[method-assign]
        await worker._shutdown()
    said = [(e["event"], e.get("outages")) for e in logs if e["event"].startswith("store_")]
    assert said == [
        ("store_unavailable", 1),
        ("store_available", None),
        ("store_unavailable", 10),
        ("store_available", None),
    ]


async def test_a_circuit_that_opens_while_a_batch_commits_holds_its_handed_deliveries_back(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Ingest reserves a batch for the worker while the destination's circuit is closed; it
    opens (sends to it failed) before the commit ends. The handed-over delivery to it is not
    sent: it goes back pending, no attempt counted, for the lease to hold back until the
    circuit lets a probe through. The other destination's is sent."""
    config = worker_config(database_url, sink)
    hub = Hub(config, store)
    worker = Worker(store, config, handoff=hub.handoff)
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    hub.handoff.attach(worker)
    assert await worker._step() == 0  # nothing waits: fresh deliveries are handed over
    try:
        with commits_held(store) as (committing, opened):
            accepting = asyncio.create_task(publish(hub, "appointment.booked", status="confirmed"))
            await committing.wait()  # reserved for the worker, both circuits closed
            failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=500, error_class="http_500")
            for _ in range(config.destinations[0].circuit.failures):
                now = hub.clock.now_ms()
                await worker.breakers.record("crm", failed, started_at=now, now_ms=now)
            assert "crm" in worker.breakers.not_closed()
            opened.set()
            event_id = await accepting
        await worker._start_handed()
        view = await settled_except(store, event_id, "crm")
        states = {d.destination_id: (d.state, d.attempts) for d in view.deliveries}
        assert states == {"crm": ("pending", 0), "billing": ("succeeded", 1)}
        assert [r.path for r in sink.received] == ["/billing"]
    finally:
        await worker._shutdown()
        await hub.close()


async def settled_except(
    store: SqlStore, event_id: str, destination_id: str, timeout_s: float = 10
) -> EventView:
    """The event once its deliveries other than to `destination_id` are settled."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        view = await store.get_event(event_id, None)
        assert view is not None
        others = [d for d in view.deliveries if d.destination_id != destination_id]
        if all(d.state not in ("pending", "in_flight") for d in others):
            return view
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.05)


@pytest.fixture
async def slow_and_fast() -> AsyncIterator[tuple[Sink, Sink]]:
    """crm's sink, answering as the test says, and billing's."""
    slow, fast = Sink(secret=SINK_SECRET), Sink(secret=SINK_SECRET)
    await slow.start()
    await fast.start()
    yield slow, fast
    await slow.stop()
    await fast.stop()


def crm_and_billing(database_url: str, slow: Sink, fast: Sink, **crm: Any) -> dict[str, Any]:
    """Four worker slots and a 30 s poll; crm (with these settings) on `slow`, billing on
    `fast`."""
    data = base_config(database_url)
    data["worker"].update(concurrency=4, poll_interval_s=30)
    data["destinations"][0].update(url=f"{slow.url}/crm", **crm)
    data["destinations"][1].update(url=f"{fast.url}/billing")
    return data


async def test_a_slow_destination_with_max_in_flight_leaves_the_other_slots_to_the_rest(
    store: SqlStore, database_url: str, slow_and_fast: tuple[Sink, Sink]
) -> None:
    """A backlog for a slow destination (0.2 s per answer) queued ahead of another
    destination's deliveries: capped at one send at a time, it takes one of the worker's four
    slots, and the other destination's deliveries go at once instead of waiting behind it."""
    slow, fast = slow_and_fast
    slow.respond(200, delay_s=0.2)
    data = crm_and_billing(database_url, slow, fast, max_in_flight=1)
    hub = Running(store, load_config_dict(data), handoff=False, started=False)
    try:
        backlog = [await hub.publish(n=n) for n in range(8)]  # message.* → crm only
        both = [
            await hub.publish("appointment.booked", status="confirmed", n=n) for n in range(4)
        ]  # → crm and billing
        hub.start()
        assert await fast.wait_for(lambda s: s.delivered_ids >= set(both), 10)
        assert len(slow.received) <= 2  # not the eight queued ahead of them
        assert await slow.wait_for(lambda s: len(s.delivered_ids) == 12, 20)
    finally:
        await hub.stop()
    arrivals = [r.at for r in slow.received]
    # One at a time: each request came after the previous one's 0.2 s answer.
    assert all(later - earlier >= 0.19 for earlier, later in itertools.pairwise(arrivals))
    assert set(backlog) <= slow.delivered_ids


async def test_a_slow_destinations_backlog_does_not_hold_another_destinations_deliveries(
    store: SqlStore, database_url: str, slow_and_fast: tuple[Sink, Sink]
) -> None:
    """No `max_in_flight` anywhere: crm answers in 0.3 s and has forty deliveries queued,
    every one of the worker's four slots busy with them, when billing's four arrive. They go
    at the next slots that free, not after crm's forty (ten rounds of 0.3 s)."""
    slow, fast = slow_and_fast
    slow.respond(200, delay_s=0.3)
    data = crm_and_billing(database_url, slow, fast)
    data["routes"][1]["priority"] = data["routes"][0]["priority"]  # not a priority's doing
    hub = Running(store, load_config_dict(data), handoff=False, started=False)
    try:
        backlog = [await hub.publish(n=n) for n in range(40)]  # message.* → crm only
        hub.start()
        assert await slow.wait_for(lambda s: len(s.received) >= 4, 10)
        both = [
            await hub.publish("appointment.booked", status="confirmed", n=n) for n in range(4)
        ]  # → crm and billing
        assert await fast.wait_for(lambda s: s.delivered_ids >= set(both), 10)
        assert len(slow.received) <= 12, len(slow.received)
        assert not set(backlog) <= slow.delivered_ids
    finally:
        await hub.stop()


async def test_a_slow_destinations_backlog_leaves_a_slot_for_another_tenants_fresh_event(
    store: SqlStore, database_url: str, slow_and_fast: tuple[Sink, Sink]
) -> None:
    """One clinic's destination answers in 10 s (a hanging one in its `timeout_s`) with a
    backlog; another's fresh event came while every slot of the worker waited on the slow
    one, and waited for a whole round of its answers: 4.7 s behind a 5 s destination at
    `concurrency` 256, every time, until the backlog was sent. A tenth of the slots is
    kept for destinations with nothing in flight, so it goes at once."""
    slow, fast = slow_and_fast
    slow.respond(200, delay_s=10)
    data = crm_and_billing(database_url, slow, fast, timeout_s=30)
    data["worker"].update(concurrency=10, poll_interval_s=0.05, shutdown_grace_s=0)
    data["routes"][1]["priority"] = data["routes"][0]["priority"]  # not a priority's doing
    data["destinations"][1]["tenant"] = data["routes"][1]["tenant"] = "outra"
    data["routes"][1]["destinations"] = ["billing"]
    hub = Running(store, load_config_dict(data), handoff=True, started=False)
    try:
        for n in range(30):  # message.* → crm only
            await hub.publish(n=n)
        hub.start()
        assert await slow.wait_for(lambda s: len(s.received) >= 9, 10)
        result = await hub.hub.accept(
            tenant_id="outra",
            source_id="api",
            event_type="appointment.booked",
            data={"status": "confirmed"},
            idempotency_key=None,
        )
        # Not after the crm's answers (10 s): well before, whatever the machine's load.
        assert await fast.wait_for(lambda s: result.event_id in s.delivered_ids, 5)
        assert len(slow.received) == 9  # the tenth slot was kept
    finally:
        await hub.stop()


async def test_a_delivery_to_a_destination_no_longer_configured_is_dead_lettered(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A destination removed from the configuration while deliveries to it waited: the
    worker finds them (leases name only configured destinations), and dead-letters each
    with the reason instead of leaving it pending forever; the others go as usual."""
    config = config_for(database_url, sink)
    retired = NewDelivery(id=new_id("dlv", 1), destination_id="old-crm", priority=2, max_attempts=5)
    kept = NewDelivery(id=new_id("dlv", 2), destination_id="crm", priority=2, max_attempts=5)
    orphan = new_event(new_id("evt", 1), retired, kept)
    await store.insert_events([orphan])
    hub = Running(store, config)
    try:
        view = await settled(store, orphan.id)
    finally:
        await hub.stop()
    states = {d.destination_id: (d.state, d.last_error) for d in view.deliveries}
    assert states["crm"] == ("succeeded", None)
    state, error = states["old-crm"]
    assert state == "dead" and "no destination 'old-crm' is configured" in (error or ""), error


async def test_a_delivery_of_another_tenant_to_a_reused_destination_id_is_not_sent(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A destination id that now belongs to another tenant (outra's `crm` removed, then
    clinica-sol's `crm` configured): outra's deliveries that still wait for `crm` must never
    reach clinica-sol's endpoint, signed with its secret; they are dead-lettered, as to a
    destination no longer configured, while clinica-sol's own deliveries to it go. Nor may
    they take clinica-sol's `rate_limit` from its own deliveries (each took a send's place in
    it, and clinica-sol's waited for the refill, here a minute; a backlog of them, hours)."""
    config = config_for(database_url, sink, rate_limit="1/minute")
    theirs = msgspec.structs.replace(
        new_event(
            new_id("evt", 1),
            NewDelivery(id=new_id("dlv", 1), destination_id="crm", priority=2, max_attempts=5),
        ),
        tenant_id="outra",
        source_id="outra-in",
    )
    mine = new_event(
        new_id("evt", 2),
        NewDelivery(id=new_id("dlv", 2), destination_id="crm", priority=2, max_attempts=5),
    )
    await store.insert_events([theirs, mine])
    hub = Running(store, config)
    try:
        their_view = await settled(store, theirs.id)
        my_view = await settled(store, mine.id)
    finally:
        await hub.stop()
    assert [(d.state, d.attempts) for d in my_view.deliveries] == [("succeeded", 1)]
    (delivery,) = their_view.deliveries
    assert delivery.state == "dead", delivery
    assert "no destination 'crm' is configured for tenant 'outra'" in (delivery.last_error or "")
    assert sink.delivered_ids == {mine.id}


async def test_another_tenants_deliveries_to_a_reused_id_are_never_its_circuits_probe(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """clinica-sol's `crm` failed and its circuit opened; outra's deliveries still waiting
    for `crm` (the id was outra's) are first in the queue. The poll once `reset_s` is over
    took one of them as the probe: dead-lettered unsent, it told nothing of crm, the probe
    was given back, and clinica-sol's own delivery waited a poll more for each of them (a
    backlog of them, for hours). They are dead-lettered beside the probe, which is a send."""
    sink.respond(500)
    config = config_for(database_url, sink, max_attempts=1, circuit=OPENS_AT_ONCE)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    worker = Worker(store, config, clock=clock)  # no handoff: polls by hand
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        failed = await publish(hub)  # message.* → crm only
        assert await worker._step() == 1
        await settled(store, failed)  # dead, and crm's circuit open
        theirs = [
            msgspec.structs.replace(
                new_event(
                    new_id("evt", n),
                    NewDelivery(
                        id=new_id("dlv", n), destination_id="crm", priority=1, max_attempts=5
                    ),
                    at=n,  # due long ago: first in the queue
                ),
                tenant_id="outra",
                source_id="outra-in",
            )
            for n in (1, 2, 3)
        ]
        await store.insert_events(theirs)
        mine = await publish(hub)
        sink.respond(200)
        clock.now += 31_000  # reset_s has passed: crm may be probed
        await worker._step()
        for event in theirs:
            view = await settled(store, event.id)
            assert [d.state for d in view.deliveries] == ["dead"], view
        view = await settled(store, mine)
        assert [(d.state, d.attempts) for d in view.deliveries] == [("succeeded", 1)]
        assert worker.breakers.not_closed() == set()
        assert [r.webhook_id for r in sink.received] == [failed, mine]
    finally:
        await worker._shutdown()
        await hub.close()


async def test_fresh_deliveries_to_a_capped_destination_are_stored_pending_and_leased(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Ingest hands nothing to a destination with `max_in_flight` (its room is the worker's
    to count): the delivery is stored pending, the commit wakes the worker, and its own
    lease takes it at once (the poll is 30 s away)."""
    data = base_config(database_url)
    data["worker"].update(poll_interval_s=30)
    for d in data["destinations"]:
        d["url"] = f"{sink.url}/{d['id']}"
    data["destinations"][0]["max_in_flight"] = 2
    hub = Running(store, load_config_dict(data))
    try:
        await settled(store, await hub.publish())  # the worker has started and leased
        leases = hub.worker.leases
        ids = [await hub.publish(n=n) for n in range(5)]
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
        assert hub.worker.leases > leases
        views = [await settled(store, event_id) for event_id in ids]
        assert {(d.state, d.attempts) for v in views for d in v.deliveries} == {("succeeded", 1)}
    finally:
        await hub.stop()


async def test_every_destination_is_leased_in_one_statement_capped_ones_within_their_cap(
    store: SqlStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two destinations with a `max_in_flight` and a backlog each: a step leases every
    destination by one statement (not one per destination, which grew with their number),
    each capped one for its own room, and neither ever has more sends in flight than its
    cap."""
    sink = Sink(secret=SINK_SECRET)
    await sink.start()
    sink.respond(200, delay_s=0.05)
    data = base_config(database_url)
    data["worker"].update(concurrency=8, poll_interval_s=30)
    data["destinations"][0].update(url=f"{sink.url}/crm", max_in_flight=1)
    data["destinations"][1].update(url=f"{sink.url}/billing", max_in_flight=2)
    hub = Running(store, load_config_dict(data), handoff=False, started=False)
    rooms: list[dict[str, int]] = []
    lease = store.lease

    async def counted_lease(**kwargs: Any) -> list[LeasedDelivery]:
        rooms.append(dict(kwargs["rooms"]))
        return await lease(**kwargs)

    monkeypatch.setattr(store, "lease", counted_lease)
    try:
        ids = [
            await hub.publish("appointment.booked", status="confirmed", n=n) for n in range(6)
        ]  # → crm and billing
        hub.start()
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
        assert await sink.wait_for(lambda s: len(s.received) == 12, 10)
    finally:
        await hub.stop()
        await sink.stop()
    everyone = {d["id"] for d in data["destinations"]}
    assert set(rooms[0]) == everyone  # all at once, the capped ones each for its room
    assert (rooms[0]["crm"], rooms[0]["billing"]) == (1, 2)
    assert all(r.get("crm", 0) <= 1 and r.get("billing", 0) <= 2 for r in rooms)
    for path, cap in (("/crm", 1), ("/billing", 2)):
        arrivals = sorted(r.at for r in sink.received if r.path == path)
        # At most `cap` of the 0.05 s answers overlap: request k + cap came after the k-th's.
        assert all(b - a >= 0.045 for a, b in zip(arrivals, arrivals[cap:], strict=False)), path


def redis_clients(url: str) -> int:
    """Connections to the Redis at `url`, but the one asking."""
    with redis.Redis.from_url(url, socket_timeout=5) as probe:
        me = probe.client_id()
        return sum(1 for c in probe.client_list() if int(c["id"]) != me)


async def test_a_stopped_worker_leaves_no_redis_connection_open(
    store: SqlStore, sink: Sink, database_url: str, own_redis: RedisServer
) -> None:
    # As `estafeta worker` runs: a worker alone, its circuits and rate limits in Redis.
    data = base_config(database_url, redis={"url": own_redis.url})
    for d in data["destinations"]:
        d.update(url=f"{sink.url}/{d['id']}", rate_limit="100/second")
    config = load_config_dict(data)
    publisher = Hub(config, store)
    ids = [await publish(publisher, "appointment.booked", n=n) for n in range(3)]
    await publisher.close()
    assert redis_clients(own_redis.url) == 0
    stop = asyncio.Event()
    running = asyncio.create_task(
        supervised("worker", lambda: Worker(store, config).run(stop), stop)
    )
    try:
        assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), 10)
        assert redis_clients(own_redis.url) > 0  # it did use Redis
    finally:
        stop.set()
        await running
    # Before: the circuit store's client stayed connected after the worker stopped.
    assert redis_clients(own_redis.url) == 0


class BehindProxy:
    """A worker driven by hand (`_step`), its circuits and rate limit in Redis behind `proxy`
    with a client timeout of `timeout_s`, their tries of Redis due on the test's clock `now`
    (monotonic seconds)."""

    def __init__(
        self, store: SqlStore, config: Config, proxy: LateRedis, prefix: str, timeout_s: float
    ) -> None:
        self.now = 1_000.0
        self.client = connect_redis(proxy.url, timeout_s=timeout_s)
        self.circuits = FallbackCircuitStore(
            RedisCircuitStore(self.client, prefix), monotonic=lambda: self.now
        )
        # A minute's window: every send of the test is still in it when the outage's are
        # added to Redis, however slow a loaded machine makes the steps between them.
        self.throttle = DestinationThrottle(
            {"crm": "100/minute"},
            redis_url=proxy.url,
            key_prefix=prefix,
            timeout_s=timeout_s,
            monotonic=lambda: self.now,
        )
        self.hub = Hub(config, store)
        self.worker = Worker(
            store, config, breakers=Breakers(self.circuits, config), throttle=self.throttle
        )

    async def deliver_one(self, store: SqlStore) -> None:
        """Publish an event for crm and have it delivered by one step of the worker."""
        self.worker.breakers._next_refresh = 0.0  # its circuits are due for a refresh too
        event_id = await publish(self.hub)
        await self.worker._step()
        view = await settled(store, event_id)
        assert view.deliveries[0].state == "succeeded"

    async def close(self) -> None:
        await self.circuits.aclose()  # the worker's own would be closed by `_shutdown`
        await self.worker._shutdown()
        await self.hub.close()
        await self.client.aclose()


async def test_a_silent_redis_is_tried_again_without_holding_back_deliveries(
    store: SqlStore, sink: Sink, database_url: str, shared_prefix: str
) -> None:
    """Redis hangs (stopped, or a proxy stopped forwarding): calls wait for the client's
    timeout. The first call that finds the outage does, but then every 5 s the circuit store
    and the throttle each tried Redis again from a delivery's own call, and the worker
    leased and sent nothing more until it timed out: deliveries stopped for a second (the
    default timeout) every 5 s. Redis is tried again in the background; no delivery waits."""
    config = config_for(database_url, sink)
    async with LateRedis(SHARED_REDIS_URL) as proxy:
        # A timeout past the test's bound: a delivery that waits for a try of Redis fails it.
        behind = BehindProxy(store, config, proxy, shared_prefix, timeout_s=30)
        await behind.worker._connectors.start()  # what `run` does first
        try:
            with capture_logs() as logs:
                proxy.refusing = True  # Redis is gone, and found so at once
                async with asyncio.timeout(10):
                    await behind.deliver_one(store)
                assert not behind.throttle.using_redis and not behind.circuits.using_primary
                proxy.refusing, proxy.silent = False, True  # now it hangs
                behind.now += 5.0  # both are due for another try of Redis
                async with asyncio.timeout(5):
                    await behind.deliver_one(store)
                    await behind.deliver_one(store)
            down = Counter(e["component"] for e in logs if e["event"] == "redis_unavailable")
            assert down == {"throttle": 1, "circuit_store": 1}
        finally:
            await behind.close()


async def test_redis_answering_again_is_used_again_after_a_try_in_the_background(
    store: SqlStore, sink: Sink, database_url: str, shared_prefix: str
) -> None:
    """Once Redis answers the try in the background, the next calls use it: the circuits and
    the rate limit are shared again (with the sends counted meanwhile), each component's
    `redis_available` logged once."""
    config = config_for(database_url, sink)
    async with LateRedis(SHARED_REDIS_URL) as proxy:
        behind = BehindProxy(store, config, proxy, shared_prefix, timeout_s=2)
        await behind.worker._connectors.start()
        try:
            with capture_logs() as logs:
                proxy.refusing = True
                async with asyncio.timeout(20):
                    await behind.deliver_one(store)  # counted in memory
                    proxy.refusing = False  # Redis answers again
                    await behind.deliver_one(store)  # not due for a try yet: memory
                    assert not behind.throttle.using_redis
                    behind.now += 5.0
                    await behind.deliver_one(store)  # starts the tries; sent from memory
                    await behind.throttle._failover.probed()
                    await behind.circuits._failover.probed()
                    assert behind.throttle.using_redis and behind.circuits.using_primary
                    await behind.deliver_one(store)  # through Redis
            redis_events = [
                (e["event"], e["component"]) for e in logs if e["event"].startswith("redis_")
            ]
            assert sorted(redis_events) == [
                ("redis_available", "circuit_store"),
                ("redis_available", "throttle"),
                ("redis_unavailable", "circuit_store"),
                ("redis_unavailable", "throttle"),
            ]
            # Back to the shared budget: the three sends of the outage were added to it.
            with redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5) as shared:
                [key] = shared.keys(f"{shared_prefix}throttle*")
                assert shared.llen(key) == 4  # crm's sends, newest first
        finally:
            await behind.close()


async def test_a_slow_redis_holds_back_no_destination_behind_a_rate_limited_one(
    store: SqlStore, sink: Sink, database_url: str, shared_prefix: str
) -> None:
    """Redis answers, but each answer takes 0.3 s (far away, overloaded: within the client's
    timeout, so no outage). crm has a rate limit (never reached), counted in Redis; billing
    has none. Each crm send asks Redis in turn, but billing's deliveries waited behind
    them: a backlog of 20 events to both reached billing at crm's pace, 0.3 s a delivery."""
    n = 20
    async with LateRedis(SHARED_REDIS_URL) as proxy:
        data = base_config(database_url, redis={"url": proxy.url, "key_prefix": shared_prefix})
        for d in data["destinations"]:
            d["url"] = f"{sink.url}/{d['id']}"
        data["destinations"][0]["rate_limit"] = "1000/second"  # crm's
        config = load_config_dict(data)
        running = Running(store, config, handoff=False, started=False)
        try:
            for i in range(n):
                await running.publish("appointment.booked", n=i)
            proxy.slow_s = 0.3
            running.start()

            def delivered(s: Sink, destination_id: str) -> int:
                return sum(
                    1 for r in s.received if r.path == f"/{destination_id}" and r.status == 200
                )

            assert await sink.wait_for(lambda s: delivered(s, "billing") == n, timeout_s=30)
            # crm's go one round trip after another; billing's did not wait for them.
            assert delivered(sink, "crm") < n // 2
            assert await sink.wait_for(lambda s: delivered(s, "crm") == n, timeout_s=30)
        finally:
            await running.stop()
    sent = Counter((r.path, r.webhook_id) for r in sink.received if r.status == 200)
    assert set(sent.values()) == {1}  # the event id is each of its deliveries' webhook-id


async def test_a_slow_redis_does_not_start_a_send_its_lease_no_longer_covers(
    store: SqlStore, sink: Sink, database_url: str, shared_prefix: str
) -> None:
    """A batch's sends to a rate-limited destination ask Redis one after another; Redis
    answering in 0.3 s, the last of 30 started 10 s after the lease, past its 6 s. Another
    worker's rescue (here the worker's own) took those in flight and sent them again:
    duplicates. A delivery whose lease cannot cover its send any more is given back unsent,
    to be leased again."""
    n = 30
    async with LateRedis(SHARED_REDIS_URL) as proxy:
        data = base_config(database_url, redis={"url": proxy.url, "key_prefix": shared_prefix})
        data["worker"]["lease_s"] = 6
        for d in data["destinations"]:
            d.update(url=f"{sink.url}/{d['id']}", timeout_s=1)
        data["destinations"][0]["rate_limit"] = "1000/second"  # crm's: never reached
        config = load_config_dict(data)
        sink.respond(delay_s=0.5)  # sends in flight when the rescue looks
        running = Running(store, config, handoff=False, started=False)
        assert running.worker.lease_ms == 6_000
        try:
            ids = [await running.publish(n=i) for i in range(n)]  # message.*: to crm only
            proxy.slow_s = 0.3
            with capture_logs() as logs:
                running.start()
                assert await sink.wait_for(lambda s: s.delivered_ids >= set(ids), timeout_s=40)
                for event_id in ids:
                    view = await settled(store, event_id, timeout_s=30)
                    assert [d.state for d in view.deliveries] == ["succeeded"]
        finally:
            await running.stop()
    assert sink.duplicates == 0
    assert len(sink.received) == n
    assert [e for e in logs if e["event"] == "leases_rescued"] == []


def rescuer(store: SqlStore, *, started_ms: int, at_ms: int) -> Rescue:
    """Another worker's rescue of crm's and billing's expired leases, its clock at `at_ms`."""
    return Rescue(
        store,
        clock=ManualClock(at_ms),
        rand=lambda: 0.5,
        policies={},
        limits={},
        lease_ms=30_000,
        worker_id="rescuer",
        destinations=["crm", "billing"],
        interval_s=1,
        started_ms=started_ms,
    )


async def test_a_delivery_the_rescue_dead_letters_is_counted_as_dead_lettered(
    store: SqlStore, config: Config
) -> None:
    """A worker died on the last attempts of two deliveries: the rescue of their leases moves
    them to the dead-letter queue, and estafeta_deliveries_dead_lettered_total, which graphs
    and alerts read, never heard of it."""
    hub = Hub(config, store)
    try:
        await publish(hub, "appointment.booked", status="booked")  # to crm and billing
        async with store.engine.begin() as conn:
            await conn.execute(update(schema.deliveries).values(attempts=2))  # max_attempts 3
        now = hub.clock.now_ms()
        assert len(await lease_any(store, now_ms=now, lease_ms=1)) == 2
        before = {d: DEAD_LETTERED.labels(d)._value.get() for d in ("crm", "billing")}
        rescue = rescuer(store, started_ms=now, at_ms=now + 10_000)
        assert await rescue.expired() == 2
        assert (await store.queue_stats()).by_state.get("dead") == 2
        after = {d: DEAD_LETTERED.labels(d)._value.get() for d in ("crm", "billing")}
        assert after == {d: n + 1 for d, n in before.items()}
    finally:
        await hub.close()


async def test_a_batch_leased_before_the_store_failed_is_sent_or_given_back_not_left_to_expire(
    store: SqlStore, sink: Sink, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery to a removed destination waits (an orphan), and one to crm. The worker
    leases both in one statement; then the read that asks whether a process started since
    names the orphan fails (the store went away for a moment). The leased batch is dropped:
    nothing is sent or given back, so crm's delivery sits in flight under a lease nobody
    holds until it expires and is rescued as a failed `lease_expired` attempt, for a send
    never made."""
    config = config_for(database_url, sink)
    retired = NewDelivery(id=new_id("dlv", 1), destination_id="old-crm", priority=2, max_attempts=5)
    kept = NewDelivery(id=new_id("dlv", 2), destination_id="crm", priority=2, max_attempts=5)
    event = new_event(new_id("evt", 1), retired, kept)
    await store.insert_events([event])
    worker = Worker(store, config)
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    live = store.live_destinations
    calls = 0

    async def flaky_live(**kwargs: Any) -> set[str]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the rescue's read succeeds; the one after the lease does not
            raise StoreUnavailable("connection reset")
        return await live(**kwargs)

    monkeypatch.setattr(store, "live_destinations", flaky_live)
    try:
        await worker._step()  # finds the orphan, leases both, then the read fails
        assert calls == 2
        for _ in range(3):  # the store is back
            await worker._step()
        assert await sink.wait_for(lambda s: event.id in s.delivered_ids, 5)
    finally:
        await worker._shutdown()
    view = await store.get_event(event.id, None)
    assert view is not None
    states = {d.destination_id: (d.state, d.attempts) for d in view.deliveries}
    assert states["crm"] == ("succeeded", 1), states


async def test_a_probe_never_takes_a_capped_destination_past_its_max_in_flight(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """crm takes one send at a time (`max_in_flight = 1`) and answers slowly. While this
    worker's one send to it is in flight, other workers' failures open crm's shared circuit
    (its reset already passed). This worker wins the probe and sends a second delivery to crm
    at once: two in flight to a destination capped at one."""
    # The first send stays in flight for the whole check (a 3 s answer left 1.5 s of margin
    # past the 1.5 s watch: a loaded host, slow at the set-up below, saw it answered and the
    # second delivery rightly sent); the stop gives it back at once, not after the grace.
    sink.respond(200, delay_s=60)
    data = base_config(database_url)
    data["worker"]["shutdown_grace_s"] = 0
    for d in data["destinations"]:
        d.update(url=f"{sink.url}/{d['id']}", max_in_flight=1, timeout_s=120)
    config = load_config_dict(data)
    hub = Running(store, config, handoff=False)
    try:
        first = await hub.publish(n=1)  # message.* → crm only
        assert await sink.wait_for(lambda s: len(s.received) == 1, 5)
        # Another worker's sends to crm failed a minute ago: the circuit is open, due a probe.
        others = Breakers(circuit_state_store(config, store), config)
        failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=500, error_class="http_500")
        then = hub.hub.clock.now_ms() - 60_000
        for _ in range(config.destinations[0].circuit.failures):
            await others.record("crm", failed, started_at=then, now_ms=then)
        await hub.publish(n=2)
        await asyncio.sleep(1.5)  # circuits refreshed (0.5 s), several polls (0.2 s)
        assert hub.worker._attempts.sending.get("crm", 0) <= 1
        assert len(sink.received) == 1, [r.webhook_id for r in sink.received]
        assert first == sink.received[0].webhook_id
    finally:
        await hub.stop()


class Budget:
    """A destination throttle whose budget the test hands out: `grant(n)` lets n more sends
    go; past them every send is told to wait a minute (as a spent `rate_limit` does)."""

    limited = frozenset({"crm"})  # the destination `publish`'s events are routed to
    using_redis = False  # every destination with room is asked, waiting deliveries or not

    def __init__(self) -> None:
        self.left = 0

    def grant(self, sends: int) -> None:
        self.left = sends

    async def acquire(self, destination_id: str) -> float | None:
        if self.left > 0:
            self.left -= 1
            return None
        return 60.0

    async def room(self, destination_id: str) -> int | None:
        # Not told ahead: the lease takes as much as it has room for, as when other processes
        # spend a shared budget between this one's lease and its sends.
        return None

    async def aclose(self) -> None:
        pass


@contextlib.asynccontextmanager
async def three_published_one_granted(
    store: SqlStore, sink: Sink, database_url: str, budget: Budget, *, handoff: bool = False
) -> AsyncIterator[tuple[Hub, Worker, ManualClock, list[str], int]]:
    """A worker driven by hand under `budget` (with ingest's hand-over if `handoff`), three
    events published a millisecond apart, then one step of the worker with room for one
    send: yields the hub, the worker, the clock, the events and the deliveries the step took."""
    config = config_for(database_url, sink)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    worker = Worker(
        store,
        config,
        clock=clock,
        throttle=budget,  # type: ignore[arg-type]
        handoff=hub.handoff if handoff else None,
    )
    if handoff:
        hub.handoff.attach(worker)
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        backlog = []
        for n in range(3):
            clock.now += 1
            backlog.append(await publish(hub, n=n))
        budget.grant(1)
        yield hub, worker, clock, backlog, await worker._step()
    finally:
        await worker._shutdown()
        await hub.close()


@contextlib.asynccontextmanager
async def three_leased_one_sent(
    store: SqlStore, sink: Sink, database_url: str, budget: Budget
) -> AsyncIterator[tuple[Hub, Worker, ManualClock, list[str]]]:
    """Three events leased together with room for one send under `budget`, which does not
    say ahead what it takes: the first is sent, the two others given back."""
    async with three_published_one_granted(store, sink, database_url, budget) as set_up:
        hub, worker, clock, backlog, taken = set_up
        assert taken == 3  # one sent, two given back until the refill
        yield hub, worker, clock, backlog


async def test_deliveries_held_back_by_the_rate_limit_keep_their_place_in_the_queue(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A delivery snoozed because its destination's budget was spent is sent before one
    accepted later (FIFO within a priority): given back due at the refill, it went behind
    every delivery accepted meanwhile, and under a steady stream at the limit it could wait
    for ever."""
    budget = Budget()
    async with three_leased_one_sent(store, sink, database_url, budget) as leased:
        hub, worker, clock, backlog = leased
        assert await sink.wait_for(lambda s: s.delivered_ids == {backlog[0]}, 5)
        clock.now += 1
        later = await publish(hub, n=3)  # accepted while the budget is spent

        clock.now += 61_000  # the budget refills: room for one send
        budget.grant(1)
        await worker._step()
        assert await sink.wait_for(lambda s: len(s.delivered_ids) == 2, 5)
        assert sink.delivered_ids == {backlog[0], backlog[1]}  # not `later`
        view = await store.get_event(later, None)
        assert view is not None and view.deliveries[0].attempts == 0


async def test_a_destination_whose_budget_is_spent_is_not_leased_again_until_it_refills(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Once a send was told to wait (its budget spent by another process since the lease),
    the worker stops leasing that destination until the budget refills (architecture.md,
    snooze.py): leased again at each step, its deliveries were only given back each time.
    And what was given back is not given back again at the next step."""
    budget = Budget()
    async with three_leased_one_sent(store, sink, database_url, budget) as leased:
        _hub, worker, clock, backlog = leased
        assert await sink.wait_for(lambda s: s.delivered_ids == {backlog[0]}, 5)
        clock.now += 59_000  # the send was told to wait a minute: still spent
        release, released = store.release, []

        async def counted(*args: Any, **kwargs: Any) -> Any:
            released.append(len(args[0]))
            return await release(*args, **kwargs)

        store.release = counted  # type: ignore[method-assign]
        try:
            assert await worker._step() == 0  # nothing leased
        finally:
            store.release = release  # type: ignore[method-assign]
        assert released == []  # nor given back again: those two were, once
        clock.now += 2_000  # the budget refills: room for one send
        budget.grant(1)
        assert await worker._step() == 2  # leased again: one sent, one given back
        assert await sink.wait_for(lambda s: len(s.delivered_ids) == 2, 5)
        assert sink.delivered_ids == {backlog[0], backlog[1]}


class StopsWhileAsked(Budget):
    """A budget with room for every send, whose `stop_at`-th ask is answered only after a
    stop signal came (a shared budget's Redis round trip, the SIGTERM meanwhile)."""

    def __init__(self, stop: asyncio.Event, stop_at: int) -> None:
        super().__init__()
        self.stop, self.stop_at = stop, stop_at
        self.asked = 0

    async def acquire(self, destination_id: str) -> float | None:
        self.asked += 1
        if self.asked == self.stop_at:
            self.stop.set()
        return None


async def test_a_stop_while_a_batch_starts_starts_no_more_of_it(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A stop signal that comes while a leased batch is being started (each send asks its
    destination's rate limit first: a Redis round trip for a shared one) ends the start:
    the batch's later deliveries are given back unsent. The worker went on asking, one
    round trip each, and sending the rest of the batch (a slow Redis: 0.3 s per ask, tens
    of seconds for a batch) before its graceful stop began, well past `shutdown_grace_s`."""
    config = config_for(database_url, sink)
    hub = Hub(config, store)
    stop = asyncio.Event()
    budget = StopsWhileAsked(stop, stop_at=2)
    worker = Worker(store, config, throttle=budget)  # type: ignore[arg-type]
    try:
        backlog = [await publish(hub, n=n) for n in range(3)]
        await asyncio.wait_for(worker.run(stop), 30)
    finally:
        await hub.close()
    assert budget.asked == 2  # none asked once stopping
    assert sink.delivered_ids == {backlog[0]}  # the send started before the signal ended
    for unsent in backlog[1:]:
        view = await store.get_event(unsent, None)
        assert view is not None
        assert [(d.state, d.attempts) for d in view.deliveries] == [("pending", 0)]


class SlowToAnswer(Budget):
    """A shared budget that counts a send when asked and answers `answer_ms` later on
    `clock`: Redis's round trip on a loaded machine, while the worker's loop runs other
    tasks."""

    def __init__(self, clock: ManualClock, answer_ms: int) -> None:
        super().__init__()
        self.clock, self.answer_ms = clock, answer_ms
        self.counted_at: list[int] = []

    async def acquire(self, destination_id: str) -> float | None:
        self.counted_at.append(self.clock.now)
        self.clock.now += self.answer_ms
        return await super().acquire(destination_id)


async def test_an_attempt_starts_when_its_rate_limit_counted_it_not_when_the_answer_came(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """An attempt's `started_at` is the moment its destination's budget counted the send.
    Stamped when the answer came back, the attempts of a shared budget recorded sends late
    by a varying round trip (up to 70 ms on a loaded machine), and a second of them showed
    more sends than the `rate_limit` allows (tests/chaos/test_shared_rate_limit.py)."""
    config = config_for(database_url, sink)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    budget = SlowToAnswer(clock, answer_ms=300)
    worker = Worker(store, config, clock=clock, throttle=budget)  # type: ignore[arg-type]
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        event_id = await publish(hub)
        budget.grant(1)
        assert await worker._step() == 1
        view = await settled(store, event_id)
        [attempt] = view.deliveries[0].attempt_log
        assert attempt.started_at == budget.counted_at[0]
    finally:
        await worker._shutdown()
        await hub.close()


class FreesMidBatch(Budget):
    """A moving window whose oldest send leaves it while a batch is being started: the
    answers run out of `grant`ed sends, then one more is granted at the next ask (as a
    window whose slots free at the pace its sends were made)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def acquire(self, destination_id: str) -> float | None:
        self.asked += 1
        wait = await super().acquire(destination_id)
        if wait is not None:
            self.grant(1)  # the slot frees right after this answer
        return wait


async def test_a_slot_freed_mid_batch_does_not_send_a_later_delivery_ahead(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Once a delivery of a batch is held back by its destination's rate limit, the rest
    of the batch's deliveries to it are held back too, in their places behind it: asked
    again for each, a moving window that freed a slot meanwhile sent a later delivery
    ahead of the held-back one."""
    budget = FreesMidBatch()
    async with three_leased_one_sent(store, sink, database_url, budget) as leased:
        backlog = leased[3]
        for held_back in backlog[1:]:
            view = await store.get_event(held_back, None)
            assert view is not None
            assert [(d.state, d.attempts) for d in view.deliveries] == [("pending", 0)]
        assert budget.asked == 2  # not asked again for the third once the second waits
        assert await sink.wait_for(lambda s: s.delivered_ids == {backlog[0]}, 5)


async def test_a_fresh_delivery_is_not_handed_over_ahead_of_its_destinations_held_back_ones(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """The last lease left a destination out (its rate limit was spent), so it says nothing
    of what that destination has waiting: once the budget refills, a fresh delivery to it
    is stored pending and leased behind the older ones, not handed over ahead of them."""
    config = config_for(database_url, sink)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    budget = Budget()
    worker = Worker(store, config, clock=clock, throttle=budget, handoff=hub.handoff)  # type: ignore[arg-type]
    hub.handoff.attach(worker)  # what `run` does first; its loop is driven by hand here
    await worker._connectors.start()
    try:
        first = await publish(hub, n=1)
        clock.now += 1
        held_back = await publish(hub, n=2)
        budget.grant(1)
        assert await worker._step() == 2  # one sent, one given back: the budget is spent
        assert await sink.wait_for(lambda s: s.delivered_ids == {first}, 5)

        clock.now += 61_000  # the budget refills: room for one send
        budget.grant(1)
        fresh = await publish(hub, n=3)
        view = await store.get_event(fresh, None)
        assert view is not None and view.deliveries[0].state == "pending"
        await worker._start_handed()
        await worker._step()
        assert await sink.wait_for(lambda s: len(s.delivered_ids) == 2, 5)
        assert sink.delivered_ids == {first, held_back}
    finally:
        await worker._shutdown()
        await hub.close()


async def test_a_throttled_backlog_is_leased_no_faster_than_its_rate_limit_sends_it(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A backlog to a destination limited to 5 sends a second is leased about as it is sent:
    leasing a whole batch at each refill and giving back what the budget refused cost the
    store a write per delivery leased and per delivery given back, 6× the sends here, and
    more the longer the backlog."""
    config = config_for(database_url, sink, rate_limit="5/second")
    hub = Running(store, config, handoff=False, started=False)
    backlog = [await hub.publish(n=n) for n in range(30)]
    writes = Counter[str]()
    lease, release = store.lease, store.release

    async def counted_lease(**kwargs: Any) -> list[LeasedDelivery]:
        leased = await lease(**kwargs)
        writes["leased"] += len(leased)
        return leased

    async def counted_release(*args: Any, **kwargs: Any) -> int:
        released = await release(*args, **kwargs)
        writes["given back"] += released
        return released

    store.lease = counted_lease  # type: ignore[method-assign]
    store.release = counted_release  # type: ignore[method-assign]
    try:
        hub.start()
        assert await sink.wait_for(lambda s: s.delivered_ids == set(backlog), 30)
    finally:
        await hub.stop()
        store.lease, store.release = lease, release  # type: ignore[method-assign]
    assert writes["leased"] + writes["given back"] <= 2 * len(backlog), writes


class Told(Budget):
    """A budget that says ahead how many sends it takes now, as the throttle's `room` does."""

    async def room(self, destination_id: str) -> int | None:
        return self.left


class Asked(Budget):
    """A budget whose `room` answers late, as a shared limit's Redis does: it notes who asked
    and how many asks were waiting at once."""

    limited = frozenset({"crm", "billing"})

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.waiting = self.most_waiting = 0

    async def room(self, destination_id: str) -> int | None:
        self.asked.append(destination_id)
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        await asyncio.sleep(0)  # the round trip: the other asks start meanwhile, if allowed
        self.waiting -= 1
        return 0


async def test_a_lease_waits_for_one_round_trip_of_rate_limits_not_one_per_destination(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """Each rate-limited destination's room is a Redis read when the limit is shared: asked
    one after another, a worker with many such destinations waited for each in turn before
    every lease. They are asked together, and destinations without a limit not at all."""
    config = config_for(database_url, sink)
    budget = Asked()
    worker = Worker(store, config, throttle=budget)  # type: ignore[arg-type]
    await worker._connectors.start()
    try:
        await worker._step()
    finally:
        await worker._shutdown()
    assert sorted(budget.asked) == ["billing", "crm"]
    assert budget.most_waiting == 2


async def test_a_lease_asks_no_shared_rate_limit_of_destinations_with_nothing_waiting(
    store: SqlStore, sink: Sink, database_url: str, shared_prefix: str
) -> None:
    """A hub of many tenants, each destination with a rate limit shared through Redis: every
    lease asked each one's room, a Redis round trip each whether anything waited for it or
    not. 300 such destinations cost an idle worker 300 round trips and about 20 ms of its
    event loop at every poll (0.2 s). Only those with deliveries waiting are asked now."""
    data = base_config(database_url, redis={"url": SHARED_REDIS_URL, "key_prefix": shared_prefix})
    for d in data["destinations"]:
        d.update(url=f"{sink.url}/{d['id']}", rate_limit="100/second")
    data["destinations"] += [
        {"id": f"clinic-{n}", "tenant": "outra", "url": sink.url, "rate_limit": "5/second"}
        for n in range(300)
    ]
    config = load_config_dict(data)
    hub = Hub(config, store)
    worker = Worker(store, config)
    asked: list[str] = []
    room = worker.throttle.room

    async def counted(destination_id: str) -> int | None:
        asked.append(destination_id)
        return await room(destination_id)

    worker.throttle.room = counted  # type: ignore[method-assign]
    await worker._connectors.start()
    try:
        assert await worker._step() == 0
        assert asked == []  # nothing waits: no round trip at all
        event_id = await publish(hub)  # one for crm
        assert await worker._step() == 1
        assert asked == ["crm"]
        assert worker.throttle.using_redis
        await settled(store, event_id)
    finally:
        await worker._shutdown()
        await hub.close()


@contextlib.asynccontextmanager
async def backlog_of_three_one_sent(
    store: SqlStore, sink: Sink, database_url: str
) -> AsyncIterator[tuple[Hub, Worker, ManualClock, Told, list[str]]]:
    """The same, with ingest's hand-over and a budget that says ahead what it takes: the
    lease takes only the first, sends it, and leaves the two others waiting in the store."""
    budget = Told()
    async with three_published_one_granted(
        store, sink, database_url, budget, handoff=True
    ) as set_up:
        hub, worker, clock, backlog, taken = set_up
        assert taken == 1  # the one send the budget takes: none given back
        assert await sink.wait_for(lambda s: s.delivered_ids == {backlog[0]}, 5)
        yield hub, worker, clock, budget, backlog


async def test_a_fresh_delivery_is_not_handed_over_ahead_of_a_backlog_its_budget_left_waiting(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """A lease takes no more of a destination's backlog than its rate limit sends now, and
    the rest waits in the store: once the budget refills, a fresh delivery to it is stored
    pending and leased behind those, not handed over ahead of them."""
    async with backlog_of_three_one_sent(store, sink, database_url) as (
        hub,
        worker,
        clock,
        budget,
        backlog,
    ):
        budget.grant(1)  # the budget refills: room for one send
        clock.now += 1
        fresh = await publish(hub, n=3)
        view = await store.get_event(fresh, None)
        assert view is not None and view.deliveries[0].state == "pending"
        await worker._start_handed()
        await worker._step()
        assert await sink.wait_for(lambda s: len(s.delivered_ids) == 2, 5)
        assert sink.delivered_ids == {backlog[0], backlog[1]}  # not `fresh`


async def test_a_fresh_delivery_is_not_handed_over_during_a_lease_its_budget_caps(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """The same backlog, one more of it sent at each refill: while the lease statement for
    the next one runs, a fresh delivery to the destination arrives. It was handed over
    (only once the lease was back was the destination marked as leaving a backlog), and the
    budget, refilled meanwhile, sent it ahead of the backlog's last delivery."""
    lease, leasing, proceed = store.lease, asyncio.Event(), asyncio.Event()

    async def held(**kwargs: Any) -> list[LeasedDelivery]:
        leasing.set()
        await proceed.wait()
        return await lease(**kwargs)

    async with backlog_of_three_one_sent(store, sink, database_url) as (
        hub,
        worker,
        clock,
        budget,
        backlog,
    ):
        budget.grant(1)  # the budget refills: room for one send
        store.lease = held  # type: ignore[method-assign]
        try:
            stepping = asyncio.create_task(worker._step())
            await leasing.wait()
            clock.now += 1
            fresh = await publish(hub, n=3)  # while the lease statement runs
            budget.grant(2)  # a moving window frees another slot meanwhile
            proceed.set()
            assert await stepping == 1
            await worker._start_handed()
            assert await sink.wait_for(lambda s: len(s.delivered_ids) >= 2, 5)
            await worker._step()  # the backlog's last, with the slot that freed
            assert await sink.wait_for(lambda s: len(s.delivered_ids) >= 3, 5)
            assert fresh not in sink.delivered_ids
            assert sink.delivered_ids == set(backlog)
        finally:
            store.lease = lease  # type: ignore[method-assign]


@pytest.mark.parametrize("committed", [False, True], ids=["lost", "answer-lost"])
async def test_a_result_the_store_could_not_take_is_recorded_once_it_is_back(
    store: SqlStore, sink: Sink, database_url: str, committed: bool
) -> None:
    """The destination answered, but the store was unreachable when the result was to be
    recorded (a failover of a few seconds). The result was dropped: the delivery stayed in
    flight until its lease expired (60 s), was rescued as a `lease_expired` attempt that
    never happened (its worker had not stopped) and sent again, and the answer the
    destination gave was never in the log. The worker now records it once the store is
    back, while its lease holds; and a record whose commit landed though its answer was
    lost (`committed`) is not recorded twice."""
    hub = Running(store, worker_config(database_url, sink, poll_interval_s=30))
    complete = store.complete_batch
    refused = 0
    back = asyncio.Event()  # the store took a record after refusing two

    async def store_down_twice(batch: Any, now_ms: int) -> Any:
        nonlocal refused
        if refused < 2:
            refused += 1
            if committed:
                await complete(batch, now_ms)
            raise StoreUnavailable("the store cannot be reached: test")
        applied = await complete(batch, now_ms)
        back.set()
        return applied

    store.complete_batch = store_down_twice  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            event_id = await hub.publish()
            await asyncio.wait_for(back.wait(), 10)
    finally:
        store.complete_batch = complete  # type: ignore[method-assign]
        await hub.stop()
    view = await settled(store, event_id)
    [delivery] = view.deliveries
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)
    assert [(a.number, a.status_code) for a in delivery.attempt_log] == [(1, 200)]
    assert [r.webhook_id for r in sink.received] == [event_id]
    assert not [e for e in logs if e["event"] in ("attempt_not_recorded", "attempt_crashed")]


async def test_a_result_the_store_never_took_is_logged_with_why(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    """The destination answered, and the store refused every record of it (a full disk)
    until the worker gave up: `attempt_not_recorded` named the delivery but not why, the
    one line an operator had for an answer that was lost."""
    hub = Running(store, worker_config(database_url, sink, poll_interval_s=30))
    complete = store.complete_batch
    tried = asyncio.Event()
    full = "the store cannot be reached: OperationalError (SQLITE_FULL: database or disk is full)"

    async def disk_full(batch: Any, now_ms: int) -> Any:
        tried.set()
        raise StoreUnavailable(full)

    store.complete_batch = disk_full  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            try:
                await hub.publish()
                await asyncio.wait_for(tried.wait(), 10)
            finally:
                await hub.stop()  # the record offered again meanwhile: given up now
    finally:
        store.complete_batch = complete  # type: ignore[method-assign]
    [line] = [e for e in logs if e["event"] == "attempt_not_recorded"]
    assert line["error"] == full, line


@pytest.fixture(params=["store", "memory", "redis"])
async def circuits(
    request: pytest.FixtureRequest, store: SqlStore
) -> AsyncIterator[CircuitStateStore]:
    """Where the worker's circuits live: the store's table (no Redis configured), process
    memory (Redis down), or the shared Redis under this test's own prefix."""
    if request.param == "store":
        yield StoreCircuitStore(store)
    elif request.param == "memory":
        yield MemoryCircuitStore()
    else:
        prefix: str = request.getfixturevalue("shared_prefix")
        client = connect_redis(SHARED_REDIS_URL)
        yield FallbackCircuitStore(RedisCircuitStore(client, prefix))
        await client.aclose()


async def test_an_open_circuit_with_nothing_waiting_is_not_probed_and_every_change_is_logged(
    store: SqlStore, sink: Sink, database_url: str, circuits: CircuitStateStore
) -> None:
    """crm's only delivery failed into the DLQ and opened its circuit. Once `reset_s` has
    passed, each poll claimed the probe (`circuit_half_open`, from `open`), found nothing to
    send and put the circuit back to open without a word or a counted transition: the log
    said half_open again and again, from open, with no attempt between. After a replay, one
    probe is sent and closes the circuit, and the log and the counted transitions agree."""
    sink.respond(500)
    config = config_for(database_url, sink, max_attempts=1, circuit=OPENS_AT_ONCE)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    breakers = Breakers(circuits, config)
    worker = Worker(store, config, clock=clock, breakers=breakers)  # no handoff: polls by hand
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        event_id = await publish(hub)  # message.* → crm only
        with capture_logs() as logs:
            assert await worker._step() == 1
            view = await settled(store, event_id)
            assert (view.deliveries[0].state, view.deliveries[0].attempts) == ("dead", 1)
            clock.now += 31_000  # reset_s has passed: crm may be probed
            for _ in range(3):  # three polls with nothing of crm's waiting
                await worker._step()
            sink.respond(200)
            [dead] = await store.list_dead(DeadLetterFilter())
            await store.replay(
                DeadLetterFilter(delivery_ids=(dead.id,)), actor="t", now_ms=clock.now
            )
            assert await worker._step() == 1  # the probe
            view = await settled(store, event_id)
        assert view.deliveries[0].state == "succeeded"
        assert len(sink.received) == 2  # the failed attempt, then the probe: once each
        changes = [(e["event"], e["previous"]) for e in logs if e["event"].startswith("circuit_")]
        assert changes == [
            ("circuit_open", "closed"),
            ("circuit_half_open", "open"),
            ("circuit_closed", "half_open"),
        ]
        counted = Counter({("crm", e.removeprefix("circuit_")): 1 for e, _ in changes})
        assert worker.breakers.transitions == counted
    finally:
        await worker._shutdown()
        await hub.close()


async def test_a_probe_the_rate_limit_held_back_reopens_the_circuit_logged_and_counted(
    store: SqlStore, sink: Sink, database_url: str, circuits: CircuitStateStore
) -> None:
    """The probe's delivery is leased, but crm's budget is spent: it goes back unsent and the
    circuit back to open, for the next poll with budget to probe. That change was silent:
    the next probe logged `circuit_half_open` from `open` with no `circuit_open` before it,
    and `estafeta_circuit_transitions_total` never counted the return to open."""
    config = config_for(database_url, sink, circuit=OPENS_AT_ONCE)
    clock = ManualClock(SystemClock().now_ms())
    hub = Hub(config, store, clock)
    budget = Budget()
    breakers = Breakers(circuits, config)
    worker = Worker(store, config, clock=clock, throttle=budget, breakers=breakers)  # type: ignore[arg-type]
    await worker._connectors.start()  # what `run` does first; its loop is driven by hand
    try:
        failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=500, error_class="http_500")
        with capture_logs() as logs:
            await worker.breakers.record("crm", failed, started_at=clock.now, now_ms=clock.now)
            event_id = await publish(hub)  # message.* → crm only; waits for the circuit
            clock.now += 31_000  # reset_s has passed: crm may be probed, but no budget
            assert await worker._step() == 1  # leased for the probe, given back unsent
            assert sink.received == []
            clock.now += 61_000  # the budget refills
            budget.grant(1)
            assert await worker._step() == 1  # the probe
            view = await settled(store, event_id)
        assert (view.deliveries[0].state, view.deliveries[0].attempts) == ("succeeded", 1)
        assert len(sink.received) == 1
        changes = [(e["event"], e["previous"]) for e in logs if e["event"].startswith("circuit_")]
        assert changes == [
            ("circuit_open", "closed"),
            ("circuit_half_open", "open"),
            ("circuit_open", "half_open"),
            ("circuit_half_open", "open"),
            ("circuit_closed", "half_open"),
        ]
        assert worker.breakers.transitions == Counter(
            {("crm", "open"): 2, ("crm", "half_open"): 2, ("crm", "closed"): 1}
        )
    finally:
        await worker._shutdown()
        await hub.close()


@pytest.mark.parametrize(
    ("answer", "attempts_before", "state", "dead_lettered"),
    [(400, 0, "pending", 0), (500, 2, "dead", 1)],
    ids=["permanent-error-after-rescue", "last-attempt-after-rescue"],
)
async def test_a_result_recorded_after_its_lease_was_rescued_is_not_counted_as_dead_lettered(
    store: SqlStore,
    sink: Sink,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    answer: int,
    attempts_before: int,
    state: str,
    dead_lettered: int,
) -> None:
    """A send whose answer comes only after its lease expired and another worker rescued
    the delivery (a stalled process, a slow commit): the store keeps the rescuer's
    transition and ignores the late one. estafeta_deliveries_dead_lettered_total counted the
    late worker's decision all the same: a 400 answered after the rescue made the delivery
    pending again was counted as dead-lettered though nothing entered the dead-letter queue,
    and a last attempt that the rescue dead-lettered was counted twice (seen in a soak: the
    counter summed over the processes ran past the deaths the store holds)."""
    sink.respond(answer)
    deliver = HttpConnector.deliver
    answered, rescued_meanwhile = asyncio.Event(), asyncio.Event()

    async def answered_late(self: HttpConnector, delivery: LeasedDelivery) -> Outcome:
        outcome = await deliver(self, delivery)
        answered.set()
        await rescued_meanwhile.wait()
        return outcome

    monkeypatch.setattr(HttpConnector, "deliver", answered_late)
    config = worker_config(database_url, sink, timeout_s=10, poll_interval_s=30)
    hub = Running(store, config, started=False)
    event_id = await hub.publish()
    async with store.engine.begin() as conn:
        await conn.execute(update(schema.deliveries).values(attempts=attempts_before))
    before = DEAD_LETTERED.labels("crm")._value.get()
    try:
        hub.start()
        await asyncio.wait_for(answered.wait(), 10)
        now = hub.worker.clock.now_ms()
        rescue = rescuer(store, started_ms=now, at_ms=now + 120_000)  # past the 60 s lease
        assert await rescue.expired() == 1
        rescued_meanwhile.set()
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # until the late answer is recorded too
            view = await store.get_event(event_id, None)
            assert view is not None
            if len(view.deliveries[0].attempt_log) == 2:
                break
            assert asyncio.get_running_loop().time() < deadline, view
            await asyncio.sleep(0.05)
    finally:
        rescued_meanwhile.set()
        await hub.stop()
    [delivery] = view.deliveries
    errors = sorted(str(a.error_class) for a in delivery.attempt_log)
    assert (delivery.state, errors) == (state, sorted(["lease_expired", f"http_{answer}"]))
    assert DEAD_LETTERED.labels("crm")._value.get() - before == dead_lettered
