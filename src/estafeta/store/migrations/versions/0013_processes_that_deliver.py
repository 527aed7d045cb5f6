"""Which running processes deliver.

`estafeta serve --no-workers` leaves delivery to `estafeta worker` processes. When none runs
(never started, crashed, crash-looping on a bad file), every event is still accepted and
its deliveries wait pending: before this, nothing said so until the backlog reached
`worker.alert_queue_depth`, days away at a clinic's traffic. Each process now records
whether it delivers, and `serve`'s alert monitor raises `no_workers` when deliveries wait
and none has run for `worker.alert_no_workers_s`. Rows written before are taken as
delivering (no false alarm for a process still on the older version; rows of processes
not seen for ten minutes are forgotten anyway).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "processes",
        sa.Column("delivers", sa.Boolean(), nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    with op.batch_alter_table("processes", schema=None) as batch_op:
        batch_op.drop_column("delivers")
