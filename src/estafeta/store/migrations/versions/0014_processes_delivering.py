"""When each process last delivered.

`no_workers` looked for a process that delivers by its role alone (0013), so a worker whose
delivery task kept crashing — restarted, crashing again, announcing itself all the while —
counted as delivering, and the alert stayed quiet while nothing was delivered. Each process
now records the last announcement at which its delivery task had run steadily since the one
before; `no_workers` reads that. Rows written before take their last announcement, as 0013
took them to deliver.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("processes", sa.Column("delivering_at", sa.BigInteger(), nullable=True))
    op.execute("UPDATE processes SET delivering_at = seen_at WHERE delivers")


def downgrade() -> None:
    with op.batch_alter_table("processes", schema=None) as batch_op:
        batch_op.drop_column("delivering_at")
