"""How stored records look in the API: ISO 8601 times, no internal columns."""

from __future__ import annotations

from typing import Any

from estafeta.clock import iso_from_ms
from estafeta.store.records import AttemptView, DeliveryView, EventView


def attempt_json(a: AttemptView) -> dict[str, Any]:
    return {
        "id": a.id,
        "number": a.number,
        "started_at": iso_from_ms(a.started_at),
        "duration_ms": round(a.duration_ms, 3),
        "outcome": a.outcome,
        "status_code": a.status_code,
        "error_class": a.error_class,
        "response_excerpt": a.response_excerpt,
    }


def delivery_json(d: DeliveryView) -> dict[str, Any]:
    return {
        "id": d.id,
        "tenant": d.tenant_id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "destination": d.destination_id,
        "state": d.state,
        "priority": d.priority,
        "attempts": d.attempts,
        "max_attempts": d.max_attempts,
        "next_attempt_at": iso_from_ms(d.next_attempt_at),
        "last_error": d.last_error,
        "replays": d.replays,
        "created_at": iso_from_ms(d.created_at),
        "updated_at": iso_from_ms(d.updated_at),
        "attempt_log": [attempt_json(a) for a in d.attempt_log],
    }


def event_json(e: EventView) -> dict[str, Any]:
    return {
        "id": e.id,
        "tenant": e.tenant_id,
        "source": e.source_id,
        "type": e.type,
        "idempotency_key": e.idempotency_key,
        "occurred_at": iso_from_ms(e.occurred_at),
        "received_at": iso_from_ms(e.received_at),
        "event": e.payload,
        "deliveries": [delivery_json(d) for d in e.deliveries],
    }
