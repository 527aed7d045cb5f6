"""One `estafeta serve` (workers in-process), three real sinks, 1,000 signed webhooks.

What a user of the hub would check: every webhook acknowledged, every event delivered once
to each destination that wants it (through retries when the destination fails for a while),
the ones a destination keeps refusing waiting in the dead-letter queue with their attempts
logged, and all of them delivered once the operator replays the queue. On both engines.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    http_destination,
    hub_client,
    hub_config,
    settled,
    summary,
    wait_until,
    write_config,
)
from tests.conftest import SINK_SECRET

EVENTS = 1000
BOOKING_EVERY = 10  # every 10th event is a booking, also routed to the broken calendar
# The billing sink answers 500 to its first 30 requests: retries happen, and its circuit
# opens (5 consecutive failures) and closes again on the first probe that meets a 200.
FLAKY_FAILURES = 30


def check_retried_then_delivered(delivery: dict[str, Any]) -> None:
    log = delivery["attempt_log"]
    assert delivery["state"] == "succeeded", delivery
    assert len(log) >= 2, delivery
    assert all(a["error_class"] == "http_500" and a["status_code"] == 500 for a in log[:-1]), log
    assert log[-1]["outcome"] == "success", log
    assert log[-1]["status_code"] == 200, log
    assert log[-1]["error_class"] is None, log
    assert [a["number"] for a in log] == list(range(1, len(log) + 1)), log


@pytest.mark.timeout(150)
async def test_thousand_signed_webhooks_are_delivered_once_retried_and_dead_lettered(
    database_url: str, tmp_path: Path, estafeta: Estafeta
) -> None:
    started = time.monotonic()
    crm, billing, calendar = (Sink(secret=SINK_SECRET) for _ in range(3))
    for sink in (crm, billing, calendar):
        await sink.start()
    billing.fail_first(FLAKY_FAILURES, 500)
    calendar.respond(500)  # down until the operator has fixed it
    try:
        config = hub_config(
            database_url,
            tmp_path,
            destinations=[
                http_destination("crm", f"{crm.url}/hooks/crm"),
                http_destination(
                    "billing",
                    f"{billing.url}/hooks/billing",
                    max_attempts=10,
                    circuit={"failures": 5, "reset_s": 0.2},
                ),
                # A circuit that never opens here, so every booking spends its two attempts
                # at once instead of waiting, attempt by attempt, for half-open probes.
                http_destination(
                    "calendar",
                    f"{calendar.url}/hooks/calendar",
                    max_attempts=2,
                    circuit={"failures": 10_000, "reset_s": 1},
                ),
            ],
            routes=[
                {
                    "id": "leads",
                    "tenant": TENANT,
                    "events": ["lead.*"],
                    "destinations": ["crm", "billing"],
                },
                {
                    "id": "bookings",
                    "tenant": TENANT,
                    "events": ["lead.*"],
                    "filter": "data.booking",
                    "destinations": ["calendar"],
                },
            ],
        )
        serve = await estafeta.serve(write_config(tmp_path / "estafeta.toml", config))

        async with hub_client(serve) as hub:
            bodies = [
                {"type": "lead.created", "data": {"n": n, "booking": n % BOOKING_EVERY == 0}}
                for n in range(EVENTS)
            ]
            msg_ids = [f"msg_{n:05d}" for n in range(EVENTS)]
            sent = await hub.send_many(bodies, msg_ids)

            assert sent.errors == []
            assert Counter(sent.statuses) == {202: EVENTS}
            acknowledged = sent.acknowledged
            assert len(acknowledged) == EVENTS  # distinct webhook-ids, distinct events
            bookings = {sent.ids[m] for n, m in enumerate(msg_ids) if n % BOOKING_EVERY == 0}

            # The sender retries a webhook it already delivered: same answer, nothing new.
            first_id = sent.ids[msg_ids[0]]
            status, answer = await hub.post_signed(bodies[0], msg_ids[0])
            assert (status, answer) == (200, {"id": first_id, "duplicate": True})

            assert await crm.wait_for(lambda s: acknowledged <= s.delivered_ids, 60), (
                f"crm got {len(crm.delivered_ids)} of {EVENTS}"
            )
            assert await billing.wait_for(lambda s: acknowledged <= s.delivered_ids, 60), (
                f"billing got {len(billing.delivered_ids)} of {EVENTS}"
            )

            async def all_bookings_dead() -> bool:
                return len(await hub.dead("calendar")) >= len(bookings)

            await wait_until(all_bookings_dead, timeout_s=30, what="the bookings dead-lettered")

            # Retries: the attempt log of events that billing refused at first.
            refused = sorted({r.webhook_id or "" for r in billing.received if r.status == 500})
            assert refused, "the flaky sink refused nothing: no retry was exercised"
            for event_id in refused[:5]:
                # The sink has taken it; the hub records the answer a moment later (its
                # completions are committed in batches), so wait for the record, not the sink.
                async def recorded(event_id: str = event_id) -> bool:
                    state = (await hub.delivery(event_id, "billing"))["state"]
                    return state not in ("pending", "in_flight")

                await wait_until(recorded, timeout_s=10, what=f"billing's answer to {event_id}")
                check_retried_then_delivered(await hub.delivery(event_id, "billing"))

            # The dead-letter queue: every booking, two attempts each, both refused.
            dead = await hub.dead("calendar")
            assert {d["event_id"] for d in dead} == bookings
            for d in dead:
                assert (d["state"], d["attempts"], d["destination"]) == ("dead", 2, "calendar")
                assert d["last_error"].startswith("http_500"), d
            sample = await hub.delivery(sorted(bookings)[0], "calendar")
            assert [a["error_class"] for a in sample["attempt_log"]] == ["http_500", "http_500"]

            # The operator fixes the calendar and replays its dead deliveries.
            calendar.respond(200)
            status, replayed = await hub.post_json(
                "/api/v1/dlq/replay", {"destination": "calendar"}
            )
            assert status == 200, replayed
            assert replayed["count"] == len(bookings)
            assert await calendar.wait_for(lambda s: bookings <= s.delivered_ids, 30), (
                f"calendar got {len(calendar.delivered_ids)} of {len(bookings)} after replay"
            )
            by_state = await settled(hub, database_url, timeout_s=30)
            assert by_state == {"succeeded": 2 * EVENTS + len(bookings)}, by_state
            assert await hub.dead("calendar") == []
            after = await hub.delivery(sorted(bookings)[0], "calendar")
            assert (after["state"], after["replays"]) == ("succeeded", 1), after
            assert after["attempt_log"][-1]["status_code"] == 200

        # Exactly once where the destination answered 2xx, never anything unsigned.
        assert crm.delivered_ids == acknowledged
        assert billing.delivered_ids == acknowledged
        assert calendar.delivered_ids == bookings
        assert (crm.duplicates, billing.duplicates, calendar.duplicates) == (0, 0, 0)
        assert max(Counter(r.webhook_id for r in crm.received).values()) == 1
        assert [r.webhook_id for r in crm.received].count(first_id) == 1
        assert not (crm.bad_signatures or billing.bad_signatures or calendar.bad_signatures)
        lost = len(acknowledged - crm.delivered_ids) + len(acknowledged - billing.delivered_ids)
        summary(
            f"end_to_end[{database_url.split(':')[0]}]",
            sent=EVENTS + 1,
            acknowledged=len(acknowledged),
            delivered=len(crm.delivered_ids)
            + len(billing.delivered_ids)
            + len(calendar.delivered_ids),
            duplicates=crm.duplicates + billing.duplicates + calendar.duplicates,
            lost=lost,
            started=started,
        )
    finally:
        for sink in (crm, billing, calendar):
            await sink.stop()
