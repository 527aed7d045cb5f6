"""An index of the keyed deliveries in flight, for the lease's one-at-a-time check of a key.

A delivery with an ordering key was leased while a *later* one of its key was in flight
when it had been replayed from the dead-letter queue (its successors had gone on while it
was dead), or stored by a process whose clock is behind: two of one key in flight at once,
answered in any order. The lease now also waits while any delivery of the key is in flight
(sql/due.sql); this index answers that with one probe of a few rows, where the ordering
index would walk every pending delivery of the key after it (measured: twice the buffers
of a lease of 100 keyed deliveries, 10 pending per key).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_KEYED_IN_FLIGHT = "state = 'in_flight' AND ordering_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "deliveries_ordering_in_flight",
            ["destination_id", "ordering_key"],
            unique=False,
            postgresql_where=sa.text(_KEYED_IN_FLIGHT),
            sqlite_where=sa.text(_KEYED_IN_FLIGHT),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_ordering_in_flight")
