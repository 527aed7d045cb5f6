"""What an event says about conversations and messages (messaging/facts.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from estafeta.messaging.facts import (
    CONVERSATION_ID_MAX,
    MESSAGE_REF_MAX,
    SEND_TYPE,
    facts_of,
    fitted,
    storable,
)


@given(st.text(min_size=1, max_size=400), st.sampled_from([CONVERSATION_ID_MAX, MESSAGE_REF_MAX]))
def test_a_value_fits_its_column_and_stays_the_same_key(value: str, limit: int) -> None:
    key = fitted(value, limit)
    assert len(key) <= limit
    assert key == fitted(value, limit)  # a redelivery finds the same conversation
    assert (key == storable(value)) == (len(value) <= limit)


def test_oversized_values_that_differ_get_different_keys() -> None:
    a, b = "x" * 100, "x" * 99 + "y"
    assert fitted(a, CONVERSATION_ID_MAX) != fitted(b, CONVERSATION_ID_MAX)


def test_an_inbound_message_with_oversized_ids_has_facts_that_fit() -> None:
    facts = facts_of(
        "message.received",
        {"conversation_id": "9" * 500, "message_id": "w" * 500, "contact_name": "n" * 500},
    )
    assert facts.conversation_id == fitted("9" * 500, CONVERSATION_ID_MAX)
    assert facts.message_ref is not None and len(facts.message_ref) <= MESSAGE_REF_MAX
    assert facts.contact_name == "n" * 500  # a text column: kept whole


def test_a_send_is_counted_in_the_conversation_of_its_number() -> None:
    assert facts_of(SEND_TYPE, {"to": "+55 11 98765-4321"}).conversation_id == "5511987654321"
    assert facts_of(SEND_TYPE, {"to": "not a number"}).conversation_id is None


def test_a_nul_is_stored_as_the_replacement_character_everywhere_it_keys() -> None:
    facts = facts_of(
        "message.received",
        {"conversation_id": "55\x0011", "message_id": "w\x00", "contact_name": "Ma\x00ria"},
    )
    assert (facts.conversation_id, facts.message_ref, facts.contact_name) == (
        "55\ufffd11",
        "w\ufffd",
        "Ma\ufffdria",
    )
    assert storable("plain") == "plain"


def test_a_reaction_or_an_edit_is_no_new_inbound_message() -> None:
    message = {"conversation_id": "5511987654321", "message_id": "w1", "kind": "text"}
    assert facts_of("message.received", message).direction == "inbound"
    for data in ({**message, "kind": "reaction"}, {**message, "edited": True}):
        facts = facts_of("message.received", data)
        assert (facts.direction, facts.conversation_id) == (None, "5511987654321")
