"""A rolling change of the configuration: processes on the old file and on the new one share
one store (DESIGN.md "Scale-out"), on both engines.

A destination only the new file has is sent by the processes that know it, never
dead-lettered by a worker still on the old file; once no live process names a destination,
its deliveries are dead-lettered as `unknown_destination`, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.clock import SystemClock
from estafeta.config import Config, load_config_dict
from estafeta.delivery.breakers import Breakers, circuit_state_store
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.presence import LIVE_WINDOW_S, Presence
from estafeta.delivery.worker import Worker, default_worker_id
from estafeta.errors import StoreError
from estafeta.hub import Hub
from estafeta.ids import new_id
from estafeta.store.records import DeliveryView, NewDelivery, NewEvent
from estafeta.store.sqlstore import SqlStore
from estafeta.supervise import supervised
from estafeta.testing.sink import Sink
from tests.conftest import SINK_SECRET, base_config
from tests.events import new_event

NEW = "agenda"  # the destination the rolling change adds
ADMIN = {"authorization": "Bearer test-admin-key"}


class ShiftedClock:
    """The wall clock moved forward by `offset_ms`, which a test advances."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        return SystemClock().now_ms() + self.offset_ms


def configs(database_url: str, sink: Sink, **worker: Any) -> tuple[Config, Config]:
    """The old file, and the new one: the same plus the destination `agenda` and a route of
    `lead.*` events to it."""
    data = base_config(database_url)
    data["worker"].update(worker)
    for d in data["destinations"]:
        d["url"] = f"{sink.url}/{d['id']}"
    old = load_config_dict(data)
    data["destinations"].append(
        {"id": NEW, "tenant": "clinica-sol", "url": f"{sink.url}/{NEW}", "secret": SINK_SECRET}
    )
    data["routes"].append(
        {"id": "leads", "tenant": "clinica-sol", "events": ["lead.*"], "destinations": [NEW]}
    )
    return old, load_config_dict(data)


class Process:
    """One `estafeta serve` as the rolling change sees it: its presence in the store (recorded
    by `start`), its ingest, and its worker (started by `start_worker`). Fresh deliveries
    are not handed over: they go through the store, as between processes."""

    def __init__(self, store: SqlStore, config: Config, clock: ShiftedClock) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.hub = Hub(config, store, clock)
        self.presence = Presence(store, config, process_id=default_worker_id(), clock=clock)
        self.worker: Worker | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stopped = False

    async def start(self, *, worker: bool = True) -> None:
        await self.store.sync_config(self.config, self.clock.now_ms())
        await self.presence.announce()
        if worker:
            self.start_worker()

    def start_worker(self) -> None:
        self.worker = Worker(
            self.store, self.config, clock=self.clock, started_ms=self.presence.started_ms
        )
        self._task = asyncio.create_task(self.worker.run(self._stop))

    async def publish(self, n: int) -> str:
        result = await self.hub.accept(
            tenant_id="clinica-sol",
            source_id="api",
            event_type="lead.created",
            data={"n": n},
            idempotency_key=None,
        )
        return result.event_id

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop; not `graceful`: as if the process died (its presence is never retired)."""
        if self.stopped:
            return
        self.stopped = True
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if graceful:
            await self.presence.retire()
        await self.hub.close()


@pytest.fixture
async def processes() -> AsyncIterator[Callable[[SqlStore, Config, ShiftedClock], Process]]:
    started: list[Process] = []

    def make(store: SqlStore, config: Config, clock: ShiftedClock) -> Process:
        process = Process(store, config, clock)
        started.append(process)
        return process

    yield make
    for process in started:
        await process.stop()


async def eventually(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def deliveries_to(store: SqlStore, event_ids: list[str], destination: str) -> list[Any]:
    views = [await store.get_event(event_id, None) for event_id in event_ids]
    return [
        d for v in views if v is not None for d in v.deliveries if d.destination_id == destination
    ]


async def leases_after(worker: Worker, more: int) -> None:
    """Wait until `worker` has run `more` lease statements from now."""
    leases = worker.leases
    await eventually(lambda: worker.leases >= leases + more)


def logged(logs: Sequence[Mapping[str, Any]], event: str) -> Callable[[], bool]:
    return lambda: any(e["event"] == event and NEW in e.get("destinations", ()) for e in logs)


async def settled(store: SqlStore, event_id: str) -> list[DeliveryView]:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        view = await store.get_event(event_id, None)
        assert view is not None
        if all(d.state not in ("pending", "in_flight") for d in view.deliveries):
            return list(view.deliveries)
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.05)


def agenda_event(due_ms: int) -> NewEvent:
    """An event with one delivery to `agenda`, due at `due_ms`."""
    return new_event(
        new_id("evt", due_ms),
        NewDelivery(id=new_id("dlv", due_ms), destination_id=NEW, priority=2, max_attempts=5),
        at=due_ms,
    )


def still_waiting(deliveries: list[Any]) -> bool:
    return bool(deliveries) and all(d.state == "pending" and d.attempts == 0 for d in deliveries)


async def settled_after_a_restart(
    store: SqlStore,
    database_url: str,
    sink: Sink,
    processes: Callable[..., Process],
    *,
    due_in_ms: int,
) -> DeliveryView:
    """A process on the file naming `agenda` started and stopped; a delivery to `agenda`, due
    `due_in_ms` later, stored; a process on the file without it started: the delivery once
    settled."""
    old_config, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    before = processes(store, new_config, clock)
    await before.start(worker=False)
    await before.stop()
    event = agenda_event(clock.now_ms() + due_in_ms)
    await store.insert_events([event])
    after = processes(store, old_config, clock)
    await after.start()
    [delivery] = await settled(store, event.id)
    return delivery


async def test_a_destination_only_the_new_file_has_is_sent_by_the_new_process(
    store: SqlStore, database_url: str, sink: Sink, processes: Callable[..., Process]
) -> None:
    """The old worker (rescue every 0.2 s) sees deliveries to `agenda` stored by the new
    process, says another process configures it, and leaves them; the new process's worker
    sends them: none is dead-lettered."""
    old_config, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    old = processes(store, old_config, clock)
    await old.start()
    new = processes(store, new_config, clock)
    await new.start(worker=False)  # ingest only, as `serve --no-workers` updated first
    with capture_logs() as logs:
        ids = [await new.publish(n) for n in range(3)]
        assert old.worker is not None
        await eventually(logged(logs, "destination_configured_elsewhere"))
        await leases_after(old.worker, 3)
    assert still_waiting(await deliveries_to(store, ids, NEW))
    assert not logged(logs, "unknown_destinations")()
    new.start_worker()
    await eventually(lambda: sink.delivered_ids >= set(ids))
    for event_id in ids:
        [delivery] = await settled(store, event_id)
        assert (delivery.state, delivery.attempts) == ("succeeded", 1)


@pytest.mark.parametrize("graceful", [True, False], ids=["stopped", "died"])
async def test_deliveries_to_a_destination_no_live_process_names_are_dead_lettered(
    store: SqlStore,
    database_url: str,
    sink: Sink,
    processes: Callable[..., Process],
    graceful: bool,
) -> None:
    """The only process naming `agenda` stops (or dies) after the old worker started: the
    old worker leaves its deliveries for `LIVE_WINDOW_S` (it may be the new process being
    restarted), then dead-letters them as `unknown_destination`."""
    old_config, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    old = processes(store, old_config, clock)
    await old.start()
    new = processes(store, new_config, clock)
    await new.start(worker=False)
    await new.stop(graceful=graceful)
    event = new_event(
        new_id("evt", clock.now_ms()),
        NewDelivery(
            id=new_id("dlv", clock.now_ms()), destination_id=NEW, priority=2, max_attempts=5
        ),
        at=clock.now_ms(),
    )
    await store.insert_events([event])
    assert old.worker is not None
    with capture_logs() as logs:
        await eventually(logged(logs, "destination_configured_elsewhere"))
        await leases_after(old.worker, 3)
        assert still_waiting(await deliveries_to(store, [event.id], NEW))
        clock.offset_ms += int(LIVE_WINDOW_S * 1000) + 1000
        [delivery] = await settled(store, event.id)
        assert logged(logs, "unknown_destinations")()
    assert delivery.state == "dead"
    assert f"no destination '{NEW}' is configured" in (delivery.last_error or "")


async def test_a_process_started_after_the_last_one_naming_it_stopped_dead_letters_at_once(
    store: SqlStore, database_url: str, sink: Sink, processes: Callable[..., Process]
) -> None:
    """One process restarted on a file without `agenda` (the single-process case): the one
    before it stopped, so the new one dead-letters `agenda`'s deliveries at its first rescue,
    with no window to wait."""
    delivery = await settled_after_a_restart(store, database_url, sink, processes, due_in_ms=0)
    assert delivery.state == "dead" and delivery.attempts == 1
    assert f"no destination '{NEW}' is configured" in (delivery.last_error or "")


async def test_a_delivery_waiting_for_its_retry_is_dead_lettered_at_once_too(
    store: SqlStore, database_url: str, sink: Sink, processes: Callable[..., Process]
) -> None:
    """`agenda` was down and is removed: a delivery to it waits for a retry an hour away
    (`backoff.max_s`). Leased only once due, it went to the dead-letter queue an hour after
    the restart, after the operator had discarded the others (the `dead_letters` alert
    firing again); it goes at the first rescue with them."""
    delivery = await settled_after_a_restart(
        store, database_url, sink, processes, due_in_ms=3_600_000
    )
    assert delivery.state == "dead" and delivery.attempts == 1
    assert f"no destination '{NEW}' is configured" in (delivery.last_error or "")


async def test_a_delivery_leased_as_an_orphan_just_before_a_process_naming_it_started_is_given_back(
    store: SqlStore, database_url: str, sink: Sink, processes: Callable[..., Process]
) -> None:
    """The race: the old worker found `agenda` unnamed at its last rescue (five minutes
    apart here, the longest `rescue_interval_s`), and a process naming it starts before the
    next one. The old worker leases a delivery to it stored since with the orphans, learns
    from the store that `agenda` is named, and gives it back pending with no attempt
    counted; the new process sends it."""
    old_config, new_config = configs(database_url, sink, rescue_interval_s=300)
    clock = ShiftedClock()
    orphaned = agenda_event(clock.now_ms())
    await store.insert_events([orphaned])
    old = processes(store, old_config, clock)
    with capture_logs() as logs:
        await old.start()
        await eventually(logged(logs, "unknown_destinations"))  # its rescue, at its start
        [dead] = await settled(store, orphaned.id)
        assert dead.state == "dead"
        new = processes(store, new_config, clock)
        await new.start(worker=False)
        event = agenda_event(clock.now_ms())
        await store.insert_events([event])
        await eventually(logged(logs, "destination_configured_elsewhere"))
        assert old.worker is not None
        await leases_after(old.worker, 3)
    [delivery] = await deliveries_to(store, [event.id], NEW)
    assert still_waiting([delivery]), delivery
    new.start_worker()
    [delivery] = await settled(store, event.id)
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)
    assert event.id in sink.delivered_ids


async def test_a_running_process_keeps_naming_its_destinations_until_it_stops(
    store: SqlStore, database_url: str, sink: Sink
) -> None:
    """Its record is renewed while it runs (a minute later, it still names `agenda`); once it
    stopped, it names nothing for processes started after, and still for those before."""
    _, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    before = clock.now_ms()
    presence = Presence(
        store, new_config, process_id=default_worker_id(), clock=clock, every_s=0.02
    )
    await presence.announce()
    stop = asyncio.Event()
    running = asyncio.create_task(presence.run(stop))

    async def named(started_ms: int) -> bool:
        window_ms = int(LIVE_WINDOW_S * 1000)
        live = await store.live_destinations(
            seen_since_ms=clock.now_ms() - window_ms, started_ms=started_ms
        )
        return NEW in live

    try:
        clock.offset_ms += int(LIVE_WINDOW_S * 1000) + 1000
        deadline = asyncio.get_running_loop().time() + 10
        while not await named(before):
            assert asyncio.get_running_loop().time() < deadline, "not renewed"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await running
    assert await named(before)  # started before it stopped: it may be restarting
    assert not await named(clock.now_ms())  # started after: its file is the newest


async def test_detailed_health_lists_the_running_processes_and_what_each_names(
    store: SqlStore,
    database_url: str,
    sink: Sink,
    processes: Callable[[SqlStore, Config, ShiftedClock], Process],
) -> None:
    """An operator half-way through a rolling change sees which processes still run the old
    file: the ones whose destinations lack the new one."""
    old_config, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    old = processes(store, old_config, clock)
    new = processes(store, new_config, clock)
    await old.start(worker=False)
    await new.start(worker=False)
    transport = httpx.ASGITransport(app=create_app(new.hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        both = (await http.get("/health/detailed", headers=ADMIN)).json()
        await old.stop()
        after = (await http.get("/health/detailed", headers=ADMIN)).json()
    listed = {p["id"]: p["destinations"] for p in both["checks"]["processes"]}
    assert listed == {
        old.presence.process_id: sorted(old.presence.destinations),
        new.presence.process_id: sorted(new.presence.destinations),
    }
    assert NEW in listed[new.presence.process_id]
    assert NEW not in listed[old.presence.process_id]
    assert [p["id"] for p in after["checks"]["processes"]] == [new.presence.process_id]


async def test_a_process_whose_presence_task_crashed_once_still_names_its_destinations(
    store: SqlStore, database_url: str, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The presence task crashes (a store error it does not expect) and `supervised` starts it
    again: the process runs on, so it must not be taken for stopped by processes started
    after the crash, nor vanish from /health/detailed."""
    _, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    presence = Presence(
        store, new_config, process_id=default_worker_id(), clock=clock, every_s=0.02
    )
    await presence.announce()
    real = store.announce_process
    calls = 0

    async def failing_once(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreError("the store failed: QueryCanceledError (SQLSTATE 57014)")
        await real(*args, **kwargs)

    monkeypatch.setattr(store, "announce_process", failing_once)
    stop = asyncio.Event()
    running = asyncio.create_task(
        supervised("presence", lambda: presence.run(stop), stop, first_pause_s=0.01)
    )
    try:
        await eventually(lambda: calls >= 3)  # crashed, restarted, announced again
        window_ms = int(LIVE_WINDOW_S * 1000)
        later = clock.now_ms() + 1
        clock.offset_ms += 1
        live = await store.live_destinations(
            seen_since_ms=clock.now_ms() - window_ms, started_ms=later
        )
        listed = await store.live_processes(seen_since_ms=clock.now_ms() - window_ms)
    finally:
        stop.set()
        await running
    # Before: the crash retired it for good (its later records kept `stopped_at`).
    assert NEW in live
    assert [p.id for p in listed] == [presence.process_id]


async def test_an_open_circuit_of_a_destination_configured_elsewhere_is_not_probed_here(
    store: SqlStore,
    database_url: str,
    sink: Sink,
    processes: Callable[..., Process],
) -> None:
    """Rolling change: the new process names `agenda`, whose circuit (shared through the
    store) opened a while ago. The old worker does not know `agenda`: its deliveries are
    left to the processes that do (architecture.md). Yet the old worker sees the open
    circuit in the shared state, wins its probe, leases one of `agenda`'s deliveries and
    dead-letters it as `unknown_destination`."""
    old_config, new_config = configs(database_url, sink, rescue_interval_s=0.2)
    clock = ShiftedClock()
    old = processes(store, old_config, clock)
    new = processes(store, new_config, clock)
    await new.start(worker=False)  # names `agenda`; its worker is not running yet
    # `agenda` failed for the new process's worker a minute ago: its circuit is open and
    # its reset_s has passed (a probe is due).
    breakers = Breakers(circuit_state_store(new_config, store), new_config)
    failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=500, error_class="http_500")
    then = clock.now_ms() - 60_000
    for _ in range(new_config.destinations[-1].circuit.failures):
        await breakers.record(NEW, failed, started_at=then, now_ms=then)
    assert NEW in breakers.not_closed()
    ids = [await new.publish(n) for n in range(2)]
    await old.start()
    assert old.worker is not None
    await eventually(lambda: old.worker is not None and old.worker.leases >= 1)
    await leases_after(old.worker, 5)
    agenda = await deliveries_to(store, ids, NEW)
    assert still_waiting(agenda), [(d.state, d.attempts, d.last_error) for d in agenda]
    # Nor forgotten: a live process names it.
    await breakers.refresh(force=True)
    assert NEW in breakers.not_closed()


async def test_the_circuit_of_a_destination_no_process_names_any_more_is_forgotten(
    store: SqlStore,
    database_url: str,
    sink: Sink,
    processes: Callable[..., Process],
) -> None:
    """`agenda` was down when the operator removed it and restarted: its open circuit stayed
    on record for ever, shown open in /health/detailed and as `estafeta_circuit_state` 2 (the
    recommended alert firing for good), with no command to clear it; added back later, it
    started with the old open circuit. Once no live process names it, a worker forgets it."""
    old_config, new_config = configs(database_url, sink)
    clock = ShiftedClock()
    before = processes(store, new_config, clock)
    await before.start(worker=False)
    breakers = Breakers(circuit_state_store(new_config, store), new_config)
    failed = Outcome(OutcomeKind.RETRYABLE, 1.0, status_code=500, error_class="http_500")
    then = clock.now_ms() - 60_000
    for _ in range(new_config.destinations[-1].circuit.failures):
        await breakers.record(NEW, failed, started_at=then, now_ms=then)
    await before.stop()  # restarted on the file without `agenda`
    after = processes(store, old_config, clock)
    await after.start()
    transport = httpx.ASGITransport(app=create_app(after.hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:

        async def shown() -> bool:
            health = (await http.get("/health/detailed", headers=ADMIN)).json()
            metrics = (await http.get("/metrics")).text
            gauge = f'estafeta_circuit_state{{destination="{NEW}"}}'
            return NEW in health["checks"]["circuits"] or gauge in metrics

        deadline = asyncio.get_running_loop().time() + 10
        while await shown():
            assert asyncio.get_running_loop().time() < deadline, "still shown"
            await asyncio.sleep(0.05)
    await after.stop()
    # Added back: it starts closed, and its first delivery is sent as any other.
    again = processes(store, new_config, clock)
    await again.start()
    await breakers.refresh(force=True)
    assert NEW not in breakers.not_closed()
    event_id = await again.publish(1)
    [delivery] = await settled(store, event_id)
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)
