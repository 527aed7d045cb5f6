"""Route filters: a small, safe expression language evaluated against each event.

A filter is parsed once, at configuration load, by a hand-written tokenizer and a
recursive-descent parser into an AST of frozen dataclasses, and the AST is compiled into
nested closures; `Filter.matches` (the ingest hot path) only calls them. Nothing is `eval`-ed.

    >>> parse("data.kind == 'text' and not data.urgent").matches({"data": {"kind": "text"}})
    True

Grammar (keywords are lowercase and case-sensitive; whitespace between tokens is free)::

    expression := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expression ")" | comparison
    comparison := value [operator value]           -- a lone value is tested for truthiness
    operator   := "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in"
                | "contains" | "startswith" | "endswith" | "matches"
    value      := path | literal | "[" [literal ("," literal)*] "]"
    path       := name ("." (name | digits))*       -- type, data.contact.name, data.items.0
    literal    := string | number | "true" | "false" | "null"
    string     := '...' | "..."                     -- escapes: \\ \' \"
    number     := ["-"] digits ["." digits]

Precedence, loosest first: `or`, `and`, `not`, comparison; comparisons do not chain.

Evaluation never raises on JSON-like data:

* A path walks mappings by key and lists by index; a missing key, an index out of range or
  a scalar on the way gives null (None).
* `==` / `!=` compare JSON values; booleans are not numbers (`true == 1` is false).
* `<` `<=` `>` `>=` compare two numbers or two strings; any other pairing is false.
* `a in b`: `a` is an element of list `b`, a substring of string `b` or a key of mapping `b`;
  otherwise false. `not in` is its negation; `b contains a` means `a in b`.
* `startswith` / `endswith` need two strings. `matches` is a shell glob (`*`, `?`, `[abc]`,
  `fnmatch.fnmatchcase`), never a regular expression, so a pattern cannot cause ReDoS. A
  pattern taken from the event (`data.text matches data.pattern`) matches nothing when it
  is longer than `MAX_LENGTH`, or when matching it could take over `MAX_GLOB_STEPS`.
* A lone value is true when Python's `bool` says so (non-empty, non-zero, true).

Limits: `MAX_LENGTH` characters and `MAX_DEPTH` levels of `(` / `not`. Every malformed
input raises `FilterSyntaxError(reason, position)`, position being a 0-based character index.
"""

from __future__ import annotations

import fnmatch
import functools
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from estafeta.errors import FilterSyntaxError

MAX_LENGTH = 2000
MAX_DEPTH = 32

Scalar: TypeAlias = str | int | float | bool | None
_Getter: TypeAlias = Callable[[Mapping[str, Any]], Any]
_Predicate: TypeAlias = Callable[[Mapping[str, Any]], bool]
_Test: TypeAlias = Callable[[Any, Any], bool]
_Check: TypeAlias = Callable[[Any], bool]
_Steps: TypeAlias = tuple[tuple[str, int | None], ...]

# --------------------------------------------------------------------------- AST


@dataclass(frozen=True, slots=True)
class Path:
    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Const:
    value: Scalar | tuple[Scalar, ...]  # a list literal is a tuple: immutable, like the AST


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # one of the `operator`s of the grammar, `not in` as one string
    left: Value
    right: Value


@dataclass(frozen=True, slots=True)
class Truthy:
    value: Value


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


Value: TypeAlias = Path | Const
Node: TypeAlias = Compare | Truthy | Not | And | Or

# --------------------------------------------------------------------------- tokenizer

_CONSTANTS: dict[str, Scalar] = {"true": True, "false": False, "null": None}
_WORD_OPERATORS = frozenset({"not", "in", "contains", "startswith", "endswith", "matches"})
_OPERATORS = _WORD_OPERATORS | {"==", "!=", "<", "<=", ">", ">="}
_KEYWORDS = _WORD_OPERATORS | {"and", "or", *_CONSTANTS}
_SYMBOLS = frozenset({"==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ","})
# What people type from other languages, and what they meant here.
_MISTAKES = {"=>": ">=", "=<": "<=", "<>": "!=", "&&": "and", "||": "or", "=": "=="}
_MISTAKES |= {"&": "and", "|": "or", "!": "not"}
# Python's null: as a path it would name no event field and always be null.
_WORD_MISTAKES = {"None": "null"}
_NUMBER = re.compile(r"(?P<number>-?[0-9]+(?:\.[0-9]+)?)(?P<junk>[\w.]*)")
_PATH = re.compile(r"[^\W\d]\w*(?:\.\w+)*")
_ESCAPES = frozenset("\\'\"")


class _Token(NamedTuple):
    kind: str  # "path", "const", "op" (keyword or symbol) or "end"
    value: Any  # path parts, literal value, or the operator's text
    pos: int
    text: str


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "'\"":
            value, end = _read_string(text, i)
            token = _Token("const", value, i, text[i:end])
        elif number := _NUMBER.match(text, i):
            if number.group("junk"):  # `1.`, `1.2.3`, `12abc`: one bad number, not two tokens
                raise FilterSyntaxError(f"invalid number {number.group()!r}", i)
            word = number.group()
            token = _Token("const", float(word) if "." in word else int(word), i, word)
        elif path := _PATH.match(text, i):
            if text.startswith(".", path.end()):
                raise FilterSyntaxError("expected a name after '.'", path.end() + 1)
            token = _word(path.group(), i)
        else:
            token = _symbol(text, i)
        tokens.append(token)
        i += len(token.text)
    tokens.append(_Token("end", None, len(text), ""))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == text[start]:
            return "".join(chars), i + 1
        if char == "\\":
            char = text[i + 1 : i + 2]
            if not char:  # a backslash as the last character: the string never closes
                break
            if char not in _ESCAPES:
                escape = "\\" + char
                reason = (
                    f"invalid escape '{escape}' in string (only \\\\, \\' and \\\" are allowed)"
                )
                raise FilterSyntaxError(reason, i)
            i += 1
        chars.append(char)
        i += 1
    raise FilterSyntaxError("unterminated string", start)


def _word(word: str, pos: int) -> _Token:
    if word in _CONSTANTS:
        return _Token("const", _CONSTANTS[word], pos, word)
    if word in _KEYWORDS:
        return _Token("op", word, pos, word)
    if word in _WORD_MISTAKES:
        reason = f"unknown name {word!r} (did you mean {_WORD_MISTAKES[word]!r}?)"
        raise FilterSyntaxError(reason, pos)
    if word.lower() in _KEYWORDS:  # `AND`, `True` would otherwise be a path, silently null
        reason = f"unknown name {word!r} (keywords are lowercase: did you mean {word.lower()!r}?)"
        raise FilterSyntaxError(reason, pos)
    return _Token("path", tuple(word.split(".")), pos, word)


def _symbol(text: str, pos: int) -> _Token:
    for candidate in (text[pos : pos + 2], text[pos]):  # longest first: `<=` before `<`
        if candidate in _SYMBOLS:
            return _Token("op", candidate, pos, candidate)
        if candidate in _MISTAKES:
            meant = _MISTAKES[candidate]
            raise FilterSyntaxError(
                f"unknown operator {candidate!r} (did you mean {meant!r}?)", pos
            )
    raise FilterSyntaxError(f"unexpected character {text[pos]!r}", pos)


# --------------------------------------------------------------------------- parser


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "end of expression"
    return repr(token.text if len(token.text) <= 24 else token.text[:20] + "...")


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)  # stays on `end`
        return token

    def at(self, *ops: str) -> bool:
        token = self.tokens[self.index]
        return token.kind == "op" and token.value in ops

    def starts_value(self) -> bool:
        return self.peek().kind in ("path", "const") or self.at("[")

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise FilterSyntaxError("empty expression", 0)
        node = self.expression(None)
        if self.peek().kind != "end":
            hint = " (missing 'and' or 'or'?)" if self.starts_value() else ""
            raise FilterSyntaxError(f"unexpected {_describe(self.peek())}{hint}", self.peek().pos)
        return node

    def expression(self, after: _Token | None) -> Node:
        operands = [self.and_expr(after)]
        while self.at("or"):
            operands.append(self.and_expr(self.take()))
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self, after: _Token | None) -> Node:
        operands = [self.not_expr(after)]
        while self.at("and"):
            operands.append(self.not_expr(self.take()))
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self, after: _Token | None) -> Node:
        token = self.peek()
        if not self.at("not", "("):
            if not self.starts_value():
                where = f" after {after.text!r}" if after else ""
                found = "" if after and token.kind == "end" else f", found {_describe(token)}"
                raise FilterSyntaxError(f"expected an expression{where}{found}", token.pos)
            return self.comparison()
        self.depth += 1
        if self.depth > MAX_DEPTH:  # bounds the recursion: `((((…` is an error, not a crash
            reason = f"expression is nested too deeply (at most {MAX_DEPTH} levels)"
            raise FilterSyntaxError(reason, token.pos)
        self.take()
        if token.value == "not":
            node: Node = Not(self.not_expr(token))
        else:
            node = self.expression(token)
            if not self.at(")"):
                other = self.peek()
                reason = f"expected ')' to close '(' at character {token.pos}"
                raise FilterSyntaxError(f"{reason}, found {_describe(other)}", other.pos)
            self.take()
        self.depth -= 1
        return node

    def comparison(self) -> Node:
        left = self.value(None)
        if not self.at(*_OPERATORS):
            return Truthy(left)
        token = self.take()
        op = token.value
        if op == "not":
            if not self.at("in"):
                found = self.peek()
                reason = f"expected 'in' after 'not', found {_describe(found)}"
                raise FilterSyntaxError(reason, found.pos)
            op = f"not {self.take().value}"
        right = self.value(token)
        if self.at(*_OPERATORS):
            found = self.peek()
            reason = (
                f"comparisons cannot be chained, combine them with 'and' (found {found.text!r})"
            )
            raise FilterSyntaxError(reason, found.pos)
        return Compare(op, left, right)

    def value(self, after: _Token | None) -> Value:
        token = self.take()
        if token.kind == "path":
            return Path(token.value)
        if token.kind == "const":
            return Const(token.value)
        if token.kind == "op" and token.value == "[":
            return Const(self.list_items())
        found = "" if token.kind == "end" else f", found {_describe(token)}"
        where = f" after {after.text!r}" if after else ""
        raise FilterSyntaxError(f"expected a value{where}{found}", token.pos)

    def list_items(self) -> tuple[Scalar, ...]:
        items: list[Scalar] = []
        if self.at("]"):
            self.take()
            return ()
        while True:
            token = self.take()
            if token.kind != "const":
                reason = f"expected a literal in the list, found {_describe(token)}"
                raise FilterSyntaxError(reason, token.pos)
            items.append(token.value)
            if not self.at(",", "]"):
                reason = f"expected ',' or ']' in the list, found {_describe(self.peek())}"
                raise FilterSyntaxError(reason, self.peek().pos)
            if self.take().value == "]":
                return tuple(items)


# --------------------------------------------------------------------------- evaluation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # True and False are singletons; keeps `true == 1` false
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_eq, a, b))
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or a.keys() != b.keys():
            return False
        return all(_eq(item, b[key]) for key, item in a.items())
    return not isinstance(b, list | tuple | Mapping) and bool(a == b)


def _ordered(compare: Callable[[Any, Any], Any]) -> _Test:
    def test(a: Any, b: Any) -> bool:
        if (isinstance(a, str) and isinstance(b, str)) or (_is_number(a) and _is_number(b)):
            return bool(compare(a, b))
        return False  # str < int, None < 1: simply false

    return test


def _in(a: Any, b: Any) -> bool:
    if isinstance(b, list | tuple):
        return any(_eq(a, item) for item in b)
    return isinstance(b, str | Mapping) and isinstance(a, str) and a in b


def _strings(method: Callable[[str, str], bool]) -> _Test:
    return lambda a, b: isinstance(a, str) and isinstance(b, str) and method(a, b)


def _glob(text: Any, pattern: Any) -> bool:
    # The pattern may come from the event: held to a filter's own length, translated in
    # linear time (`_translate`) into a small cache of ours (fnmatch's keeps 32,768), and
    # not matched at all past `MAX_GLOB_STEPS` (see there).
    if not isinstance(text, str) or not isinstance(pattern, str) or len(pattern) > MAX_LENGTH:
        return False
    match, piece = _compiled_glob(pattern)
    if len(text) * piece > MAX_GLOB_STEPS:
        return False
    return match(text) is not None


#: A pattern taken from the event matches nothing when the text's length times the longest
#: piece of the pattern after a `*` exceeds this: matching tries that piece at each place of
#: the text (~2 ns a step, so ~20 ms at most; a 2000-character pattern against a 1 MiB text
#: took 5 s). A 1 MiB text still matches `*invoice*`.
MAX_GLOB_STEPS = 10_000_000


@functools.lru_cache(maxsize=64)
def _compiled_glob(pattern: str) -> tuple[Callable[[str], re.Match[str] | None], int]:
    """The glob's matcher, and the characters of its longest piece after a `*`."""
    return re.compile(_translate(pattern)).match, _longest_starred_piece(pattern)


def _translate(pattern: str) -> str:
    """`fnmatch.translate`, in linear time. It looks for the `]` of each `[` up to the end
    of the pattern, so N `[`s that never close took N²/2 steps (0.4 s for 2000). From the
    first one that never closes, every `[` is a literal `[`: written as `[[]`, the class
    of `[` alone, each means the same and closes at once."""
    start = 0
    while (opening := pattern.find("[", start)) >= 0:
        closing = pattern.find("]", _class_start(pattern, opening))
        if closing < 0:
            return fnmatch.translate(pattern[:opening] + pattern[opening:].replace("[", "[[]"))
        start = closing + 1
    return fnmatch.translate(pattern)


def _class_start(pattern: str, opening: int) -> int:
    # Where fnmatch looks for the `]` closing the `[` at `opening`: `[!` negates, and a `]`
    # first in the class is one of its characters.
    i = opening + 1
    if pattern.startswith("!", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1
    return i


def _longest_starred_piece(pattern: str) -> int:
    """Of the pieces between `*`s after the first one, the most characters one matches
    (a `[…]` class is one). The piece before the first `*` is tried at the start only."""
    longest = length = 0
    starred = False
    i = 0
    while i < len(pattern):
        if pattern[i] == "*":
            starred, length = True, 0
            i += 1
            continue
        closing = pattern.find("]", _class_start(pattern, i)) if pattern[i] == "[" else -1
        i = closing + 1 if closing >= 0 else i + 1
        length += 1
        if starred:
            longest = max(longest, length)
    return longest


_TESTS: dict[str, _Test] = {
    "==": _eq,
    "!=": lambda a, b: not _eq(a, b),
    "<": _ordered(operator.lt),
    "<=": _ordered(operator.le),
    ">": _ordered(operator.gt),
    ">=": _ordered(operator.ge),
    "in": _in,
    "not in": lambda a, b: not _in(a, b),
    "contains": lambda a, b: _in(b, a),
    "startswith": _strings(str.startswith),
    "endswith": _strings(str.endswith),
    # CPython >= 3.9 translates globs to regexes that cannot backtrack catastrophically.
    "matches": _glob,
}


def _negate(check: _Check) -> _Check:
    return lambda value: not check(value)


def _check_against(op: str, const: Any) -> _Check | None:
    """A faster one-argument test for the usual `path OP literal` shapes, or None."""
    check: _Check | None = None
    if op in ("==", "!=") and (const is None or isinstance(const, bool)):
        check = functools.partial(operator.is_, const)
    elif op in ("==", "!=") and isinstance(const, str):
        check = functools.partial(operator.eq, const)  # str == non-str is False, never raises
    elif op in ("==", "!=") and _is_number(const):
        check = lambda value: _is_number(value) and bool(value == const)  # noqa: E731
    elif op in ("in", "not in") and isinstance(const, tuple):
        if all(isinstance(item, str) for item in const):
            members = frozenset(const)
            check = lambda value: isinstance(value, str) and value in members  # noqa: E731
    elif op == "matches" and isinstance(const, str):
        match = re.compile(_translate(const)).match  # compiled once, at parse time
        return lambda value: isinstance(value, str) and match(value) is not None
    return _negate(check) if check and op in ("!=", "not in") else check


def _getter(node: Value) -> _Getter:
    if isinstance(node, Const):
        const = node.value
        return lambda context: const
    if len(node.parts) == 1:
        key = node.parts[0]
        return lambda context: context.get(key)
    steps = _steps(".".join(node.parts))
    return lambda context: _walk(context, steps)


def _compile(node: Node) -> _Predicate:
    match node:
        case Compare(op, left, right):
            get_left = _getter(left)
            check = _check_against(op, right.value) if isinstance(right, Const) else None
            if check is not None:
                return lambda context: check(get_left(context))
            test, get_right = _TESTS[op], _getter(right)
            return lambda context: test(get_left(context), get_right(context))
        case Truthy(value):
            get = _getter(value)
            return lambda context: bool(get(context))
        case Not(operand):
            inner = _compile(operand)
            return lambda context: not inner(context)
        case And(operands) | Or(operands):
            parts = tuple(map(_compile, operands))
            if len(parts) == 2:  # the usual shape; no generator on the hot path
                first, second = parts
                if isinstance(node, And):
                    return lambda context: first(context) and second(context)
                return lambda context: first(context) or second(context)
            combine = all if isinstance(node, And) else any
            return lambda context: combine(part(context) for part in parts)
    raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed and compiled filter expression; build one with `parse`."""

    source: str
    ast: Node
    _predicate: _Predicate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_predicate", _compile(self.ast))

    def matches(self, context: Mapping[str, Any]) -> bool:
        """Whether the event `context` satisfies the filter."""
        try:
            return self._predicate(context)
        except RecursionError:  # only `==` between two absurdly deep values gets here
            return False

    def __str__(self) -> str:
        return self.source


def parse(expression: str) -> Filter:
    """Parse and compile `expression`; raise `FilterSyntaxError(reason, position)` if invalid."""
    if len(expression) > MAX_LENGTH:
        reason = f"expression is too long ({len(expression)} characters, at most {MAX_LENGTH})"
        raise FilterSyntaxError(reason, MAX_LENGTH)
    return Filter(expression, _Parser(expression).parse())


# The canonical event's fields (DESIGN §3.4; hub.py builds it): every path starts with one.
EVENT_FIELDS = ("id", "type", "tenant", "source", "occurred_at", "received_at", "data")


def unknown_field(path: str) -> str | None:
    """Why `path` can never find a value in an event, or None when it may: its first part
    is not a field of the canonical event (`kind` where `data.kind` was meant)."""
    root = path.split(".", 1)[0]
    if root in EVENT_FIELDS:
        return None
    return (
        f"{root!r} is not a field of an event (a path starts with "
        f"{', '.join(EVENT_FIELDS)}): did you mean 'data.{path}'?"
    )


def paths(node: Node | Value) -> Iterator[str]:
    """Every path an expression reads, dotted."""
    if isinstance(node, Path):
        yield ".".join(node.parts)
    elif isinstance(node, Compare):
        yield from paths(node.left)
        yield from paths(node.right)
    elif isinstance(node, Truthy):
        yield from paths(node.value)
    elif isinstance(node, Not):
        yield from paths(node.operand)
    elif isinstance(node, And | Or):
        for operand in node.operands:
            yield from paths(operand)


def lookup(context: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` (`data.items.0.sku`) in `context`, or None if missing."""
    return _walk(context, _steps(path))


@functools.lru_cache(maxsize=1024)
def _steps(path: str) -> _Steps:
    # List indexes are parsed once per path, not once per event.
    return tuple((part, _index(part)) for part in path.split("."))


def _index(part: str) -> int | None:
    # 19+ digits index nothing, and would trip int()'s limit past 4,300 digits.
    return int(part) if part.isascii() and part.isdigit() and len(part) < 19 else None


def _walk(value: Any, steps: _Steps) -> Any:
    for key, index in steps:
        if type(value) is dict or isinstance(value, Mapping):  # dict first: ABCs are slow
            value = value.get(key)
        elif index is not None and isinstance(value, list | tuple):
            value = value[index] if index < len(value) else None
        else:
            return None
    return value
