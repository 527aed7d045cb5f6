"""Values that cross the store's interface (no SQLAlchemy rows leak out of the store).

What ingest and the worker make per event, per delivery or per attempt is a frozen
`msgspec.Struct` (see `Record`); the read side's views stay dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from estafeta.delivery.decision import Transition
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import Outcome
from estafeta.record import Record


class DirectLease(Record, frozen=True):
    """A lease taken as its deliveries are stored, for the worker in the same process
    (delivery/handoff.py): they are stored in flight under it, never pending."""

    token: str
    expires_at: int  # Unix ms
    worker_id: str


class NewDelivery(Record, frozen=True):
    id: str
    destination_id: str
    priority: int
    max_attempts: int
    ordering_key: str | None = None
    lease: DirectLease | None = None  # None: stored pending, for any worker to lease


class NewMessage(Record, frozen=True):
    """A message queued through POST /api/v1/messages, stored with its send event."""

    id: str  # msg_…
    source_id: str
    recipient: str  # E.164
    content: str  # JSON: {"text": …} | {"template": …} | {"media": …}


class NewEscalation(Record, frozen=True):
    """A conversation handed to a human, stored with its conversation.escalated event."""

    id: str
    reason: str
    priority: int
    actor: str


class NewEvent(Record, frozen=True):
    """An accepted event and the deliveries routing made of it, committed together."""

    id: str
    tenant_id: str
    source_id: str
    type: str
    idempotency_key: str | None
    occurred_at: int
    received_at: int
    payload: str  # canonical JSON
    deliveries: tuple[NewDelivery, ...] = ()
    raw: str | None = None
    conversation_id: str | None = None  # see messaging/facts.py
    message_ref: str | None = None
    direction: str | None = None  # "inbound" | "outbound": which conversation counter
    contact_name: str | None = None
    message: NewMessage | None = None
    escalation: NewEscalation | None = None

    def with_deliveries(self, deliveries: tuple[NewDelivery, ...]) -> NewEvent:
        """The same event with other deliveries (ingest, per event handed to the worker)."""
        return msgspec.structs.replace(self, deliveries=deliveries)


class InsertResult(Record, frozen=True):
    event_id: str  # the stored event's id: the original one when `duplicate`
    duplicate: bool
    spooled: bool = False  # journaled locally while the store is unreachable


class CompletedAttempt(Record, frozen=True):
    """One finished attempt: what happened and the transition `decide` chose for it."""

    delivery: LeasedDelivery
    outcome: Outcome
    transition: Transition
    started_at: int
    attempt_id: str


@dataclass(frozen=True, slots=True)
class Completed:
    """What recording a batch of attempts did: how many transitions the store applied, and
    the deliveries it moved to the dead-letter queue. A transition whose lease was lost
    (expired and rescued, or released) is in neither: the rescuer's stands."""

    applied: int
    dead: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ApiKeyView:
    """A tenant's API key as operators see it: never the key, never its hash."""

    id: str
    tenant_id: str
    label: str
    created_at: int
    revoked_at: int | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class AttemptView:
    id: str
    number: int
    started_at: int
    duration_ms: float
    outcome: str
    status_code: int | None
    error_class: str | None
    response_excerpt: str


@dataclass(frozen=True, slots=True)
class DeliveryView:
    id: str
    tenant_id: str
    event_id: str
    event_type: str
    destination_id: str
    state: str
    priority: int
    attempts: int
    max_attempts: int
    next_attempt_at: int
    last_error: str | None
    replays: int
    created_at: int
    updated_at: int
    attempt_log: tuple[AttemptView, ...] = ()


@dataclass(frozen=True, slots=True)
class EventView:
    id: str
    tenant_id: str
    source_id: str
    type: str
    idempotency_key: str | None
    occurred_at: int
    received_at: int
    payload: dict[str, Any]
    deliveries: tuple[DeliveryView, ...] = ()


DEAD_LIMIT = 1000  # dead deliveries a selection takes by default


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead deliveries an operator means: by ids, or by destination/type/time."""

    tenant_id: str | None = None  # None: every tenant (admin only)
    delivery_ids: tuple[str, ...] = ()
    destination_id: str | None = None
    event_type: str | None = None
    since: int | None = None  # dead since (updated_at >=), Unix ms
    until: int | None = None
    limit: int | None = None  # None: as many as `delivery_ids` names, else DEAD_LIMIT
    # Only those that died after this (updated_at, id): where the previous page ended.
    after: tuple[int, str] | None = None

    @property
    def batch(self) -> int:
        """At most how many a statement takes: a list of ids is meant whole."""
        return self.limit or len(self.delivery_ids) or DEAD_LIMIT

    @property
    def ends_before_it_begins(self) -> bool:
        """A time window no death falls in, `until` not after `since`: most likely the two
        swapped, so the CLI and the API refuse it rather than answer with nothing."""
        return self.since is not None and self.until is not None and self.until <= self.since


@dataclass(frozen=True, slots=True)
class DeadGroup:
    """Dead deliveries of one tenant's destination that died for one reason."""

    tenant_id: str
    destination_id: str
    last_error: str | None
    count: int
    first_dead_at: int
    last_dead_at: int


@dataclass(frozen=True, slots=True)
class QueueDepths:
    """What the alerts watch: deliveries waiting to be sent or being sent (leased to a
    worker, maybe one that died), and waiting for an operator; each counted to the bound
    asked (store/views.py: queue_depths), no further."""

    pending: int
    in_flight: int
    dead: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    by_state: dict[str, int] = field(default_factory=dict)
    oldest_pending_at: int | None = None
    # The states whose count reached the bound they are counted to (store/views.py): an
    # estimate or a floor, not an exact count.
    estimated: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ProcessView:
    """A running process as the store knows it (store/processes.py)."""

    id: str
    started_at: int
    seen_at: int
    destinations: list[str]
    delivers: bool  # runs delivery workers (not `serve --no-workers`)
    delivering_at: int | None  # when it was last known to deliver (store/processes.py)


@dataclass(frozen=True, slots=True)
class ConversationView:
    tenant_id: str
    id: str
    status: str
    contact_name: str | None
    first_message_at: int
    last_message_at: int
    inbound_count: int
    outbound_count: int
    escalated_at: int | None
    escalation_reason: str | None
    escalation_priority: int | None


@dataclass(frozen=True, slots=True)
class Interaction:
    """One message of a conversation, either way."""

    at: int
    direction: str  # "inbound" | "outbound"
    id: str  # the event id (inbound) or the message id (outbound)
    content: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StatusChange:
    status: str
    at: int
    error: dict[str, Any] | None = None
    provider: str | None = None  # the event's `data.provider` (`whatsapp_cloud`, `twilio` …)


@dataclass(frozen=True, slots=True)
class MessageView:
    id: str
    tenant_id: str
    source_id: str
    conversation_id: str
    recipient: str
    content: dict[str, Any]
    state: str  # queued | sent | failed: what sending knows
    provider_message_id: str | None
    error: str | None
    event_id: str
    delivery_id: str
    created_at: int
    sent_at: int | None
    provider_statuses: tuple[StatusChange, ...] = ()
    failed_at: int | None = None  # when sending gave up (state `failed`)
