"""The store's tables, defined once with SQLAlchemy Core (both engines use this metadata).

Times are Unix milliseconds in BIGINT columns: one representation on SQLite and PostgreSQL,
compared as integers in the lease query, and converted to ISO 8601 only at the API edge.
Every row carries its tenant; every query filters on it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
    true,
)

from estafeta.delivery.state import DeliveryState

metadata = MetaData()


def rows_where(condition: str) -> dict[str, Any]:
    """A partial index's condition, the same for both engines (one text, so the two cannot
    drift apart)."""
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


ID = String(40)  # "evt_" + 26-character ULID, with room to spare
NAME = String(63)  # tenant/source/destination/route ids from the configuration
# Where a delivery goes: a configured destination, or "send:<source id>" for messages sent
# through a provider source (messaging/facts.py), 5 characters longer than any id. Only on
# PostgreSQL, which enforces lengths: SQLite does not, and widening it there rebuilds
# `deliveries`, whose drop would cascade-delete every attempt (foreign keys are on).
DESTINATION = String(63).with_variant(String(5 + 63), "postgresql")

_STATES = ", ".join(f"'{state.value}'" for state in DeliveryState)

tenants = Table(
    "tenants",
    metadata,
    Column("id", NAME, primary_key=True),
    Column("name", Text, nullable=False, server_default=""),
    Column("ingress_rate_limit", String(40), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

sources = Table(
    "sources",
    metadata,
    Column("id", NAME, primary_key=True),
    Column("tenant_id", NAME, ForeignKey("tenants.id"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

destinations = Table(
    "destinations",
    metadata,
    Column("id", NAME, primary_key=True),
    Column("tenant_id", NAME, ForeignKey("tenants.id"), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("url", Text, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

routes = Table(
    "routes",
    metadata,
    Column("id", NAME, primary_key=True),
    Column("tenant_id", NAME, ForeignKey("tenants.id"), nullable=False),
    Column("events", Text, nullable=False),  # JSON list of globs
    Column("filter", Text, nullable=True),
    Column("destinations", Text, nullable=False),  # JSON list of destination ids
    Column("priority", SmallInteger, nullable=False),
    Column("ordering_key", Text, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    CheckConstraint("priority BETWEEN 0 AND 4", name="routes_priority_range"),
)

events = Table(
    "events",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", NAME, nullable=False),
    Column("source_id", NAME, nullable=False),
    Column("type", String(200), nullable=False),
    # The sender's idempotency key (webhook-id, Idempotency-Key, a provider's message id).
    # NULL means "no key": such events are never deduplicated (NULLs are distinct in a
    # unique index on both engines).
    Column("idempotency_key", String(255), nullable=True),
    Column("occurred_at", BigInteger, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),  # the canonical event JSON, exactly as delivered
    Column("raw", Text, nullable=True),  # the provider's original body, for audit/reprocessing
    # For WhatsApp events: the customer's conversation, and the provider's id of the message
    # the event is (message.received) or is about (message.status): a sent message's status
    # timeline is the message.status events that name it.
    Column("conversation_id", String(64), nullable=True),
    Column("message_ref", String(255), nullable=True),
    UniqueConstraint("tenant_id", "source_id", "idempotency_key", name="events_idempotency_key"),
)
Index("events_tenant_received", events.c.tenant_id, events.c.received_at)
# A conversation's messages in the order its pages read them (conversations.py), so that a
# page reads only its own rows, at the start of a long conversation as at its end.
Index(
    "events_conversation",
    events.c.tenant_id,
    events.c.conversation_id,
    events.c.type,
    events.c.occurred_at,
    events.c.id,
    **rows_where("conversation_id IS NOT NULL"),
)
Index(
    "events_message_ref",
    events.c.source_id,
    events.c.message_ref,
    **rows_where("message_ref IS NOT NULL"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", NAME, nullable=False),
    Column("event_id", ID, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("destination_id", DESTINATION, nullable=False),
    Column("state", String(16), nullable=False),
    Column("priority", SmallInteger, nullable=False),
    Column("ordering_key", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("lease_token", String(40), nullable=True),
    Column("lease_expires_at", BigInteger, nullable=True),
    Column("leased_by", String(80), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("replays", Integer, nullable=False, server_default=text("0")),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    CheckConstraint(f"state IN ({_STATES})", name="deliveries_state_valid"),
    CheckConstraint("priority BETWEEN 0 AND 4", name="deliveries_priority_range"),
    CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="deliveries_attempts_valid"),
    CheckConstraint(
        "state <> 'in_flight' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)",
        name="deliveries_in_flight_has_lease",
    ),
)
# A lease reads "pending, due, by priority then due time then id" of each destination it
# names (sql/lease_*.sql): this partial index holds exactly those rows in exactly that order,
# so a lease is a range scan per destination however many succeeded or dead rows the table
# keeps, and never walks another destination's backlog. (There is deliberately no such
# index across destinations: PostgreSQL would choose it for a lease of one destination.)
Index(
    "deliveries_destination_due",
    deliveries.c.destination_id,
    deliveries.c.priority,
    deliveries.c.next_attempt_at,
    deliveries.c.id,
    **rows_where("state = 'pending'"),
)
# Rescue of expired leases scans only in-flight rows by deadline.
Index(
    "deliveries_lease_expiry",
    deliveries.c.lease_expires_at,
    **rows_where("state = 'in_flight'"),
)
# Per-key ordering: "is an earlier delivery with this key to this destination still open?"
Index(
    "deliveries_ordering",
    deliveries.c.destination_id,
    deliveries.c.ordering_key,
    deliveries.c.id,
    **rows_where("state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL"),
)
# "Is one with this key to this destination in flight?": a later one may be (a replay, a
# process whose clock is behind); one row at most, so the check is one probe, not a walk of
# the key's pending ones. Unique: two leases that race cannot both put one of a key in
# flight (migration 0010).
ORDERING_IN_FLIGHT = "deliveries_ordering_in_flight"
Index(
    ORDERING_IN_FLIGHT,
    deliveries.c.destination_id,
    deliveries.c.ordering_key,
    unique=True,
    **rows_where("state = 'in_flight' AND ordering_key IS NOT NULL"),
)
# The dead-letter queue, oldest death first (dead_letters.py), and its count (views.py): a few
# rows among the millions that succeeded, read without walking those.
Index(
    "deliveries_dead",
    deliveries.c.updated_at,
    deliveries.c.id,
    **rows_where("state = 'dead'"),
)
# One destination's dead ones, in the same order: its queue after an outage is read (and
# replayed) by a range, not a walk of every destination's dead ones (0018).
Index(
    "deliveries_dead_destination",
    deliveries.c.destination_id,
    deliveries.c.updated_at,
    deliveries.c.id,
    **rows_where("state = 'dead'"),
)
Index("deliveries_event", deliveries.c.event_id)
Index(
    "deliveries_tenant_state", deliveries.c.tenant_id, deliveries.c.state, deliveries.c.updated_at
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", NAME, nullable=False),
    Column("delivery_id", ID, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("started_at", BigInteger, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error_class", String(64), nullable=True),
    Column("response_excerpt", Text, nullable=False, server_default=""),
    CheckConstraint("number >= 1", name="attempts_number_positive"),
)
# A delivery's attempts, latest last: an event's read takes each delivery's latest by a range
# of it, however many replays it had (views.py, 0016).
Index("attempts_delivery", attempts.c.delivery_id, attempts.c.started_at, attempts.c.id)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", NAME, ForeignKey("tenants.id"), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex; never the key
    Column("label", Text, nullable=False, server_default=""),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", NAME, nullable=True),  # NULL: an action of the operator across tenants
    Column("at", BigInteger, nullable=False),
    Column("actor", String(80), nullable=False),
    Column("action", String(40), nullable=False),
    Column("detail", Text, nullable=False),  # JSON
)
Index("audit_log_tenant_at", audit_log.c.tenant_id, audit_log.c.at)

# The circuit breaker's shared state per destination, when no Redis is configured: the
# breaker's own JSON (delivery/circuit.py), read-modify-written under a row lock.
circuits = Table(
    "circuits",
    metadata,
    Column("destination_id", DESTINATION, primary_key=True),
    Column("data", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# One row per running process that holds a configuration (`serve`, with or without workers,
# and `worker`): the destinations its configuration names, recorded at start and every few
# seconds (delivery/presence.py). A worker dead-letters deliveries to a destination it does
# not know only when no live process names it either: during a rolling change of the
# configuration, the processes already on the new file send them (delivery/rescue.py).
processes = Table(
    "processes",
    metadata,
    Column("id", String(80), primary_key=True),  # host:pid:random, as workers' ids
    Column("destinations", Text, nullable=False),  # JSON list, "send:<source>" included
    Column("started_at", BigInteger, nullable=False),
    Column("seen_at", BigInteger, nullable=False),
    Column("stopped_at", BigInteger, nullable=True),  # NULL while it runs
    # False for `serve --no-workers`: the no_workers alert looks for one that delivers (0013).
    Column("delivers", Boolean, nullable=False, server_default=true()),
    # Its last announcement (or graceful stop) with its delivery task running steadily since
    # the one before: a worker crash-looping runs but delivers nothing (0014).
    Column("delivering_at", BigInteger, nullable=True),
)

# One row per tenant and customer: counters kept up to date in the same transaction as the
# events that touch them (what the seed product backs up to Airtable as "Conversations").
conversations = Table(
    "conversations",
    metadata,
    Column("tenant_id", NAME, primary_key=True),
    Column("id", String(64), primary_key=True),  # the customer's number, digits only
    Column("status", String(16), nullable=False),  # open, escalated or closed
    Column("contact_name", Text, nullable=True),
    Column("first_message_at", BigInteger, nullable=False),
    Column("last_message_at", BigInteger, nullable=False),
    Column("inbound_count", Integer, nullable=False),
    Column("outbound_count", Integer, nullable=False),
    Column("escalated_at", BigInteger, nullable=True),
    Column("escalation_reason", Text, nullable=True),
    Column("escalation_priority", SmallInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    # The time of the message `contact_name` came from: an older one (a late redelivery)
    # never renames the contact (0015).
    Column("contact_name_at", BigInteger, nullable=True),
    CheckConstraint("status IN ('open', 'escalated', 'closed')", name="conversations_status_valid"),
    CheckConstraint("inbound_count >= 0 AND outbound_count >= 0", name="conversations_counts"),
)
# The list's pages (conversations.py), most recent first: all of a tenant's conversations, and
# the escalated ones, an agent's queue of a few among thousands. Only that one: every inbound
# message moves its conversation in each index that holds it (+3 µs of PostgreSQL per message
# for one on every status), and a page of a common status skips few rows by the first index.
Index(
    "conversations_tenant_last",
    conversations.c.tenant_id,
    conversations.c.last_message_at,
    conversations.c.id,
)
Index(
    "conversations_escalated",
    conversations.c.tenant_id,
    conversations.c.last_message_at,
    conversations.c.id,
    **rows_where("status = 'escalated'"),
)

# Messages sent through POST /api/v1/messages: queued until the provider accepts one (sent,
# with its id) or sending gives up (failed); later states come from status webhooks.
messages = Table(
    "messages",
    metadata,
    Column("id", ID, primary_key=True),  # msg_…
    Column("tenant_id", NAME, nullable=False),
    Column("source_id", NAME, nullable=False),
    Column("conversation_id", String(64), nullable=False),
    Column("recipient", String(32), nullable=False),
    Column("content", Text, nullable=False),  # JSON: text, template or media
    # queued, sent or failed: what sending knows; the provider's statuses say the rest.
    Column("state", String(16), nullable=False),
    Column("provider_message_id", String(255), nullable=True),
    Column("error", Text, nullable=True),
    Column("event_id", ID, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("delivery_id", ID, nullable=False),
    Column("sent_at", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    # A second id the provider gave the message, that some of its status webhooks name
    # instead of provider_message_id (Z-API's zaapId); stored as events.message_ref is.
    Column("provider_alt_id", String(255), nullable=True),
    CheckConstraint("state IN ('queued', 'sent', 'failed')", name="messages_state_valid"),
)
Index("messages_delivery", messages.c.delivery_id)
# The message an event is the send of: asked for every repeated `POST /api/v1/messages` and
# every repeated keyed `POST /api/v1/events` (migration 0017), a probe, not a scan of them all.
Index("messages_event", messages.c.event_id)
Index(  # as events_conversation, for the outbound side of a conversation's pages
    "messages_conversation",
    messages.c.tenant_id,
    messages.c.conversation_id,
    messages.c.created_at,
    messages.c.id,
)

escalations = Table(
    "escalations",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", NAME, nullable=False),
    Column("conversation_id", String(64), nullable=False),
    Column("event_id", ID, nullable=False),  # the conversation.escalated event
    Column("reason", Text, nullable=False),
    Column("priority", SmallInteger, nullable=False),
    Column("actor", String(80), nullable=False),
    Column("at", BigInteger, nullable=False),
)
Index("escalations_conversation", escalations.c.tenant_id, escalations.c.conversation_id)
