"""The route filter language: parsing, evaluation, error messages and robustness properties."""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from estafeta.errors import FilterSyntaxError
from estafeta.routing.filter import (
    MAX_DEPTH,
    MAX_LENGTH,
    And,
    Compare,
    Const,
    Filter,
    Not,
    Or,
    Path,
    Truthy,
    lookup,
    parse,
)

EVENT: dict[str, Any] = {
    "id": "evt_1",
    "type": "message.received",
    "tenant": "clinica-sol",
    "source": "whatsapp",
    "occurred_at": "2024-05-01T10:00:00Z",
    "received_at": "2024-05-01T10:00:01Z",
    "data": {
        "kind": "text",
        "text": "Hola, quiero reservar",
        "intent": "booking",
        "count": 3,
        "score": 0.75,
        "temp": -3,
        "urgent": True,
        "archived": False,
        "zero": 0,
        "empty": "",
        "note": None,
        "none_list": [],
        "tags": ["vip", "new"],
        "flags": [True],
        "contact": {"name": "Ana", "phone": "+34 600 000 000"},
        "items": [{"sku": "A1"}, {"sku": "B2"}],
        "by_index": {"0": "zero"},
        "in": "keyword as key",
        "región": "sur",
        "pattern": "Hola*",
        "quote": 'it\'s "x"',
        "path": "C:\\tmp",
    },
}

MATCHES: list[tuple[str, bool]] = [
    # == and !=, strict about types
    ("data.kind == 'text'", True),
    ('data.kind == "text"', True),
    ("data.kind == 'Text'", False),
    ("data.kind != 'text'", False),
    ("data.kind != 'image'", True),
    ("data.count == 3", True),
    ("data.count == 3.0", True),
    ("data.count == '3'", False),
    ("data.score == 0.75", True),
    ("data.temp == -3", True),
    ("data.temp == -3.0", True),
    ("data.urgent == true", True),
    ("data.urgent == 1", False),
    ("true == 1", False),
    ("data.count == true", False),
    ("data.archived == false", True),
    ("data.archived == 0", False),
    ("data.zero == false", False),
    ("data.note == null", True),
    ("data.missing == null", True),
    ("data.missing != null", False),
    ("data.note != null", False),
    ("data.zero == null", False),
    ("data.tags == ['vip', 'new']", True),
    ("data.tags == ['new', 'vip']", False),
    ("data.flags == [true]", True),
    ("data.flags == [1]", False),
    ("data.contact == data.contact", True),
    ("data.items.0 == data.items.1", False),
    ("data.count == data.kind", False),
    # ordering: numbers with numbers, strings with strings, anything else is false
    ("data.count > 2", True),
    ("data.count >= 3", True),
    ("data.count < 3", False),
    ("data.count <= 3", True),
    ("data.score < 1", True),
    ("data.temp < -2.5", True),
    ("data.text > 'A'", True),
    ("occurred_at >= '2024-05-01'", True),
    ("occurred_at < '2024-05-01'", False),
    ("data.count < 'z'", False),
    ("data.count > 'a'", False),
    ("data.note < 1", False),
    ("data.note >= 0", False),
    ("data.missing > 0", False),
    ("data.urgent > 0", False),
    ("data.urgent >= true", False),
    ("data.tags > 1", False),
    ("data.contact < 'a'", False),
    # in / not in: list element, substring, mapping key
    ("data.kind in ['text', 'image']", True),
    ("data.kind in ['image']", False),
    ("data.kind in []", False),
    ("data.kind not in ['image']", True),
    ("data.kind not in ['text']", False),
    ("data.count in [1, 2, 3]", True),
    ("data.count in ['3']", False),
    ("data.urgent in [1]", False),
    ("data.urgent in [true]", True),
    ("data.note in [null]", True),
    ("data.missing in [null, 'x']", True),
    ("'vip' in data.tags", True),
    ("'gold' in data.tags", False),
    ("'gold' not in data.tags", True),
    ("'Hola' in data.text", True),
    ("'hola' in data.text", False),
    ("1 in data.text", False),
    ("'name' in data.contact", True),
    ("'email' in data.contact", False),
    ("'x' in data.count", False),
    ("'x' in data.missing", False),
    ("'x' not in data.missing", True),
    # contains: `in` the other way round
    ("data.tags contains 'vip'", True),
    ("data.tags contains 'gold'", False),
    ("data.text contains 'reservar'", True),
    ("data.text contains 'RESERVAR'", False),
    ("data.contact contains 'name'", True),
    ("data.items contains data.items.0", True),
    ("data.count contains 3", False),
    ("data.missing contains 'a'", False),
    # startswith / endswith: strings only
    ("type startswith 'message.'", True),
    ("type startswith 'contact.'", False),
    ("type endswith '.received'", True),
    ("type endswith '.sent'", False),
    ("data.count startswith '3'", False),
    ("data.tags startswith 'vip'", False),
    ("data.missing endswith ''", False),
    # matches: whole-string glob, case-sensitive, regex syntax is literal
    ("type matches 'message.*'", True),
    ("type matches 'message.re?eived'", True),
    ("type matches 'contact.*'", False),
    ("type matches 'MESSAGE.*'", False),
    ("type matches 'message'", False),
    ("source matches 'whats[aeiou]pp'", True),
    ("source matches 'whats[!a]pp'", False),
    ("data.text matches '*reservar'", True),
    ("data.kind matches 't?xt'", True),
    ("data.kind matches 't.xt'", False),
    ("data.kind matches '(t+)+$'", False),
    ("data.contact.phone matches '+34 *'", True),
    ("data.text matches data.pattern", True),
    ("data.kind matches data.missing", False),
    ("data.count matches '*'", False),
    # a lone value is truth-tested
    ("data.urgent", True),
    ("data.archived", False),
    ("data.missing", False),
    ("data.note", False),
    ("data.zero", False),
    ("data.empty", False),
    ("data.none_list", False),
    ("data.tags", True),
    ("data.contact", True),
    ("data.count", True),
    ("true", True),
    ("false", False),
    ("null", False),
    ("0", False),
    ("'x'", True),
    ("['a']", True),
    ("[]", False),
    # boolean operators and precedence: not > and > or
    ("not data.urgent", False),
    ("not data.missing", True),
    ("not not true", True),
    ("true or false and false", True),
    ("(true or false) and false", False),
    ("not true and false", False),
    ("not (true and false)", True),
    ("not false and true", True),
    ("not true or true", True),
    ("false or false or true", True),
    ("true and true and false", False),
    ("not data.kind == 'image'", True),
    ("not 'gold' in data.tags", True),
    ("data.kind == 'text' and data.count > 2", True),
    ("data.kind == 'image' or data.urgent", True),
    ("data.kind == 'image' or data.archived", False),
    ("(data.kind == 'text' or data.kind == 'image') and not data.archived", True),
    # paths
    ("id == 'evt_1'", True),
    ("tenant == 'clinica-sol'", True),
    ("source == 'whatsapp'", True),
    ("data.intent == 'booking'", True),
    ("data.contact.name == 'Ana'", True),
    ("data.items.0.sku == 'A1'", True),
    ("data.items.1.sku == 'B2'", True),
    ("data.items.2.sku == null", True),
    ("data.items.x == null", True),
    ("data.tags.0 == 'vip'", True),
    ("data.by_index.0 == 'zero'", True),
    ("data.kind.length == null", True),
    ("data.count.x == null", True),
    ("data.in == 'keyword as key'", True),
    ("data.región == 'sur'", True),
    ("missing.deeper.still == null", True),
    # literals, escapes and free whitespace
    (r"""data.quote == 'it\'s "x"'""", True),
    (r'''data.quote == "it's \"x\""''', True),
    (r"data.path == 'C:\\tmp'", True),
    ("data.kind=='text'", True),
    ("\tdata.kind\n==\n'text'  ", True),
    ("(data.urgent)and(data.count>2)", True),
    ("not(data.archived)", True),
    ("data.kind in['text']", True),
]


@pytest.mark.parametrize(("expression", "expected"), MATCHES)
def test_matches(expression: str, expected: bool) -> None:
    assert parse(expression).matches(EVENT) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("type", "message.received"),
        ("data.contact.name", "Ana"),
        ("data.items.1.sku", "B2"),
        ("data.tags.0", "vip"),
        ("data.items.9", None),
        ("data.items.-1", None),
        ("data.missing.deeper", None),
        ("data.kind.0", None),
        ("data.by_index.0", "zero"),
        ("data.note", None),
        ("data.", None),
        ("", None),
        ("data.tags." + "0" * 5000, None),
    ],
)
def test_lookup(path: str, expected: Any) -> None:
    assert lookup(EVENT, path) == expected


def test_lookup_returns_containers_as_they_are() -> None:
    assert lookup(EVENT, "data.contact") is EVENT["data"]["contact"]


ERRORS: list[tuple[str, str, int]] = [
    ("", "empty expression", 0),
    ("   ", "empty expression", 0),
    ("data.kind = 'text'", "unknown operator '=' (did you mean '=='?)", 10),
    ("data.región = 'x'", "unknown operator '=' (did you mean '=='?)", 12),
    ("a === 1", "unknown operator '=' (did you mean '=='?)", 4),
    ("a && b", "unknown operator '&&' (did you mean 'and'?)", 2),
    ("a & b", "unknown operator '&' (did you mean 'and'?)", 2),
    ("a || b", "unknown operator '||' (did you mean 'or'?)", 2),
    ("!a", "unknown operator '!' (did you mean 'not'?)", 0),
    ("a => 1", "unknown operator '=>' (did you mean '>='?)", 2),
    ("a =< 1", "unknown operator '=<' (did you mean '<='?)", 2),
    ("a <> 1", "unknown operator '<>' (did you mean '!='?)", 2),
    ("a ~ 1", "unexpected character '~'", 2),
    ("a == 1;", "unexpected character ';'", 6),
    (".kind", "unexpected character '.'", 0),
    ("a == - 1", "unexpected character '-'", 5),
    ("data.kind == 1)", "unexpected ')'", 14),
    ("data.kind == 'text')", "unexpected ')'", 19),
    ("(a))", "unexpected ')'", 3),
    ("a b", "unexpected 'b' (missing 'and' or 'or'?)", 2),
    ("a == 1 b == 2", "unexpected 'b' (missing 'and' or 'or'?)", 7),
    ("a == 1 [2]", "unexpected '[' (missing 'and' or 'or'?)", 7),
    ("data.text == 'abc", "unterminated string", 13),
    ("a ==\n'x", "unterminated string", 5),
    ("a == 'x\\", "unterminated string", 5),
    ("a == 'x\\'", "unterminated string", 5),
    ("a == 'x\\n'", "invalid escape '\\n' in string (only \\\\, \\' and \\\" are allowed)", 7),
    ("data.kind ==", "expected a value after '=='", 12),
    ("data.kind == )", "expected a value after '==', found ')'", 13),
    ("a == (1)", "expected a value after '==', found '('", 5),
    ("a in", "expected a value after 'in'", 4),
    ("a not in", "expected a value after 'not'", 8),
    ("a contains", "expected a value after 'contains'", 10),
    ("a matches and b", "expected a value after 'matches', found 'and'", 10),
    (
        "(data.kind == 'text'",
        "expected ')' to close '(' at character 0, found end of expression",
        20,
    ),
    ("((a) or b", "expected ')' to close '(' at character 0, found end of expression", 9),
    ("(a b)", "expected ')' to close '(' at character 0, found 'b'", 3),
    ("a and", "expected an expression after 'and'", 5),
    ("a or or b", "expected an expression after 'or', found 'or'", 5),
    ("and a", "expected an expression, found 'and'", 0),
    (")", "expected an expression, found ')'", 0),
    ("()", "expected an expression after '(', found ')'", 1),
    ("not", "expected an expression after 'not'", 3),
    ("a == b == c", "comparisons cannot be chained, combine them with 'and' (found '==')", 7),
    ("1 < a < 3", "comparisons cannot be chained, combine them with 'and' (found '<')", 6),
    ("a in b not in c", "comparisons cannot be chained, combine them with 'and' (found 'not')", 7),
    ("a not b", "expected 'in' after 'not', found 'b'", 6),
    ("a not", "expected 'in' after 'not', found end of expression", 5),
    ("a AND b", "unknown name 'AND' (keywords are lowercase: did you mean 'and'?)", 2),
    ("a == True", "unknown name 'True' (keywords are lowercase: did you mean 'true'?)", 5),
    ("NOT a", "unknown name 'NOT' (keywords are lowercase: did you mean 'not'?)", 0),
    ("a == NULL", "unknown name 'NULL' (keywords are lowercase: did you mean 'null'?)", 5),
    # Was a path named `None`: check-config then said "did you mean 'data.None'?".
    ("a != None", "unknown name 'None' (did you mean 'null'?)", 5),
    ("data. kind", "expected a name after '.'", 5),
    ("data..kind", "expected a name after '.'", 5),
    ("data.kind.", "expected a name after '.'", 10),
    ("a == 1.", "invalid number '1.'", 5),
    ("a == 1.2.3", "invalid number '1.2.3'", 5),
    ("a == 12abc", "invalid number '12abc'", 5),
    ("a == .5", "unexpected character '.'", 5),
    ("a in [1, 2", "expected ',' or ']' in the list, found end of expression", 10),
    ("a in [1 2]", "expected ',' or ']' in the list, found '2'", 8),
    ("a in [1,]", "expected a literal in the list, found ']'", 8),
    ("a in [b]", "expected a literal in the list, found 'b'", 6),
    ("a in [[1]]", "expected a literal in the list, found '['", 6),
    ("a in [", "expected a literal in the list, found end of expression", 6),
]


@pytest.mark.parametrize(("expression", "reason", "position"), ERRORS)
def test_syntax_errors(expression: str, reason: str, position: int) -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse(expression)
    assert (caught.value.reason, caught.value.position) == (reason, position)
    assert str(caught.value) == f"{reason} (at character {position})"


def test_long_tokens_are_shortened_in_messages() -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse("a " + "b" * 100)
    assert caught.value.reason == f"unexpected {'b' * 20 + '...'!r} (missing 'and' or 'or'?)"


def test_length_limit() -> None:
    assert parse("a" * MAX_LENGTH).matches({}) is False
    with pytest.raises(FilterSyntaxError) as caught:
        parse("a" * (MAX_LENGTH + 1))
    assert caught.value.reason == "expression is too long (2001 characters, at most 2000)"
    assert caught.value.position == MAX_LENGTH


@pytest.mark.parametrize(
    ("opening", "closing"),
    [("(", ")"), ("not ", ""), ("not (", ")")],
)
def test_depth_limit(opening: str, closing: str) -> None:
    levels = MAX_DEPTH // len(opening.split())
    assert parse(opening * levels + "true" + closing * levels).matches({}) is True  # even `not`s
    with pytest.raises(FilterSyntaxError) as caught:
        parse(opening * (levels + 1) + "true" + closing * (levels + 1))
    assert caught.value.reason == f"expression is nested too deeply (at most {MAX_DEPTH} levels)"
    assert caught.value.position == len(opening) * levels


def test_the_depth_limit_counts_the_levels_open_at_once() -> None:
    nested = "(" * MAX_DEPTH + "true" + ")" * MAX_DEPTH
    assert parse(" and ".join([nested] * 3)).matches({}) is True  # siblings do not add up
    with pytest.raises(FilterSyntaxError) as caught:
        parse("(true) and not true or (" + nested + ")")  # closed levels give none back
    assert caught.value.reason == f"expression is nested too deeply (at most {MAX_DEPTH} levels)"


@pytest.mark.parametrize(
    "expression", ["(" * 900 + "a" + ")" * 900, "not " * 450 + "a", "[" * 1999]
)
def test_deep_nesting_is_a_syntax_error_not_a_crash(expression: str) -> None:
    with pytest.raises(FilterSyntaxError):
        parse(expression)


def test_long_flat_chains_parse_and_evaluate() -> None:
    chain = " and ".join(["data.urgent"] * 120)
    assert len(chain) <= MAX_LENGTH
    assert parse(chain).matches(EVENT) is True
    assert parse(" or ".join(["data.archived"] * 100)).matches(EVENT) is False


@pytest.mark.parametrize(
    ("expression", "ast"),
    [
        ("a", Truthy(Path(("a",)))),
        (
            "a or b and c",
            Or((Truthy(Path(("a",))), And((Truthy(Path(("b",))), Truthy(Path(("c",))))))),
        ),
        ("not a == 1", Not(Compare("==", Path(("a",)), Const(1)))),
        ("a and b and c", And(tuple(Truthy(Path((name,))) for name in "abc"))),
        (
            "(a or b) or c",
            Or((Or((Truthy(Path(("a",))), Truthy(Path(("b",))))), Truthy(Path(("c",))))),
        ),
        (
            "data.x not in [1, 'x', true, null, -2.5]",
            Compare("not in", Path(("data", "x")), Const((1, "x", True, None, -2.5))),
        ),
        ("'a' in data.tags", Compare("in", Const("a"), Path(("data", "tags")))),
        ("a.0.b == 007", Compare("==", Path(("a", "0", "b")), Const(7))),
        ("a == 1.50", Compare("==", Path(("a",)), Const(1.5))),
        ("a == -0", Compare("==", Path(("a",)), Const(0))),
        (r"a == '\\\''", Compare("==", Path(("a",)), Const("\\'"))),
        (r'a == "\"\'"', Compare("==", Path(("a",)), Const("\"'"))),
    ],
)
def test_ast(expression: str, ast: object) -> None:
    assert parse(expression).ast == ast


def test_literal_types() -> None:
    values = {
        "1": int,
        "-1": int,
        "1.0": float,
        "'1'": str,
        "true": bool,
        "null": type(None),
        "[]": tuple,
    }
    for source, kind in values.items():
        node = parse(f"a == {source}").ast
        assert isinstance(node, Compare) and isinstance(node.right, Const)
        assert type(node.right.value) is kind, source


def test_filter_object() -> None:
    expression = "data.kind == 'text'"
    parsed = parse(expression)
    assert isinstance(parsed, Filter)
    assert parsed.source == expression and str(parsed) == expression
    assert parsed == parse(expression) and hash(parsed) == hash(parse(expression))
    assert parsed != parse("data.kind == 'image'")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.source = "x"  # type: ignore[misc]


def test_matches_accepts_any_mapping_and_partial_events() -> None:
    parsed = parse("data.kind == 'text' or type == 'x'")
    assert parsed.matches(MappingProxyType({"data": MappingProxyType({"kind": "text"})}))
    assert parsed.matches({}) is False
    assert parsed.matches({"data": "not a mapping"}) is False
    assert parsed.matches({"data": None, "type": "x"}) is True


def test_equality_of_absurdly_deep_values_is_false_not_an_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    assert parse("data.a == data.b").matches({"data": {"a": deep, "b": deep}}) is False


def test_a_glob_from_the_event_longer_than_a_filter_matches_nothing_at_once() -> None:
    """`matches` with the pattern taken from the event: `fnmatch` translates unclosed `[`s
    in quadratic time, so one 40 KB `data.pattern` of `[a[a…` held ingest (every request of
    the process) for about 20 s, and a 100 KB one for minutes; each distinct pattern also
    stayed compiled in fnmatch's 32,768-entry cache. Such a pattern is as long as a filter
    may be, at most."""
    parsed = parse("data.text matches data.pattern")
    fits = "*" + "a" * (MAX_LENGTH - 1)
    assert parsed.matches({"data": {"text": "a" * 5000, "pattern": fits}}) is True
    too_long = fits + "a"
    assert parsed.matches({"data": {"text": "a" * 5000, "pattern": too_long}}) is False
    # Each of these took ~20 s before the limit.
    assert parse("'[a' matches data.pattern").matches({"data": {"pattern": "[a" * 20_000}}) is False
    assert parsed.matches({"data": {"text": "[a", "pattern": "[a" * 20_000}}) is False


def test_a_glob_from_the_event_costs_little_however_it_is_made() -> None:
    """Within the 2000 characters, `fnmatch` still took ~0.4 s to translate a pattern of
    unclosed `[`s, and matching takes steps in proportion to the text's length times the
    pattern's: a 2000-character pattern against a 500 KB text took ~2.5 s (a 1 MiB one, 5 s).
    Either held every request of the process, once per event. Fourteen such events took ~5 s
    in all; now ~0.2 s (a few milliseconds to compile each pattern), bounded at 1 s."""
    parsed = parse("data.text matches data.pattern")
    events = [
        *(
            {"text": "a", "pattern": opening * (MAX_LENGTH // len(opening))}
            for opening in ("[", "[!")
        ),
        *({"text": "[" * 10, "pattern": "[" * (MAX_LENGTH - n)} for n in range(1, 9)),
        *({"text": "a" * 500_000, "pattern": "*" + "a" * (MAX_LENGTH - n) + "b"} for n in (2, 3)),
        {"text": "a" * 500_000, "pattern": "*" + "?" * (MAX_LENGTH - 2) + "b"},
        {"text": "a" * 1_000_000, "pattern": "*" + "a" * 200 + "b"},
    ]
    # CPU time, not wall time: other work on the machine does not count against the bound.
    start = time.process_time()
    results = [parsed.matches({"data": data}) for data in events]
    assert time.process_time() - start < 1.0
    assert results == [False] * len(events)


def test_a_glob_from_the_event_matches_as_fnmatch_would() -> None:
    # Unclosed `[`s are literal whatever their number; one that closes is a class.
    parsed = parse("data.text matches data.pattern")
    cases = [
        ("[[[", "[" * 3, True),
        ("a[b", "a[b", True),
        ("[x", "[x", True),
        ("[!]", "[!]", True),
        ("[]", "[]", True),
        ("x[ab]y[", "xay[", True),
        ("x[ab]y[", "xcy[", False),
        ("[ab][", "a[", True),
        # `[!]` does not close (a `]` first in a class, after `!`, is one of its characters):
        # so nor does the `[` after it, and the whole pattern is literal
        ("[!]x[", "[!]x[", True),
        ("[]x[", "[]x[", True),
        ("[[]x[", "[x[", True),  # a class of `[`, then literals
        # a long text with short pieces between `*`s: matched, as fnmatch does
        ("*invoice*", "x" * 1_000_000 + "invoice", True),
    ]
    for pattern, text, expected in cases:
        assert fnmatch.fnmatchcase(text, pattern) is expected, pattern
        assert parsed.matches({"data": {"text": text, "pattern": pattern}}) is expected, pattern


def test_a_glob_from_the_event_is_matched_up_to_max_glob_steps_not_past() -> None:
    """Documented: a pattern from the event matches nothing when the text's length times its
    longest piece after a `*` *exceeds* 10,000,000; at the limit itself it matches."""
    limit = 10_000_000  # docs/configuration.md, "The filter language"
    parsed = parse("data.text matches data.pattern")
    # pattern: (a text it matches ending, its longest piece after a `*`; a class is one)
    pieces = {"*b": ("b", 1), "*ab": ("ab", 2), "*[xb]": ("b", 1), "*a*[xy]b": ("yb", 2)}
    for pattern, (end, piece) in pieces.items():
        at_limit = "a" * (limit // piece - len(end)) + end
        assert len(at_limit) * piece == limit
        assert parsed.matches({"data": {"text": at_limit, "pattern": pattern}}) is True
        past = "a" + at_limit
        assert parsed.matches({"data": {"text": past, "pattern": pattern}}) is False, pattern
    # The piece before the first `*` is tried at the start only: it does not count.
    long_text = "invoice" + "x" * (limit // 4)
    assert parsed.matches({"data": {"text": long_text, "pattern": "invoice*"}}) is True


# --------------------------------------------------------------------------- properties

KEYS = ["kind", "a", "b", "0", "1", "tags", "in", "contact", "name"]
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars | st.sampled_from(["text", "a", "message.received"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=25,
)
contexts: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"type": st.sampled_from(["message.received", "a"]) | st.text(max_size=8), "data": json_values},
    optional={"id": json_values, "source": json_values, "tenant": json_values},
) | st.dictionaries(st.text(max_size=6), json_values, max_size=5)


def quote(text: str, mark: str = "'") -> str:
    return mark + text.replace("\\", "\\\\").replace(mark, "\\" + mark) + mark


def render(value: Any) -> str:
    """The literal source text of a Python value."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(map(render, value)) + "]"
    return repr(value)


spaces = st.sampled_from([" ", "  ", "\t", "\n"])
paths = st.builds(
    lambda root, rest: ".".join([root, *rest]),
    st.sampled_from(["data", "type", "id", "source", "tenant", "x"]),
    st.lists(st.sampled_from([*KEYS, "not", "matches", "null"]), max_size=3),
)
scalars: st.SearchStrategy[Any] = (
    st.text(max_size=10)
    | st.integers(-(10**12), 10**12)
    | st.integers(-(10**6), 10**6).map(lambda cents: cents / 100)  # no exponent in repr
    | st.sampled_from([True, False, None])
)
literal_values: st.SearchStrategy[Any] = scalars | st.lists(scalars, max_size=3).map(tuple)
literals = literal_values.map(render) | st.builds(quote, st.text(max_size=10), st.just('"'))
OPERATORS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
OPERATORS += ["contains", "startswith", "endswith", "matches"]
values = paths | literals
comparisons = values | st.builds(
    lambda left, a, op, b, right: f"{left}{a}{op}{b}{right}",
    values,
    spaces,
    st.sampled_from(OPERATORS),
    spaces,
    values,
)


@st.composite
def expressions(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(comparisons)
    shape = draw(st.sampled_from(["and", "or", "not", "()"]))
    if shape == "not":
        return "not" + draw(spaces) + draw(expressions(depth - 1))
    if shape == "()":
        return "(" + draw(expressions(depth - 1)) + ")"
    parts = draw(st.lists(expressions(depth - 1), min_size=2, max_size=3))
    return f"{draw(spaces)}{shape}{draw(spaces)}".join(parts)


TOKENS = ["(", ")", "[", "]", ",", "and", "or", "not", "in", "contains", "matches", "==", "!="]
TOKENS += ["<", ">=", "=", "&&", "!", "'", '"', "\\", "-", ".", "data.kind", "a.0", "1", "1.5"]
TOKENS += ["-2", "'x'", '"y"', "true", "null", "AND", "True", " ", "\t", "é", "ß", "\x00"]
soups = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join) | st.lists(
    st.sampled_from(TOKENS), max_size=60
).map(" ".join)

bounded = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@bounded
@given(st.text(max_size=300) | soups)
def test_parse_any_text_returns_a_filter_or_raises_filter_syntax_error(text: str) -> None:
    try:
        parsed = parse(text)
    except FilterSyntaxError as error:
        assert error.reason
        assert 0 <= error.position <= len(text)
        assert str(error) == f"{error.reason} (at character {error.position})"
    else:
        assert isinstance(parsed, Filter) and parsed.source == text
        assert isinstance(parsed.matches(EVENT), bool)


@bounded
@given(expressions())
def test_well_formed_expressions_always_parse(expression: str) -> None:
    assume(len(expression) <= MAX_LENGTH)
    assert parse(expression).source == expression


@bounded
@given(expressions(), contexts)
def test_matches_returns_a_bool_and_never_raises(expression: str, context: dict[str, Any]) -> None:
    assume(len(expression) <= MAX_LENGTH)
    assert isinstance(parse(expression).matches(context), bool)
    assert isinstance(parse(expression).matches(EVENT), bool)


@bounded
@given(expressions(depth=2), expressions(depth=2), contexts)
def test_boolean_operators_agree_with_python(first: str, second: str, context: Any) -> None:
    assume(len(first) + len(second) <= MAX_LENGTH - 20)
    a, b = parse(first).matches(context), parse(second).matches(context)
    assert parse(f"not ({first})").matches(context) is (not a)
    assert parse(f"({first}) and ({second})").matches(context) is (a and b)
    assert parse(f"({first}) or ({second})").matches(context) is (a or b)


@bounded
@given(json_values, st.sampled_from(OPERATORS), literal_values)
def test_literal_fast_paths_agree_with_the_general_operators(
    value: Any, op: str, literal: Any
) -> None:
    # `x OP <literal>` takes a specialised path; `x OP data.w` the general one.
    as_json = list(literal) if isinstance(literal, tuple) else literal
    context = {"data": {"v": value, "w": as_json}}
    fast = parse(f"data.v {op} {render(literal)}").matches(context)
    assert fast is parse(f"data.v {op} data.w").matches(context)


@bounded
@given(st.text(max_size=40), st.sampled_from(["'", '"']))
def test_string_literals_round_trip(text: str, mark: str) -> None:
    assert parse(f"x == {quote(text, mark)}").ast == Compare("==", Path(("x",)), Const(text))
    assert parse(f"data.v == {quote(text, mark)}").matches({"data": {"v": text}})


@bounded
@given(st.integers(-(10**40), 10**40))
def test_integer_literals_round_trip(number: int) -> None:
    assert parse(f"x == {number}").ast == Compare("==", Path(("x",)), Const(number))


@bounded
@given(contexts, st.text(max_size=30) | paths)
def test_lookup_never_raises(context: dict[str, Any], path: str) -> None:
    lookup(context, path)


GLOB_CHARACTERS = "[]!-^\\*?ab"


@bounded
@given(st.text(GLOB_CHARACTERS, max_size=12), st.text(GLOB_CHARACTERS.replace("*", ""), max_size=8))
def test_globs_match_as_fnmatch_does(pattern: str, text: str) -> None:
    """`matches` translates globs itself, in linear time: it must agree with fnmatch."""
    expected = fnmatch.fnmatchcase(text, pattern)
    context = {"data": {"text": text, "pattern": pattern}}
    assert parse("data.text matches data.pattern").matches(context) is expected
    assert parse(f"data.text matches {quote(pattern)}").matches(context) is expected
