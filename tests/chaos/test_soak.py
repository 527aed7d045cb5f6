"""A bounded soak: three tenants' webhooks through `serve` and a worker on PostgreSQL and
Redis, into destinations that behave as real ones do, with a worker SIGKILLed and replaced
and the dead-letter queue replayed on the way; then what an operator relies on is checked
against the store, the sinks, the metrics and the logs.

2,400 signed webhooks (800 per tenant, 120 a second) go to `estafeta serve --no-workers`;
one `estafeta worker` delivers them, each event to two destinations of its tenant:

| tenant | destination | behaves | max_attempts |
|---|---|---|---|
| clinica-sol | crm | healthy (answers in 50 ms) | 5 |
| clinica-sol | agenda | `ordering_key` per conversation; 3 × 500 every 50 requests | 50 |
| lar-lua | billing | flapping: 8 × 503 every 100 requests (the circuit opens) | 30 |
| lar-lua | sheets | throttling: 10 × `429 Retry-After: 1` every 120 requests | 30 |
| mar-azul | inbox | down (503) until 60 % of the webhooks are acknowledged | 4 |
| mar-azul | mail | fragile: 6 × 500 every 60 requests | 2 |

The flaps are counted in requests (`Sink.wait_for`), not timed. Once `crm` has 200
deliveries it holds the next send unanswered, and the worker is SIGKILLed meanwhile; once
its database connections are gone the store holds all it will ever hold of it, and a second
worker is started. Once `inbox` is back (a 2xx) and some delivery is dead,
`estafeta dlq replay --all` puts the dead-letter queue back to pending, deliveries going on.

One process delivers at a time, on purpose: between the kill and the second worker's start
nothing changes the attempts, so the second worker's counters must equal, exactly, what the
store recorded after that moment (a metric over- or under-counting is a failure, not a
tolerance), and the killed worker's last scrape can be held to the store's snapshot.

It found a bug when it was written: the killed worker had taken `inbox`'s probe, and the
circuit waited a fixed 60 s for it, so `inbox` got nothing for a minute after it was back
(now a probe is waited for as long as a lease: tests/unit/test_breakers.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from estafeta.testing.sink import Received, Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    HubClient,
    Proc,
    client_session,
    http_destination,
    hub_config,
    query,
    run_cli,
    summary,
    wait_until,
    write_config,
)
from tests.chaos.conftest import (
    Load,
    RedisProcess,
    Samples,
    attempts_by_outcome,
    counted,
    dead_lettered,
    disconnected,
    scrape,
    settled_deliveries,
    tcp_ports,
)
from tests.conftest import SINK_SECRET, SOURCE_SECRET

SOL, LUA, MAR = TENANT, "lar-lua", "mar-azul"
SOURCES = {SOL: "in-sol", LUA: "in-lua", MAR: "in-mar"}
PER_TENANT = 800
EVENTS = PER_TENANT * len(SOURCES)
RATE_PER_S = 120  # all tenants together
KEYS = 8  # conversations of the ordered destination
KILL_AT = 200  # deliveries at crm
HOLD_S = 2.0  # how long crm holds the sends it takes just before the kill
RECOVER_AT = EVENTS * 6 // 10  # webhooks acknowledged when inbox comes back
RETRY_AFTER_S = 1
TIMEOUT_S = 4  # a lease is then max(worker.lease_s, 4 + 2) = 6 s
DESTINATIONS = {  # id → tenant, max_attempts
    "crm": (SOL, 5),
    "agenda": (SOL, 50),
    "billing": (LUA, 30),
    "sheets": (LUA, 30),
    "inbox": (MAR, 4),
    "mail": (MAR, 2),
}
MORTAL = {"inbox", "mail"}  # the others never run out of attempts here
THROTTLED = {"Retry-After": str(RETRY_AFTER_S)}
ATTEMPTS_TOTAL = "estafeta_delivery_attempts_total"
DEAD_TOTAL = "estafeta_deliveries_dead_lettered_total"


async def flap(
    sink: Sink, *, every: int, failures: int, status: int, headers: Mapping[str, str] | None = None
) -> None:
    """Answer `failures` requests with `status` after each `every` requests, until cancelled."""
    for mark in itertools.count(every, every):

        def reached(s: Sink, mark: int = mark) -> bool:
            return len(s.received) >= mark

        while not await sink.wait_for(reached, 3600):  # idle: the test cancels it
            pass
        sink.fail_first(failures, status, headers=headers)


def soak_config(
    database_url: str, workdir: Path, sinks: Mapping[str, Sink], redis_url: str
) -> Path:
    data = hub_config(
        database_url,
        workdir,
        destinations=[
            http_destination(
                name,
                f"{sinks[name].url}/{name}",
                tenant=tenant,
                max_attempts=max_attempts,
                timeout_s=TIMEOUT_S,
            )
            for name, (tenant, max_attempts) in DESTINATIONS.items()
        ],
        routes=[
            {"tenant": SOL, "events": ["lead.*"], "destinations": ["crm"]},
            {
                "tenant": SOL,
                "events": ["lead.*"],
                "destinations": ["agenda"],
                "ordering_key": "data.conversation",
            },
            {"tenant": LUA, "events": ["lead.*"], "destinations": ["billing", "sheets"]},
            {"tenant": MAR, "events": ["lead.*"], "destinations": ["inbox", "mail"]},
        ],
        worker={"lease_s": 1},
    )
    data["tenants"] = [
        {"id": tenant, "name": tenant, "ingress_rate_limit": "100000/minute"} for tenant in SOURCES
    ]
    data["sources"] = [
        {"id": source, "tenant": tenant, "kind": "generic", "secret": SOURCE_SECRET}
        for tenant, source in SOURCES.items()
    ]
    data["redis"] = {"url": redis_url}
    return write_config(workdir / "estafeta.toml", data)


def webhooks(tenant: str) -> Callable[[int], tuple[str, Mapping[str, Any]]]:
    """Webhook number n of `tenant`: its webhook-id and a body of one of KEYS conversations."""

    def make(n: int) -> tuple[str, Mapping[str, Any]]:
        body = {"type": "lead.created", "data": {"n": n, "conversation": f"c{n % KEYS}"}}
        return f"{tenant}-{n:05d}", body

    return make


async def start_worker(estafeta: Estafeta, config: Path, name: str) -> tuple[Proc, str]:
    """`estafeta worker`, started, and the base URL of its /metrics."""
    worker = estafeta.worker(config, "--metrics-listen", "127.0.0.1:0", name=name)
    listening = await worker.wait_log("metrics_listening")
    await worker.wait_log("worker_started")
    return worker, f"http://{listening['listen']}"


def errors_logged(proc: Proc) -> list[dict[str, Any]]:
    return [line for line in proc.log_events() if line.get("level") in {"error", "critical"}]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(120)
async def test_a_soak_with_a_killed_worker_and_a_replay_settles_every_delivery_and_counts_it(
    chaos_database: str, own_redis: RedisProcess, tmp_path: Path, estafeta: Estafeta
) -> None:
    started = time.monotonic()
    sinks = {name: Sink(secret=SINK_SECRET) for name in DESTINATIONS}
    for sink in sinks.values():
        await sink.start()
    flappers: list[asyncio.Task[None]] = []
    try:
        sinks["crm"].respond(200, delay_s=0.05)  # sends stay in flight a while
        sinks["inbox"].respond(503)
        flappers = [
            asyncio.create_task(flap(sinks["agenda"], every=50, failures=3, status=500)),
            asyncio.create_task(flap(sinks["billing"], every=100, failures=8, status=503)),
            asyncio.create_task(
                flap(sinks["sheets"], every=120, failures=10, status=429, headers=THROTTLED)
            ),
            asyncio.create_task(flap(sinks["mail"], every=60, failures=6, status=500)),
        ]
        config = soak_config(chaos_database, tmp_path, sinks, own_redis.url)
        serve = await estafeta.serve(config, no_workers=True)
        first, first_metrics = await start_worker(estafeta, config, "worker-1")
        second: Proc | None = None
        second_metrics = ""

        async with client_session() as http:
            hub = HubClient(serve.base_url, http)
            loads = {t: Load(hub, source=s, give_up_after_s=30) for t, s in SOURCES.items()}
            stop = asyncio.Event()
            in_flight_at_kill: dict[str, tuple[str, str]] = {}  # delivery → event, destination
            before_kill: Samples = {}
            at_kill_attempts: Counter[tuple[str, ...]] = Counter()
            at_kill_dead: Counter[tuple[str, ...]] = Counter()
            replayed: list[str] = []

            async def kill_and_replace() -> None:
                nonlocal second, second_metrics, before_kill, at_kill_attempts, at_kill_dead
                crm = sinks["crm"]
                ok = await crm.wait_for(lambda s: len(s.delivered_ids) >= KILL_AT, 60)
                assert ok, f"{KILL_AT} deliveries never reached crm"
                # The next send to crm is held unanswered: the kill is sure to cut one short.
                crm.respond(200, delay_s=HOLD_S)
                held = len(crm.received)
                assert await crm.wait_for(lambda s: len(s.received) > held, 30), "crm idle"
                before_kill = await scrape(http, first_metrics)
                ports = tcp_ports(first.pid, urlsplit(chaos_database).port or 5432)
                await first.sigkill()
                crm.respond(200, delay_s=0.05)
                await disconnected(chaos_database, ports, before_s=time.time(), timeout_s=10)
                rows = await query(
                    chaos_database,
                    "SELECT id, event_id, destination_id FROM deliveries"
                    " WHERE state = 'in_flight' AND leased_by LIKE :pid",
                    {"pid": f"%:{first.pid}:%"},
                )
                in_flight_at_kill.update({d: (e, dest) for d, e, dest in rows})
                at_kill_attempts = await attempts_by_outcome(chaos_database)
                at_kill_dead = await dead_lettered(chaos_database)
                second, second_metrics = await start_worker(estafeta, config, "worker-2")

            async def recover_and_replay() -> None:
                async def acknowledged() -> bool:
                    return sum(load.ok for load in loads.values()) >= RECOVER_AT

                await wait_until(acknowledged, timeout_s=60, what=f"{RECOVER_AT} acknowledged")
                sinks["inbox"].respond(200)
                ok = await sinks["inbox"].wait_for(lambda s: bool(s.delivered_ids), 30)
                assert ok, "inbox never took a delivery after it came back"

                async def some_dead() -> bool:
                    return bool(await dead_lettered(chaos_database))

                await wait_until(some_dead, timeout_s=30, what="a dead-lettered delivery")
                result = await run_cli(
                    "dlq", "replay", "--all", "--limit", "100000", "--config", str(config),
                    cwd=tmp_path,
                )  # fmt: skip
                assert result.returncode == 0, result.stderr
                replayed.extend(result.stdout.split())

            sending = [
                load.steady(RATE_PER_S / len(loads), stop, webhooks(t), count=PER_TENANT)
                for t, load in loads.items()
            ]
            await asyncio.wait_for(
                asyncio.gather(*sending, kill_and_replace(), recover_and_replay()), timeout=60
            )
            loaded_at = time.monotonic()
            for load in loads.values():
                assert load.refused() == {}, list(load.refused().items())[:5]
                assert len(load.acknowledged()) == PER_TENANT
            by_state = await settled_deliveries(chaos_database, timeout_s=40)
            settled_at = time.monotonic()
            assert second is not None

            # The metrics: counters of what each process did, the gauges of the store.
            store_attempts = await attempts_by_outcome(chaos_database)
            store_dead = await dead_lettered(chaos_database)
            since_kill_attempts = store_attempts - at_kill_attempts
            since_kill_dead = store_dead - at_kill_dead
            worker_base = second_metrics
            last: Samples = {}

            async def counters_agree() -> bool:
                # A worker counts a death once its record returns: the store says settled a
                # moment before the last counts are made.
                nonlocal last
                last = await scrape(http, worker_base)
                return (
                    counted(last, ATTEMPTS_TOTAL, "destination", "outcome") == since_kill_attempts
                    and counted(last, DEAD_TOTAL, "destination") == since_kill_dead
                )

            try:
                await wait_until(counters_agree, timeout_s=10, what="worker-2's counters")
            except AssertionError:
                differ = {
                    key: (seen[key], stored[key])
                    for seen, stored in (
                        (
                            counted(last, ATTEMPTS_TOTAL, "destination", "outcome"),
                            since_kill_attempts,
                        ),
                        (counted(last, DEAD_TOTAL, "destination"), since_kill_dead),
                    )
                    for key in seen.keys() | stored.keys()
                    if seen[key] != stored[key]
                }
                raise AssertionError(
                    "worker-2's counters (counted, recorded) disagree with what the store"
                    f" recorded since the kill: {differ}"
                ) from None
            served = await scrape(http, serve.base_url)

    finally:
        for task in flappers:
            task.cancel()
        await asyncio.gather(*flappers, return_exceptions=True)
        for sink in sinks.values():
            await sink.stop()

    # Every webhook is one event, and every one of its deliveries is final.
    events = await query(chaos_database, "SELECT id, tenant_id FROM events")
    acknowledged = {
        i for load in loads.values() for ids in load.acknowledged().values() for i in ids
    }
    assert {event_id for event_id, _ in events} == acknowledged
    assert len(events) == EVENTS
    assert set(by_state) <= {"succeeded", "dead"}, by_state
    assert sum(by_state.values()) == 2 * EVENTS, by_state
    rows = await query(
        chaos_database,
        "SELECT d.id, d.event_id, d.destination_id, d.state, d.ordering_key,"
        " count(a.id) FILTER (WHERE a.error_class = 'lease_expired'),"
        " count(a.id) FILTER (WHERE a.error_class = 'timeout')"
        " FROM deliveries AS d LEFT JOIN attempts AS a ON a.delivery_id = d.id"
        " GROUP BY d.id",
    )
    dead = Counter(dest for _, _, dest, state, *_ in rows if state == "dead")
    assert set(dead) <= MORTAL, f"deliveries dead that had attempts to spare: {dead}"
    assert replayed, "the replay found no dead delivery"

    # Rescues: exactly what the killed worker had in flight (no live worker's lease ran
    # out), each once.
    assert in_flight_at_kill, "the kill found nothing in flight (crm held a send)"
    rescued = {d: n for d, _, _, _, _, n, _ in rows if n}
    assert set(rescued) == set(in_flight_at_kill), set(rescued) ^ set(in_flight_at_kill)
    assert set(rescued.values()) == {1}, rescued

    # At each sink: every success arrived, nothing foreign did, duplicates only of the
    # sends whose answer the hub never had (rescued, or timed out while the sink answered).
    for name, sink in sinks.items():
        mine = [r for r in rows if r[2] == name]
        assert len(mine) == PER_TENANT
        succeeded = {event for _, event, _, state, *_ in mine if state == "succeeded"}
        unanswered = {event for _, event, _, _, _, lost, timed_out in mine if lost or timed_out}
        assert succeeded <= sink.delivered_ids, (
            f"{name}: {len(succeeded - sink.delivered_ids)} lost"
        )
        assert sink.unique_ids <= {event for _, event, *_ in mine}, f"{name}: foreign ids"
        assert sink.bad_signatures == [], name
        oks = Counter(r.webhook_id for r in sink.received if 200 <= r.status < 300)
        duplicated = {event for event, n in oks.items() if n > 1}
        assert duplicated <= unanswered, f"{name}: sent again unasked: {duplicated - unanswered}"
        dead_but_arrived = {event for _, event, _, state, *_ in mine if state == "dead"} & set(oks)
        assert dead_but_arrived <= unanswered, f"{name}: dead yet answered 2xx: {dead_but_arrived}"

    # Order per key at agenda: the first 2xx of each event, in the order the store made them.
    delivery_of = {event: d for d, event, dest, *_ in rows if dest == "agenda"}
    key_of = {event: key for _, event, dest, _, key, *_ in rows if dest == "agenda"}
    arrived: defaultdict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for r in sinks["agenda"].received:
        if 200 <= r.status < 300 and r.webhook_id and r.webhook_id not in seen:
            seen.add(r.webhook_id)
            arrived[key_of[r.webhook_id]].append(r.webhook_id)
    assert len(arrived) == KEYS
    for key, order in arrived.items():
        assert order == sorted(order, key=delivery_of.__getitem__), f"{key} out of order"

    # A 429's Retry-After is honoured by each delivery.
    tries: defaultdict[str, list[Received]] = defaultdict(list)
    for r in sinks["sheets"].received:
        tries[r.webhook_id or ""].append(r)
    throttled = 0
    for event, answers in tries.items():
        for answer, following in itertools.pairwise(answers):
            if answer.status == 429:
                throttled += 1
                waited = following.at - answer.at
                assert waited >= RETRY_AFTER_S, f"{event} tried again after {waited:.3f} s"
    assert throttled, "sheets throttled nothing"

    # What the killed worker had counted when last scraped, the store had by its death.
    for labels, n in counted(before_kill, DEAD_TOTAL, "destination").items():
        assert n <= at_kill_dead[labels], (labels, n, at_kill_dead)
    unrecorded = Counter(dest for _, dest in in_flight_at_kill.values())
    for (destination, outcome), n in counted(
        before_kill, ATTEMPTS_TOTAL, "destination", "outcome"
    ).items():
        assert n <= at_kill_attempts[(destination, outcome)] + unrecorded[destination]
    # serve counted each event it stored, and reads the queue's depth from the store.
    assert counted(served, "estafeta_events_accepted_total", "outcome") == {("stored",): EVENTS}
    gauges = counted(served, "estafeta_deliveries", "state")
    assert gauges == {("pending",): 0, ("in_flight",): 0, ("dead",): sum(dead.values())}

    # No process logged an error.
    for proc in (serve, first, second):
        assert errors_logged(proc) == [], (proc.name, errors_logged(proc)[:3])

    delivered = sum(len(s.delivered_ids) for s in sinks.values())
    summary(
        "chaos soak",
        sent=sum(load.sent for load in loads.values()),
        acknowledged=len(acknowledged),
        delivered=delivered,
        duplicates=sum(s.duplicates for s in sinks.values()),
        lost=0,
        started=started,
    )
    print(
        f"chaos soak: load {loaded_at - started:.1f}s settle {settled_at - loaded_at:.1f}s"
        f" in_flight_at_kill={len(in_flight_at_kill)} rescued={len(rescued)}"
        f" replayed={len(replayed)} dead={dict(dead)} by_state={by_state}"
    )


def test_a_processs_database_ports_leave_out_its_other_connections() -> None:
    """The soak waits, after the kill, until no backend serves one of the killed worker's
    ports. Linux gives one local port to connections to different servers: a port of the
    worker's connections to a sink may be one of the serve's database connections' too,
    alive, and the wait timed out ('no backend for the ports …'). Only the worker's
    connections to the database's port count."""
    with (
        socket.create_server(("127.0.0.1", 0)) as database,
        socket.create_server(("127.0.0.1", 0)) as sink,
        socket.create_connection(database.getsockname()) as to_database,
        socket.create_connection(sink.getsockname()) as to_sink,
    ):
        ports = tcp_ports(os.getpid(), database.getsockname()[1])
        assert to_database.getsockname()[1] in ports
        assert to_sink.getsockname()[1] not in ports
