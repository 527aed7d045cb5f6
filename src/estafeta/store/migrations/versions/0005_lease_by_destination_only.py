"""Leases read pending deliveries by destination only: the general lease index goes.

Every lease now names its destinations and reads each one's due deliveries through
deliveries_destination_due (sql/lease_*.sql). The index of all pending deliveries by
priority was left to the planner as a second choice, and with one destination's backlog in
the statistics PostgreSQL chose it for a lease of another destination, walking the whole
backlog (20 ms a lease at 200,000 pending); it also cost a write on every delivery stored
and every state change.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PENDING = "state = 'pending'"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_lease")


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "deliveries_lease",
            ["priority", "next_attempt_at", "id"],
            unique=False,
            postgresql_where=sa.text(_PENDING),
            sqlite_where=sa.text(_PENDING),
        )
