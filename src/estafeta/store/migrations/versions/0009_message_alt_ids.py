"""A sent message's second provider id (Z-API's zaapId), so statuses naming it find it.

Z-API answers a send with a `messageId` and a `zaapId`, and its DeliveryCallback requires
only `zaapId` (`messageId` is optional): a callback without `messageId` — in particular one
saying the send failed — named an id no message had, and the message stayed `sent` for
good. Messages now keep that second id too. A nullable column added at the end: no table
rewrite on either engine; messages sent before keep NULL (their callbacks are not re-sent).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("provider_alt_id", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("provider_alt_id")
