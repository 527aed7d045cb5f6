"""Pending deliveries by destination: leases of one destination as an index range scan.

A lease of one destination (a circuit's probe, a destination with `max_in_flight`) walked
the general lease index past every other destination's due deliveries, the whole backlog
when it is large.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_PENDING = "state = 'pending'"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "deliveries_destination_due",
            ["destination_id", "priority", "next_attempt_at", "id"],
            unique=False,
            postgresql_where=sa.text(_PENDING),
            sqlite_where=sa.text(_PENDING),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_destination_due")
