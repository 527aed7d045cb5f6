"""An index of the dead deliveries by destination.

The dead-letter queue of one destination (`estafeta dlq list|replay|discard --destination`,
`GET /api/v1/dlq?destination=`, the operator's usual selection after an outage) was read by
walking every dead delivery (deliveries_dead) for that destination's, or, on PostgreSQL for a
destination with few deliveries, every delivery the store keeps: 0.2-0.4 s a page at 1,000,000
deliveries of which 200,000 dead, growing with the queue or the history, and again for each
batch of a replay. The dead ones of a destination are now a range of their own, in the
queue's order (oldest death first).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_DEAD = "state = 'dead'"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "deliveries_dead_destination",
            ["destination_id", "updated_at", "id"],
            unique=False,
            postgresql_where=sa.text(_DEAD),
            sqlite_where=sa.text(_DEAD),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_dead_destination")
