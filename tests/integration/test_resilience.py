"""One sick destination never makes the others sick: circuit breakers, rate limits and
per-key ordering, with a real worker and real sinks on 127.0.0.1, on both engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from estafeta.config import load_config_dict
from estafeta.delivery.circuit import CircuitState
from estafeta.errors import StoreUnavailable
from estafeta.hub import Hub
from estafeta.store.records import DeadLetterFilter
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.conftest import SINK_SECRET, base_config
from tests.integration.test_worker import Running, settled


@pytest.fixture
async def sinks() -> AsyncIterator[tuple[Sink, Sink]]:
    crm, billing = Sink(secret=SINK_SECRET), Sink(secret=SINK_SECRET)
    await crm.start()
    await billing.start()
    yield crm, billing
    await crm.stop()
    await billing.stop()


def hub_config(
    database_url: str, crm_sink: Sink, billing_sink: Sink, **overrides: Any
) -> dict[str, Any]:
    """The base configuration with crm and billing pointing at the sinks; `overrides` keyed by
    destination id (or "worker") change those sections."""
    data = base_config(database_url)
    data["worker"].update(overrides.pop("worker", {}))
    for d, sink in zip(data["destinations"][:2], (crm_sink, billing_sink), strict=True):
        d["url"] = f"{sink.url}/{d['id']}"
        d["max_attempts"] = 50
        d.update(overrides.get(d["id"], {}))
    return data


@asynccontextmanager
async def running(store: SqlStore, data: dict[str, Any]) -> AsyncIterator[Running]:
    """A hub and its worker on the configuration `data`, stopped when the block ends."""
    hub = Running(store, load_config_dict(data))
    try:
        yield hub
    finally:
        await hub.stop()


async def circuit_becomes(hub: Running, destination_id: str, state: CircuitState) -> None:
    """Wait (bounded) until the shared state shows the destination's circuit in `state`."""
    deadline = time.monotonic() + 10
    while True:
        circuit = (await hub.worker.breakers._states.get_all()).get(destination_id)
        if circuit is not None and circuit.state is state:
            return
        assert time.monotonic() < deadline, f"{destination_id} never became {state}"
        await asyncio.sleep(0.02)


async def none_in_flight(store: SqlStore, timeout_s: float = 10) -> dict[str, int]:
    """Counts by state once no delivery is in flight: a sink has a request as soon as it
    arrives, its outcome is recorded only after the answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        by_state = (await store.queue_stats(history=True)).by_state
        if not by_state.get("in_flight"):
            return by_state
        assert time.monotonic() < deadline, by_state
        await asyncio.sleep(0.02)


async def publish(
    hub: Running, n: int, event_type: str = "appointment.booked", **data: Any
) -> list[str]:
    return [await hub.publish(event_type, status="confirmed", n=i, **data) for i in range(n)]


def billing_down(
    database_url: str,
    sinks: tuple[Sink, Sink],
    circuit: dict[str, Any],
    *,
    concurrency: int,
    delay_s: float = 0.0,
) -> dict[str, Any]:
    """Billing answers 503 (after `delay_s`) and its circuit is `circuit`; the worker sends
    `concurrency` at a time."""
    crm, billing = sinks
    billing.respond(503, delay_s=delay_s)
    return hub_config(
        database_url,
        crm,
        billing,
        worker={"concurrency": concurrency},
        billing={"circuit": circuit},
    )


async def test_an_open_circuit_stops_sending_without_spending_attempts(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    data = billing_down(database_url, sinks, {"failures": 3, "reset_s": 60}, concurrency=1)
    async with running(store, data) as hub:
        ids = await publish(hub, 10)
        assert await crm.wait_for(lambda s: len(s.delivered_ids) == 10, 15)
        # billing: three failures opened its circuit; the rest wait, attempts untouched.
        assert len(billing.received) == 3
        states = await hub.worker.breakers._states.get_all()
        assert states["billing"].state is CircuitState.OPEN
        assert await store.list_dead(DeadLetterFilter()) == []
        by_state = await none_in_flight(store)
        assert by_state.get("pending") == 10  # billing's, waiting
        spent = 0
        for event_id in ids:
            view = await store.get_event(event_id, None)
            assert view is not None
            spent += sum(d.attempts for d in view.deliveries if d.destination_id == "billing")
        assert spent == 3  # only the three that opened the circuit were attempts
    assert len(billing.received) == 3


def quick_circuit(database_url: str, crm: Sink, billing: Sink, **overrides: Any) -> dict[str, Any]:
    """Billing's circuit opens after 2 failures and probes 0.5 s later; retries come fast."""
    billing_settings = {
        "circuit": {"failures": 2, "reset_s": 0.5},
        "backoff": {"base_s": 0.05, "factor": 1, "max_s": 0.05, "jitter": 0},
    }
    return hub_config(database_url, crm, billing, billing=billing_settings, **overrides)


@asynccontextmanager
async def probe_next(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink], count: int
) -> AsyncIterator[tuple[Running, list[str]]]:
    """A hub whose billing (answering 503) failed until its circuit opened, `count` events
    published, none in flight: billing's next request is a probe."""
    crm, billing = sinks
    billing.respond(503)
    async with running(store, quick_circuit(database_url, crm, billing)) as hub:
        ids = await publish(hub, count)
        await circuit_becomes(hub, "billing", CircuitState.OPEN)
        await none_in_flight(store)
        yield hub, ids


async def test_the_probe_closes_the_circuit_and_the_backlog_drains(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    billing.respond(503)
    async with running(
        store, quick_circuit(database_url, crm, billing, worker={"concurrency": 4})
    ) as hub:
        ids = await publish(hub, 8)
        await circuit_becomes(hub, "billing", CircuitState.OPEN)
        billing.respond(200)  # billing recovers
        assert await billing.wait_for(lambda s: s.delivered_ids == set(ids), 15)
        states = await hub.worker.breakers._states.get_all()
        assert states.get("billing") is None or states["billing"].state is CircuitState.CLOSED
        assert ("billing", "half_open") in hub.worker.breakers.transitions
        assert ("billing", "closed") in hub.worker.breakers.transitions
        # No storm: after the circuit opened, exactly one request (the probe) came first.
        statuses = [r.status for r in billing.received]
        first_ok = statuses.index(200)
        assert statuses[first_ok + 1 :].count(503) == 0


async def test_a_probe_answered_429_is_given_back_and_the_next_probe_closes_the_circuit(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    """A 429 says nothing of the destination's health, but it did answer: the next delivery
    probes at once, rather than every delivery waiting for the 60 s probe timeout."""
    billing = sinks[1]
    async with probe_next(store, database_url, sinks, 4) as (hub, ids):
        billing.respond(200)
        billing.fail_first(1, 429)
        assert await billing.wait_for(lambda s: s.delivered_ids == set(ids), 15)
        statuses = [r.status for r in billing.received]
        assert statuses.index(429) < statuses.index(200)
        assert ("billing", "closed") in hub.worker.breakers.transitions


async def test_a_rate_limited_destination_is_sent_at_its_pace_without_spending_attempts(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    data = hub_config(database_url, crm, billing, billing={"rate_limit": "4/second"})
    async with running(store, data) as hub:
        started = time.monotonic()
        ids = await publish(hub, 10)
        assert await billing.wait_for(lambda s: s.delivered_ids == set(ids), 15)
        took = time.monotonic() - started
        assert took >= 1.0  # 10 sends at 4/second cannot all happen within one second
        assert await crm.wait_for(lambda s: len(s.delivered_ids) == 10, 5)
        for event_id in ids:
            view = await settled(store, event_id)
            assert {d.attempts for d in view.deliveries} == {1}  # snoozes are not attempts


async def test_one_key_is_delivered_in_event_order_despite_failures(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    data = hub_config(
        database_url,
        crm,
        billing,
        crm={
            "backoff": {"base_s": 0.02, "factor": 1, "max_s": 0.02, "jitter": 0},
            "circuit": {"failures": 100},  # this test is about order, not the breaker
        },
    )
    data["routes"][0]["ordering_key"] = "data.conversation_id"
    # Bursts of failures: heads of keys are retried while their followers wait.
    answered = 0
    async with running(store, data) as hub:
        keys = [f"55119{k:04d}" for k in range(12)]
        sent: dict[str, list[str]] = {k: [] for k in keys}
        for round_ in range(6):
            if round_ % 2 == 0:
                crm.fail_first(5, 500)
            for key in keys:
                sent[key].append(
                    await hub.publish("message.received", conversation_id=key, round=round_)
                )
        total = sum(len(v) for v in sent.values())
        assert await crm.wait_for(lambda s: len(s.delivered_ids) == total, 20)
        delivered_order: dict[str, list[str]] = {k: [] for k in keys}
        for request in crm.received:
            if request.status == 200 and request.webhook_id is not None:
                body = orjson.loads(request.body)
                delivered_order[body["data"]["conversation_id"]].append(request.webhook_id)
        for key in keys:
            assert delivered_order[key] == sent[key], key
        answered = total
    assert answered == 72


async def test_a_key_waiting_out_retry_after_holds_only_its_own_key(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    """Maria's first message is answered 429 `Retry-After: 2`: her next ones wait the two
    seconds behind it, while Joao's, to the same rate-limited destination, go at once."""
    crm, billing = sinks
    data = hub_config(database_url, crm, billing, crm={"rate_limit": "50/second"})
    data["routes"][0]["ordering_key"] = "data.conversation_id"
    async with running(store, data) as hub:
        crm.fail_first(1, 429, headers={"Retry-After": "2"})
        started = time.monotonic()
        await hub.publish("message.received", conversation_id="maria", n=0)
        assert await crm.wait_for(lambda s: len(s.received) == 1, 5)
        for n in range(1, 4):
            await hub.publish("message.received", conversation_id="maria", n=n)
            await hub.publish("message.received", conversation_id="joao", n=n)
        assert await crm.wait_for(lambda s: len(s.delivered_ids) == 7, 10)

    def sent(key: str) -> list[tuple[int, float]]:
        return [
            (body["data"]["n"], request.at)
            for request in crm.received
            if request.status == 200
            and (body := orjson.loads(request.body))["data"]["conversation_id"] == key
        ]

    maria, joao = sent("maria"), sent("joao")
    assert [n for n, _ in maria] == [0, 1, 2, 3]
    assert maria[0][1] - started >= 2  # the Retry-After was waited out
    assert [n for n, _ in joao] == [1, 2, 3]
    assert joao[-1][1] < maria[0][1]  # and held nobody else


async def test_other_destinations_keep_their_pace_while_one_is_down(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    circuit = {"failures": 3, "reset_s": 30}
    # Down, and slow about it.
    data = billing_down(database_url, sinks, circuit, concurrency=8, delay_s=0.2)
    async with running(store, data) as hub:
        started = time.monotonic()
        await publish(hub, 100)
        assert await crm.wait_for(lambda s: len(s.delivered_ids) == 100, 20)
        took = time.monotonic() - started
        # Without a breaker, billing's 200 slow failures would hold the 8 slots ~5 s.
        assert took < 5, took
        assert len(billing.received) <= 3 + 8  # the ones in flight when it opened


async def test_hub_and_worker_share_one_event_loop_without_leaks(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    hub = Running(store, load_config_dict(hub_config(database_url, crm, billing)))
    await hub.stop()
    assert isinstance(hub.hub, Hub)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "worker"]


async def test_a_configured_failure_ratio_opens_the_circuit(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    crm, billing = sinks
    # 1,000 consecutive failures would never come: only the ratio can open this circuit.
    circuit = {
        "failures": 1000,
        "failure_ratio": 0.5,
        "min_requests": 4,
        "window_s": 60,
        "reset_s": 60,
    }
    data = billing_down(database_url, sinks, circuit, concurrency=1)
    async with running(store, data) as hub:
        await publish(hub, 10)
        await circuit_becomes(hub, "billing", CircuitState.OPEN)
        assert await crm.wait_for(lambda s: len(s.delivered_ids) == 10, 15)
    assert len(billing.received) == 4  # min_requests results, all failed: then it opened


async def test_a_probe_cut_short_by_a_graceful_stop_is_given_back(
    store: SqlStore, database_url: str, sinks: tuple[Sink, Sink]
) -> None:
    """A worker stopped (a deploy, a restart) while its probe waits for an answer gives the
    probe back with its delivery: the next worker probes at once, instead of every process
    holding the destination back until the probe timeout (its timeout + 5 s, up to 60 s)."""
    crm, billing = sinks
    billing.respond(503)
    data = quick_circuit(database_url, crm, billing, worker={"shutdown_grace_s": 0})
    async with running(store, data) as hub:
        ids = await publish(hub, 3)
        await circuit_becomes(hub, "billing", CircuitState.OPEN)
        billing.respond(200, delay_s=20)  # the probe hangs: no answer before the stop
        await circuit_becomes(hub, "billing", CircuitState.HALF_OPEN)
    circuit = (await hub.worker.breakers._states.get_all())["billing"]
    assert circuit.state is CircuitState.OPEN  # its reset_s long passed: the next one probes
    billing.respond(200)
    async with running(store, data) as again:
        assert await billing.wait_for(lambda s: s.delivered_ids == set(ids), 5)
        assert ("billing", "closed") in again.worker.breakers.transitions


async def test_a_probe_whose_claim_meets_a_store_outage_is_given_back_unsent(
    store: SqlStore,
    database_url: str,
    sinks: tuple[Sink, Sink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Circuits in the store (no Redis): the store answers the probe's lease, then fails the
    claim of the probe itself. The delivery leased for it was neither sent nor given back:
    it waited in flight until its lease expired (a minute), then spent an attempt as
    `lease_expired`, "the worker sending it stopped", though nothing had been sent."""
    billing = sinks[1]
    async with probe_next(store, database_url, sinks, 3) as (hub, ids):
        breakers = hub.worker.breakers
        try_probe = breakers.try_probe
        failed: list[str] = []

        async def blip(destination_id: str, *args: Any) -> bool:
            if not failed:  # the claim of the probe: its write meets the outage
                failed.append(destination_id)
                raise StoreUnavailable("the store cannot be reached: test")
            return await try_probe(destination_id, *args)

        monkeypatch.setattr(breakers, "try_probe", blip)
        billing.respond(200)
        assert await billing.wait_for(lambda s: s.delivered_ids == set(ids), 10)
        assert failed == ["billing"]
        for event_id in ids:
            view = await settled(store, event_id)
            for d in view.deliveries:
                assert "lease_expired" not in [a.error_class for a in d.attempt_log]


async def test_a_probe_give_back_that_meets_a_store_outage_is_made_once_the_store_answers(
    store: SqlStore,
    database_url: str,
    sinks: tuple[Sink, Sink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Circuits in the store (no Redis): a probe claimed, then held back by the rate limit,
    is given back; that write meeting an outage left the circuit half-open, every worker
    holding the destination back until the probe timeout (its timeout + 5 s, up to 60 s).
    It is made again at the next poll that reaches the store."""
    billing = sinks[1]
    async with probe_next(store, database_url, sinks, 3) as (hub, ids):
        worker, breakers = hub.worker, hub.worker.breakers
        acquire, give_back_probe = worker.throttle.acquire, breakers.give_back_probe
        held: list[str] = []
        failed: list[str] = []

        async def held_once(destination_id: str) -> float | None:
            if destination_id == "billing" and not held:  # the probe's send: held back
                held.append(destination_id)
                return 0.05
            return await acquire(destination_id)

        async def blip(destination_id: str, **kwargs: Any) -> None:
            if not failed:  # the give-back's write meets the outage
                failed.append(destination_id)
                raise StoreUnavailable("the store cannot be reached: test")
            await give_back_probe(destination_id, **kwargs)

        monkeypatch.setattr(worker.throttle, "acquire", held_once)
        monkeypatch.setattr(breakers, "give_back_probe", blip)
        billing.respond(200)
        started = time.monotonic()
        assert await billing.wait_for(lambda s: s.delivered_ids == set(ids), 10)
        assert (held, failed) == (["billing"], ["billing"])
        # Not after the probe timeout (billing's timeout + 5 s): at once.
        assert time.monotonic() - started < 3
