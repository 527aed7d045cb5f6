"""Per-key ordering index and the circuit breakers' shared state.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OPEN_AND_KEYED = "state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "deliveries_ordering",
            ["destination_id", "ordering_key", "id"],
            unique=False,
            postgresql_where=sa.text(_OPEN_AND_KEYED),
            sqlite_where=sa.text(_OPEN_AND_KEYED),
        )
    op.create_table(
        "circuits",
        sa.Column("destination_id", sa.String(length=63), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("destination_id"),
    )


def downgrade() -> None:
    op.drop_table("circuits")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_ordering")
