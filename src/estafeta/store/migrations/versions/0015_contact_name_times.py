"""When a conversation's contact name was given: the newest message's name wins.

Every stored message's `contact_name` replaced the conversation's, whatever its age: a
provider redelivering yesterday's webhook (a retry, a spool import) after the customer had
renamed themselves put the old name back. A conversation now keeps the time of the message
its name came from, and only a message at least as recent renames it. Names stored before
take the conversation's last message's time: a later message still renames it, an older
redelivery no longer does. A nullable column added at the end: no table rewrite.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("contact_name_at", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE conversations SET contact_name_at = last_message_at WHERE contact_name IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("contact_name_at")
