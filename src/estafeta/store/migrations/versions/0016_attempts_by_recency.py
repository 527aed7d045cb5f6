"""An event's read takes each delivery's latest attempts by an index.

`GET /api/v1/events/{id}` lists a delivery's latest 100 attempts, but ranked every attempt
the delivery ever had to find them: a delivery replayed again and again (a script replaying
a long-dead destination every hour) made each read walk and sort all of them (60 ms at
20,000 attempts on PostgreSQL, 0.3 s on SQLite, growing without end). The delivery's index of
attempts now keeps them by start time instead of by number (which starts again at 1 after
each replay, and which nothing reads by), so the latest 100 are a range of it: one index
for one, as before, rebuilt once here (seconds per million attempts).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_index("attempts_delivery")
        batch_op.create_index("attempts_delivery", ["delivery_id", "started_at", "id"])


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_index("attempts_delivery")
        batch_op.create_index("attempts_delivery", ["delivery_id", "number"])
