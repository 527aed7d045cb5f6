"""The processes holding a configuration, and which destinations each names.

During a rolling change of the configuration (a destination added, processes restarted one
by one), a worker still on the old file dead-lettered the new destination's deliveries as
`unknown_destination`. Each process now records here what its configuration names, and a
worker dead-letters only deliveries to a destination no live process names
(delivery/presence.py, delivery/rescue.py).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("id", sa.String(length=80), nullable=False),
        sa.Column("destinations", sa.Text(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("seen_at", sa.BigInteger(), nullable=False),
        sa.Column("stopped_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("processes")
