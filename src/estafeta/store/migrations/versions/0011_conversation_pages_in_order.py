"""Conversations and their messages indexed in the order their pages read them.

A page of GET /api/v1/conversations/{id} reads the conversation's inbound messages (events)
by (occurred_at, id) and its sent ones (messages) by (created_at, id). The indexes named the
conversation but not that order (events' by received_at, messages' by nothing more), so every
page read and sorted the whole conversation, status events included: the last page of a
conversation of 10,000 messages cost as much as reading all of them. Now each index ends with
the page's order, events' after the type (a page reads only message.received), and a page
reads its own rows only.

The same for the list of a tenant's conversations (GET /api/v1/conversations): its index gains
the id that breaks ties, and a second one holds only the escalated conversations, so that a
page of those few among thousands does not read the others.

Rebuilding an index blocks writes to its table while it is built (seconds for a few million
events): run it at a quiet hour, as any upgrade.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_IN_A_CONVERSATION = "conversation_id IS NOT NULL"
_ESCALATED = "status = 'escalated'"


def _events_index(columns: list[str]) -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("events_conversation")
        batch_op.create_index(
            "events_conversation",
            ["tenant_id", "conversation_id", *columns],
            unique=False,
            postgresql_where=sa.text(_IN_A_CONVERSATION),
            sqlite_where=sa.text(_IN_A_CONVERSATION),
        )


def _messages_index(columns: list[str]) -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("messages_conversation")
        batch_op.create_index(
            "messages_conversation", ["tenant_id", "conversation_id", *columns], unique=False
        )


def _conversations_index(columns: list[str]) -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("conversations_tenant_last")
        batch_op.create_index(
            "conversations_tenant_last", ["tenant_id", "last_message_at", *columns], unique=False
        )


def upgrade() -> None:
    _events_index(["type", "occurred_at", "id"])
    _messages_index(["created_at", "id"])
    _conversations_index(["id"])
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(
            "conversations_escalated",
            ["tenant_id", "last_message_at", "id"],
            unique=False,
            postgresql_where=sa.text(_ESCALATED),
            sqlite_where=sa.text(_ESCALATED),
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("conversations_escalated")
    _conversations_index([])
    _events_index(["received_at"])
    _messages_index([])
