"""Destination ids of deliveries and circuits fit "send:<source id>" on PostgreSQL.

A message sent through a provider source goes to the destination `send:<source id>`, five
characters longer than the 63 a configured id may have: on PostgreSQL every send through a
source with a 59-to-63-character id failed (value too long for varchar(63)), live and from
the spool. Widening a varchar there rewrites neither the table nor its indexes. SQLite does
not enforce the length, and changing it would rebuild `deliveries`, whose drop would
cascade-delete every attempt (foreign keys are on): it is left as it is.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = (("deliveries", "destination_id"), ("circuits", "destination_id"))


def upgrade() -> None:
    _resize(63, 68)


def downgrade() -> None:
    _resize(68, 63)  # fails while a longer id is stored: nothing is cut


def _resize(before: int, after: int) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _COLUMNS:
        op.alter_column(
            table,
            column,
            existing_type=sa.String(length=before),
            type_=sa.String(length=after),
            existing_nullable=False,
        )
