"""Accepted events as tests build them, for the store, the spool and the hand-over."""

from __future__ import annotations

from estafeta.store.records import NewDelivery, NewEvent


def new_event(
    event_id: str, *deliveries: NewDelivery, key: str | None = None, at: int = 1
) -> NewEvent:
    """A `message.received` event of clinica-sol from `crm-events`, its payload naming it."""
    return NewEvent(
        id=event_id,
        tenant_id="clinica-sol",
        source_id="crm-events",
        type="message.received",
        idempotency_key=key,
        occurred_at=at,
        received_at=at,
        payload=f'{{"id":"{event_id}"}}',
        deliveries=deliveries,
    )
