"""An index of the dead deliveries alone.

Listing, replaying or discarding the dead-letter queue without naming a tenant (`estafeta dlq
list`, a selection by destination or type) and counting the queue for /metrics and
/health/detailed walked every delivery the store keeps, succeeded ones included: a store only
grows, and at 2,000,000 deliveries each scrape spent 160 ms of PostgreSQL counting them. The
dead ones are few, and now read by an index of their own in the queue's order (oldest death
first); pending and in-flight ones already had theirs.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_DEAD = "state = 'dead'"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "deliveries_dead",
            ["updated_at", "id"],
            unique=False,
            postgresql_where=sa.text(_DEAD),
            sqlite_where=sa.text(_DEAD),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_dead")
