"""A delivery as a worker holds it while its lease is live."""

from __future__ import annotations

from estafeta.record import Record


class LeasedDelivery(Record, frozen=True):
    id: str  # dlv_…
    tenant_id: str
    event_id: str  # evt_…: also the outbound `webhook-id`, stable across retries
    destination_id: str
    attempts: int  # attempts made before this one
    max_attempts: int  # as stored; the worker's configuration's before it decides (governed)
    priority: int
    ordering_key: str | None
    lease_token: str  # guards every update: a late result never overwrites a re-leased row
    lease_expires_at: int  # Unix ms
    payload: bytes  # the canonical event JSON (DESIGN.md §3.4), exactly as sent
