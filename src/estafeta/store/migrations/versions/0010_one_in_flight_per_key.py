"""The database itself keeps one delivery of an ordering key in flight at a time.

The lease statement waits while any delivery of a key is in flight (sql/due.sql), but it reads
the store as it was when it began: on PostgreSQL two workers leasing at once could each take
a different delivery of one key, when an earlier one was stored (or replayed from the
dead-letter queue) while the other's lease was being taken. The index on a key's in-flight
deliveries (0007) becomes unique, so the second lease waits for the first and fails; the
store takes that as a lease that found nothing (postgres.py).

A database where that race already happened holds such pairs: all but the first (lowest id)
of a key are given back first, pending with their lease cleared and no attempt counted, as a
graceful stop gives a lease back (if one was being sent, it may be sent again: at least once).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_KEYED_IN_FLIGHT = "state = 'in_flight' AND ordering_key IS NOT NULL"

_GIVE_BACK_ALL_BUT_THE_FIRST = sa.text(
    """
    UPDATE deliveries
    SET state = 'pending', lease_token = NULL, lease_expires_at = NULL, leased_by = NULL,
        updated_at = :now
    WHERE state = 'in_flight' AND ordering_key IS NOT NULL
      AND EXISTS (
        SELECT 1 FROM deliveries AS first
        WHERE first.destination_id = deliveries.destination_id
          AND first.ordering_key = deliveries.ordering_key
          AND first.state = 'in_flight'
          AND first.id < deliveries.id)
    """
)


def _index(unique: bool) -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_ordering_in_flight")
        batch_op.create_index(
            "deliveries_ordering_in_flight",
            ["destination_id", "ordering_key"],
            unique=unique,
            postgresql_where=sa.text(_KEYED_IN_FLIGHT),
            sqlite_where=sa.text(_KEYED_IN_FLIGHT),
        )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Until the transaction ends: no lease may put a second one of a key in flight
        # between the give-back and the unique index (reads go on).
        op.execute("LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE")
    op.get_bind().execute(_GIVE_BACK_ALL_BUT_THE_FIRST, {"now": int(time.time() * 1000)})
    _index(unique=True)


def downgrade() -> None:
    _index(unique=False)
