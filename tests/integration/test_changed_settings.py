"""A destination's settings changed while deliveries to it wait: which value governs them.

An operator raises `max_attempts` during an outage and restarts, or raises it and replays
the dead-letter queue: the deliveries already stored must get the new limit, not the one in
force when they were created. Real store, both engines; a real receiver and a fake Meta.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from estafeta.cli import main
from estafeta.config import Config, load_config_dict
from estafeta.delivery.attempts import attempt_limits
from estafeta.delivery.state import DeliveryState
from estafeta.delivery.worker import Worker
from estafeta.hub import Hub
from estafeta.messaging.facts import send_destination
from estafeta.store import schema
from estafeta.store.records import DeadLetterFilter, DeliveryView
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.fakes.meta import FakeMeta
from estafeta.testing.sink import Sink
from tests.clocks import ManualClock
from tests.conftest import base_config, lease_any
from tests.integration.hub_loop import fake_meta, wa_sol
from tests.integration.store_support import only_delivery
from tests.integration.test_ingress_api import ADMIN, make_client
from tests.integration.test_worker import Running, config_for, publish, settled


@pytest.fixture
async def meta() -> AsyncIterator[FakeMeta]:
    fake = fake_meta()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def stored_then_sent(
    store: SqlStore, sink: Sink, database_url: str, *, max_attempts: tuple[int, int]
) -> DeliveryView:
    """An event stored under the first `max_attempts` while no worker ran, then sent until
    settled by a worker started under the second: its one delivery."""
    stored_under, sent_under = max_attempts
    before = Running(
        store, config_for(database_url, sink, max_attempts=stored_under), started=False
    )
    event_id = await before.publish()
    await before.stop()  # stored, not sent yet: the worker was down (or busy) meanwhile
    after = Running(store, config_for(database_url, sink, max_attempts=sent_under), handoff=False)
    try:
        view = await settled(store, event_id)
    finally:
        await after.stop()
    [delivery] = view.deliveries
    return delivery


async def test_a_raised_max_attempts_governs_the_deliveries_stored_before_the_restart(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    # Before: each delivery kept the `max_attempts` of the configuration it was stored
    # under, so the operator who raised it during an outage and restarted saw the waiting
    # deliveries dead-lettered after the old count.
    sink.respond(500)
    delivery = await stored_then_sent(store, sink, database_url, max_attempts=(2, 4))
    assert (delivery.state, delivery.attempts, delivery.max_attempts) == ("dead", 4, 4)
    assert len(sink.received) == 4


async def test_a_lowered_max_attempts_governs_the_deliveries_stored_before_the_restart_too(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    sink.respond(500)
    delivery = await stored_then_sent(store, sink, database_url, max_attempts=(8, 1))
    assert (delivery.state, delivery.attempts, delivery.max_attempts) == ("dead", 1, 1)


async def test_a_rescued_lease_is_judged_by_the_current_max_attempts(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    # The worker that leased it died; a worker on the raised limit takes it over.
    before = Hub(config_for(database_url, sink, max_attempts=1), store)
    try:
        event_id = await publish(before)
    finally:
        await before.close()
    now = int(time.time() * 1000)
    [leased] = await lease_any(store, now_ms=now, lease_ms=1_000)
    assert leased.max_attempts == 1
    later = ManualClock(now + 60_000)  # its lease expired a minute ago
    worker = Worker(store, config_for(database_url, sink, max_attempts=3), clock=later)
    assert await worker.rescue_expired() == 1
    delivery = await only_delivery(store, event_id)
    # Before: the lost attempt spent the stored single attempt, and the delivery was dead.
    assert (delivery.state, delivery.attempts, delivery.max_attempts) == ("pending", 1, 3)


async def test_a_raised_send_max_attempts_governs_the_messages_already_queued(
    store: SqlStore, meta: FakeMeta, database_url: str
) -> None:
    meta.fail_next(10, 500)

    def config(send_max_attempts: int) -> Config:
        data = base_config(database_url)
        data["sources"].append(wa_sol(meta.url, send_max_attempts=send_max_attempts))
        return load_config_dict(data)

    before = Hub(config(1), store)
    try:
        message_id, queued = await before.send_message(
            tenant_id="clinica-sol",
            source_id="wa-sol",
            to="+5511987654321",
            content={"text": "Sua consulta está confirmada."},
            idempotency_key=None,
        )
    finally:
        await before.close()
    assert message_id is not None
    after = Running(store, config(2), handoff=False)
    try:
        view = await settled(store, queued.event_id, timeout_s=15)
    finally:
        await after.stop()
    [delivery] = [d for d in view.deliveries if d.destination_id == send_destination("wa-sol")]
    # Before: the single attempt the message was queued with, and one request to Meta.
    assert (delivery.state, delivery.attempts, delivery.max_attempts) == ("dead", 2, 2)
    assert meta.requests == 2


def test_the_limits_a_worker_goes_by_are_the_destinations_and_the_senders() -> None:
    data = base_config("sqlite:///./unused.db")
    data["sources"].append(wa_sol("http://127.0.0.1:9", send_max_attempts=5))
    # A provider source that cannot send (no outbound keys) names no send destination.
    receive_only = {**wa_sol("http://127.0.0.1:9", send_max_attempts=6), "id": "wa-in"}
    del receive_only["access_token"], receive_only["phone_number_id"]
    data["sources"].append(receive_only)
    limits = attempt_limits(load_config_dict(data))
    assert limits == {"crm": 3, "billing": 3, "outra-sink": 8, send_destination("wa-sol"): 5}


# -- replay --------------------------------------------------------------------------------


async def dead_delivery(store: SqlStore, config: Config) -> str:
    """One delivery to crm, stored under `config` and dead after its attempts; its event."""
    hub = Hub(config, store)
    try:
        event_id = await publish(hub)
    finally:
        await hub.close()
    async with store.engine.begin() as conn:
        await conn.execute(
            update(schema.deliveries).values(
                state=DeliveryState.DEAD.value, attempts=schema.deliveries.c.max_attempts
            )
        )
    return event_id


async def test_a_replay_from_the_cli_takes_the_destinations_current_max_attempts(
    tmp_path: Path, store: SqlStore, sink: Sink, database_url: str
) -> None:
    # Before: the replayed delivery kept the limit it was created with, shown and obeyed
    # by any worker that judged it by the stored value.
    event_id = await dead_delivery(store, config_for(database_url, sink, max_attempts=2))
    path = tmp_path / "estafeta.toml"
    path.write_text(
        f'[storage]\nurl = "{database_url}"\n\n'
        '[[tenants]]\nid = "clinica-sol"\n\n'
        '[[destinations]]\nid = "crm"\ntenant = "clinica-sol"\n'
        f'url = "{sink.url}/crm"\nmax_attempts = 7\n'
    )
    replayed = await asyncio.to_thread(
        CliRunner().invoke, main, ["dlq", "replay", "--all", "--config", str(path)]
    )
    assert replayed.exit_code == 0, replayed.output
    delivery = await only_delivery(store, event_id)
    assert (delivery.state, delivery.attempts, delivery.max_attempts) == ("pending", 0, 7)


async def test_a_replay_over_http_takes_the_destinations_current_max_attempts(
    store: SqlStore, sink: Sink, database_url: str, config: Config
) -> None:
    event_id = await dead_delivery(store, config_for(database_url, sink, max_attempts=1))
    async for client in make_client(store, config):  # crm: max_attempts = 3
        r = await client.http.post("/api/v1/dlq/replay", json={"all": True}, headers=ADMIN)
        assert r.status_code == 200, r.text
        [delivery] = (await client.http.get(f"/api/v1/events/{event_id}", headers=ADMIN)).json()[
            "deliveries"
        ]
        assert (delivery["state"], delivery["attempts"], delivery["max_attempts"]) == (
            "pending",
            0,
            3,
        )


async def test_a_replay_keeps_the_stored_limit_of_a_destination_the_configuration_lacks(
    store: SqlStore, sink: Sink, database_url: str
) -> None:
    await dead_delivery(store, config_for(database_url, sink, max_attempts=2))
    [dead] = await store.list_dead(DeadLetterFilter())
    assert await store.replay(
        DeadLetterFilter(), actor="t", now_ms=int(time.time() * 1000), limits={"billing": 9}
    ) == [dead.id]
    [replayed] = await lease_any(store, now_ms=int(time.time() * 1000))
    assert replayed.max_attempts == 2
