"""The `when:` condition language: a tokenizer, a recursive-descent parser and a tiny evaluator.

Why a parser and not ``eval``: a condition is written once in a stack and then run on every
envoy in the fleet, as root. A Python expression can reach anything (``().__class__``,
``__import__``), and every "restricted eval" keeps growing new escapes. This grammar has no
calls, no attribute access and no name that starts with ``_``, so there is no road to any of
that: the only thing a condition can touch is the traits mapping, by key and by list index. A
grammar of our own also gives operators errors that point at a column, and semantics chosen for
fleets rather than inherited from Python (a missing trait is null; ``1 == true`` is false).

Pipeline: ``_tokenize`` -> ``_Parser`` -> an AST of frozen dataclasses -> ``Condition``.
``docs/conditions.md`` is the operator's reference for the grammar and the semantics.

One module past the ~600-line mark on purpose: tokenizer, parser, AST and evaluation rules are
a single grammar, private to each other behind ``parse``, and are checked against
docs/conditions.md together; split, each piece would only make sense with the others open.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vigo.errors import ConditionEvalError, ConditionSyntaxError

__all__ = [
    "MAX_DEPTH",
    "MAX_SOURCE_CHARS",
    "And",
    "Compare",
    "Condition",
    "ListExpr",
    "Literal",
    "Match",
    "Not",
    "Or",
    "Path",
    "parse",
    "parse_cached",
]

#: Longest condition accepted, in characters. A `when:` is a line of policy; anything this long
#: is a mistake, and the bound keeps parse time and error messages small.
MAX_SOURCE_CHARS = 4096
#: Deepest nesting of parentheses, list brackets and `not`. Keeps the recursive parser and
#: evaluator far below Python's recursion limit.
MAX_DEPTH = 64
#: Distinct sources ``parse_cached`` remembers; more than any real stack holds.
PARSE_CACHE_SIZE = 4096
#: Deepest trait value compared element by element. JSON cannot be cyclic, but a buggy trait
#: source handing over a self-referencing list must not crash the run with a RecursionError.
MAX_VALUE_DEPTH = 100

_KEYWORDS = frozenset({"and", "or", "not", "in"})
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}
# Python spellings an operator is likely to type; as trait names they would silently be null.
_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}
_COMPARISON_OPS = frozenset({"==", "!=", "<", "<=", ">", ">=", "=~", "!~"})
_OPERATORS = ("==", "!=", "<=", ">=", "=~", "!~", "<", ">", "(", ")", "[", "]", ",", ".")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_CHAR_HINTS = {
    "=": "did you mean '=='?",
    "!": "use 'not', '!=' or '!~'",
    "&": "use 'and'",
    "|": "use 'or'",
    "-": "names cannot contain '-'; write custom[\"a-b\"] for such a key",
}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IDENTIFIER_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_VALUE = "a value (string, number, true/false/null, path, list or '(')"

# --------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "name", "number", "string", "op" or "end"
    text: str  # exactly as written; strings keep their quotes
    pos: int
    value: int | float | None = None  # numbers only


def _tokenize(source: str) -> list[_Token]:
    tokens = []
    pos = 0
    while pos < len(source):
        if source[pos] in " \t\r\n":
            pos += 1
            continue
        token = _read_token(source, pos)
        tokens.append(token)
        pos += len(token.text)
    tokens.append(_Token("end", "", len(source)))
    return tokens


def _read_token(source: str, pos: int) -> _Token:
    char = source[pos]
    if char in "'\"":
        return _read_string(source, pos)
    if _is_digit(char) or (char == "-" and _is_digit(source[pos + 1 : pos + 2])):
        return _read_number(source, pos)
    if char == "_" or (char.isascii() and char.isalpha()):
        return _read_name(source, pos)
    for op in _OPERATORS:
        if source.startswith(op, pos):
            return _Token("op", op, pos)
    hint = _CHAR_HINTS.get(char)
    message = f"unexpected character {char!r}" + (f"; {hint}" if hint else "")
    raise ConditionSyntaxError(message, source=source, position=pos)


def _is_digit(char: str) -> bool:
    # str.isdigit() accepts every Unicode digit; the grammar means 0-9.
    return len(char) == 1 and "0" <= char <= "9"


def _read_string(source: str, pos: int) -> _Token:
    # Only finds the end here; the body is decoded by the parser, which knows whether the
    # string is a regex (backslashes kept) or plain (strict escapes).
    quote = source[pos]
    end = pos + 1
    while end < len(source) and source[end] != quote:
        end += 2 if source[end] == "\\" else 1
    if end >= len(source):
        raise ConditionSyntaxError(
            f"unterminated string: expected a closing {quote} but found the end of the condition",
            source=source,
            position=pos,
        )
    return _Token("string", source[pos : end + 1], pos)


def _read_number(source: str, pos: int) -> _Token:
    text = _NUMBER_RE.match(source, pos).group()  # caller saw a digit
    after = source[pos + len(text) : pos + len(text) + 1]
    if after == "_" or (after.isascii() and after.isalnum()):
        raise ConditionSyntaxError(
            f"malformed number: expected a digit, '.' or an operator after {text!r} "
            f"but found {after!r}",
            source=source,
            position=pos,
        )
    if "." not in text and "e" not in text.lower():
        return _Token("number", text, pos, int(text))
    value = float(text)
    if not math.isfinite(value):
        raise ConditionSyntaxError(
            f"number out of range: {text!r} does not fit a float", source=source, position=pos
        )
    return _Token("number", text, pos, value)


def _read_name(source: str, pos: int) -> _Token:
    text = _NAME_RE.match(source, pos).group()  # caller saw a letter
    if text.startswith("_"):
        raise ConditionSyntaxError(
            f"names must not start with '_' but found {text!r}", source=source, position=pos
        )
    return _Token("name", text, pos)


# --------------------------------------------------------------------------------------------
# The AST. Every node evaluates to a JSON value; boolean operators and comparisons to a bool.


@dataclass(frozen=True, eq=False)
class Literal:
    """A string, number, true, false or null written in the condition."""

    value: str | int | float | bool | None

    # Type-strict so that Literal(1) != Literal(True) != Literal(1.0), as in the language.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Literal):
            return NotImplemented
        return type(self.value) is type(other.value) and self.value == other.value

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True)
class ListExpr:
    """``[a, b, ...]``: a list of operands, evaluated to a list of their values."""

    items: tuple[Expr, ...]

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        return [item.evaluate(traits) for item in self.items]


@dataclass(frozen=True)
class Path:
    """A trait reference: a name, then ``.name``, ``[index]`` or ``["key"]`` steps."""

    segments: tuple[str | int, ...]

    @property
    def dotted(self) -> str:
        """The path as it would be written, e.g. ``os.family``, ``ips[0]``, ``c["a-b"]``."""
        parts = [str(self.segments[0])]
        for segment in self.segments[1:]:
            if isinstance(segment, int):
                parts.append(f"[{segment}]")
            elif _IDENTIFIER_RE.fullmatch(segment):
                parts.append(f".{segment}")
            else:
                parts.append(f"[{_quote(segment)}]")
        return "".join(parts)

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        value = traits.get(self.segments[0])
        for segment in self.segments[1:]:
            value = _step(value, segment)
        return value


@dataclass(frozen=True)
class Compare:
    """``left op right`` for ``== != < <= > >= in`` and ``not in``."""

    op: str
    left: Expr
    right: Expr

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        left = self.left.evaluate(traits)
        right = self.right.evaluate(traits)
        if self.op == "==":
            return _equal(left, right)
        if self.op == "!=":
            return not _equal(left, right)
        if self.op in ("in", "not in"):
            return _contains(self, left, right) != (self.op == "not in")
        return _order(self, left, right)


@dataclass(frozen=True)
class Match:
    """``left =~ "regex"`` (``negated``: ``!~``). The regex is compiled once, at parse time."""

    left: Expr
    pattern: str
    negated: bool
    regex: re.Pattern[str] = field(compare=False, repr=False)

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        subject = self.left.evaluate(traits)
        kind = _kind(subject)
        if kind == "null":
            found = False  # a missing trait matches nothing
        elif kind == "string":
            found = self.regex.search(subject) is not None
        else:
            op = "!~" if self.negated else "=~"
            raise ConditionEvalError(
                f"cannot match {_describe(self.left, subject)} {op} {_quote(self.pattern)}: "
                "regex matching needs a string (or null) on the left"
            )
        return found != self.negated


@dataclass(frozen=True)
class Not:
    operand: Expr

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        return not _truthy(self.operand.evaluate(traits))


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        return all(_truthy(operand.evaluate(traits)) for operand in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]

    def evaluate(self, traits: Mapping[str, Any]) -> Any:
        return any(_truthy(operand.evaluate(traits)) for operand in self.operands)


Expr = Literal | ListExpr | Path | Compare | Match | Not | And | Or


@dataclass(frozen=True)
class Condition:
    """A parsed `when:` expression. Immutable, so one instance is shared by every resource."""

    source: str
    root: Expr
    #: Every trait path the condition reads, in order of first appearance.
    paths: tuple[str, ...]

    def evaluate(self, traits: Mapping[str, Any]) -> bool:
        """True when the condition holds for ``traits``; raises ``ConditionEvalError``."""
        if type(traits) is not dict and not isinstance(traits, Mapping):
            raise ConditionEvalError(
                f"cannot evaluate {self.source!r}: expected traits as a mapping "
                f"but found {type(traits).__name__}"
            )
        return _truthy(self.root.evaluate(traits))


# --------------------------------------------------------------------------------------------
# Evaluation rules. Values are only ever inspected with type(), never isinstance(): isinstance
# falls back to reading ``obj.__class__``, and a trait value must never run code of its own.

_KINDS: dict[type, str] = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "list",
    tuple: "list",
    dict: "map",
}
_NUMBERS = frozenset({"integer", "float"})
_ORDERINGS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _kind(value: object) -> str:
    kind = _KINDS.get(type(value))
    if kind is None:
        raise ConditionEvalError(
            f"a trait holds a {type(value).__name__} object, which is not a JSON value "
            "(traits are maps, lists, strings, numbers, booleans and null)"
        )
    return kind


def _step(container: object, key: str | int) -> Any:
    # Only plain dicts and lists are indexed; any other step (a missing key, an index past the
    # end, a key into a string) is null, so a condition never fails on a host lacking a trait.
    container_type = type(container)
    if container_type is dict and type(key) is str:
        return container.get(key)
    if container_type in (list, tuple) and type(key) is int and 0 <= key < len(container):
        return container[key]
    return None


def _truthy(value: object) -> bool:
    _kind(value)  # refuses non-JSON values before bool() could call their __bool__
    return bool(value)


def _equal(left: object, right: object, depth: int = 0) -> bool:
    if depth > MAX_VALUE_DEPTH:
        raise ConditionEvalError(f"trait value nests deeper than {MAX_VALUE_DEPTH} levels")
    left_kind, right_kind = _kind(left), _kind(right)
    if left_kind in _NUMBERS and right_kind in _NUMBERS:
        return left == right
    if left_kind != right_kind:
        return False  # this is what keeps 1 == true false
    if left_kind == "list":
        return len(left) == len(right) and all(
            _equal(a, b, depth + 1) for a, b in zip(left, right, strict=True)
        )
    if left_kind == "map":
        return _map_keys(left) == _map_keys(right) and all(
            _equal(value, right[key], depth + 1) for key, value in left.items()
        )
    return left == right


def _map_keys(value: Any) -> frozenset[str]:
    keys = frozenset(key for key in value if type(key) is str)
    if len(keys) != len(value):
        raise ConditionEvalError("a trait map has a key that is not a string")
    return keys


def _order(node: Compare, left: object, right: object) -> bool:
    left_kind, right_kind = _kind(left), _kind(right)
    if (left_kind in _NUMBERS and right_kind in _NUMBERS) or left_kind == right_kind == "string":
        return _ORDERINGS[node.op](left, right)
    raise ConditionEvalError(
        f"cannot compare {_describe(node.left, left)} {node.op} {_describe(node.right, right)}: "
        "ordering needs two numbers or two strings"
    )


def _contains(node: Compare, item: object, container: object) -> bool:
    container_kind = _kind(container)
    if container_kind == "null":
        return False  # a missing trait contains nothing
    if container_kind == "list":
        return any(_equal(item, member) for member in container)
    if container_kind in ("string", "map"):
        item_kind = _kind(item)
        if item_kind == "string":
            return item in container
        if item_kind == "null":
            return False
        reason = f"'in' on a {container_kind} needs a string (or null) on the left"
    else:
        reason = "'in' needs a list, a string, a map or null on the right"
    raise ConditionEvalError(
        f"cannot test {_describe(node.left, item)} {node.op} "
        f"{_describe(node.right, container)}: {reason}"
    )


def _describe(node: Expr, value: object) -> str:
    """``'memory.total_mb' (null)``, ``'cpus' = 4 (integer)`` or ``"x" (string)``."""
    kind = _KINDS.get(type(value), type(value).__name__)
    if isinstance(node, Path):
        if value is None:
            return f"'{node.dotted}' (null)"
        return f"'{node.dotted}' = {_show(value)} ({kind})"
    return f"{_show(value)} ({kind})"


def _show(value: object, limit: int = 60) -> str:
    text = _render_value(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _render_value(value: object, depth: int = 0) -> str:
    # Our own JSON-ish rendering: repr() of a container would call repr() on every element.
    kind = _KINDS.get(type(value))
    if kind is None:
        return f"<{type(value).__name__}>"
    if kind in ("null", "boolean"):
        return {None: "null", True: "true", False: "false"}[value]
    if kind == "string":
        return _quote(value)
    if kind == "integer" and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    if kind in _NUMBERS:
        return repr(value)
    if depth >= 2:
        return "[...]" if kind == "list" else "{...}"
    if kind == "list":
        items = [_render_value(item, depth + 1) for item in value[:8]]
        return "[" + ", ".join(items + ["..."] * (len(value) > 8)) + "]"
    pairs = [
        f"{_render_value(key, depth + 1)}: {_render_value(item, depth + 1)}"
        for key, item in list(value.items())[:8]
    ]
    return "{" + ", ".join(pairs + ["..."] * (len(value) > 8)) + "}"


def _quote(text: str) -> str:
    """A double-quoted string literal that this grammar reads back as ``text``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t") + '"'


# --------------------------------------------------------------------------------------------
# The parser. One method per grammar rule (see docs/conditions.md), lowest precedence first.


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _tokenize(source)
        self.index = 0
        self.depth = 0

    # -- helpers

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.token
        self.index += 1
        return token

    def at(self, text: str, offset: int = 0) -> bool:
        token = self.tokens[min(self.index + offset, len(self.tokens) - 1)]
        return token.kind in ("name", "op") and token.text == text

    def fail(self, message: str, token: _Token | None = None) -> ConditionSyntaxError:
        position = (token or self.token).pos
        return ConditionSyntaxError(message, source=self.source, position=position)

    def expected(self, what: str) -> ConditionSyntaxError:
        return self.fail(f"expected {what} but found {_found(self.token)}")

    @contextmanager
    def nested(self) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(
                f"condition nests deeper than {MAX_DEPTH} levels "
                "(each '(', '[' and 'not' opens one)"
            )
        try:
            yield
        finally:
            self.depth -= 1

    # -- rules

    def parse(self) -> Expr:
        root = self.parse_or()
        if self.token.kind != "end":
            raise self.expected("'and', 'or' or the end of the condition")
        return root

    def parse_or(self) -> Expr:
        operands = [self.parse_and()]
        while self.at("or"):
            self.advance()
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self) -> Expr:
        operands = [self.parse_not()]
        while self.at("and"):
            self.advance()
            operands.append(self.parse_not())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_not(self) -> Expr:
        if not self.at("not"):
            return self.parse_comparison()
        with self.nested():
            self.advance()
            return Not(self.parse_not())

    def parse_comparison(self) -> Expr:
        left = self.parse_operand()
        op_token = self.token
        op = self.comparison_operator()
        if op is None:
            return left
        if op in ("=~", "!~"):
            node: Expr = self.parse_match(left, op == "!~")
        else:
            node = Compare(op, left, self.parse_operand())
        if self.comparison_operator(consume=False):
            raise self.fail(
                "comparisons cannot be chained (write 'a < b and b < c'): expected 'and', 'or' "
                f"or the end of the condition after the '{op}' at column {op_token.pos + 1} "
                f"but found {_found(self.token)}"
            )
        return node

    def comparison_operator(self, consume: bool = True) -> str | None:
        token = self.token
        if token.kind == "op" and token.text in _COMPARISON_OPS:
            op, width = token.text, 1
        elif self.at("in"):
            op, width = "in", 1
        elif self.at("not"):
            if not self.at("in", offset=1):
                self.index += 1
                raise self.expected("'in' after 'not'")
            op, width = "not in", 2
        else:
            return None
        if consume:
            self.index += width
        return op

    def parse_match(self, left: Expr, negated: bool) -> Match:
        token = self.token
        op = "!~" if negated else "=~"
        if token.kind != "string":
            raise self.expected(f"a quoted regex after '{op}'")
        self.advance()
        pattern = token.text[1:-1]  # backslashes go to the regex engine as written
        try:
            regex = re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise self.fail(f"invalid regex {token.text}: {exc}", token) from exc
        return Match(left, pattern, negated, regex)

    def parse_operand(self) -> Expr:
        token = self.token
        if token.kind == "string":
            self.advance()
            return Literal(self.decode(token))
        if token.kind == "number":
            self.advance()
            return Literal(token.value)
        if token.kind == "name" and token.text not in _KEYWORDS:
            return self.parse_name()
        if self.at("("):
            return self.parse_group()
        if self.at("["):
            return self.parse_list()
        raise self.expected(_VALUE)

    def parse_name(self) -> Expr:
        token = self.token
        if token.text in _LITERALS:
            self.advance()
            return Literal(_LITERALS[token.text])
        if token.text in _PYTHON_LITERALS:
            raise self.fail(
                f"expected {_VALUE} but found {token.text!r} "
                f"(literals are lowercase: {_PYTHON_LITERALS[token.text]})"
            )
        return self.parse_path()

    def parse_group(self) -> Expr:
        with self.nested():
            opening = self.advance()
            inner = self.parse_or()
            if not self.at(")"):
                raise self.expected(f"')' to close the '(' at column {opening.pos + 1}")
            self.advance()
            return inner

    def parse_list(self) -> ListExpr:
        with self.nested():
            self.advance()
            items: list[Expr] = []
            if self.at("]"):
                self.advance()
                return ListExpr(())
            while True:
                items.append(self.parse_operand())
                if self.at("]"):
                    self.advance()
                    return ListExpr(tuple(items))
                if not self.at(","):
                    raise self.expected("',' or ']' in the list")
                self.advance()

    def parse_path(self) -> Path:
        segments: list[str | int] = [self.advance().text]
        while True:
            if self.at("."):
                self.advance()
                if self.token.kind != "name":  # keywords are fine here: `custom.in` is clear
                    raise self.expected("a name after '.'")
                segments.append(self.advance().text)
            elif self.at("["):
                self.advance()
                segments.append(self.parse_index())
                if not self.at("]"):
                    raise self.expected("']' after the index")
                self.advance()
            else:
                break
        if self.at("("):
            raise self.fail("conditions cannot call functions: found '(' after a path")
        return Path(tuple(segments))

    def parse_index(self) -> str | int:
        token = self.token
        if token.kind == "number" and type(token.value) is int and token.value >= 0:
            self.advance()
            return token.value
        if token.kind != "string":
            raise self.expected("a list index (integer >= 0) or a quoted key")
        key = self.decode(token)
        if key.startswith("_"):
            raise self.fail(f"keys must not start with '_' but found {token.text}")
        self.advance()
        return key

    def decode(self, token: _Token) -> str:
        body = token.text[1:-1]
        if "\\" not in body:
            return body
        out = []
        i = 0
        while i < len(body):
            if body[i] != "\\":
                out.append(body[i])
                i += 1
                continue
            escaped = body[i + 1]  # the tokenizer guarantees a character after a backslash
            if escaped not in _ESCAPES:
                raise ConditionSyntaxError(
                    f"expected one of the escapes \\\\ \\\" \\' \\n \\t but found '\\{escaped}' "
                    "(only regexes after =~ and !~ keep other backslashes)",
                    source=self.source,
                    position=token.pos + 1 + i,
                )
            out.append(_ESCAPES[escaped])
            i += 2
        return "".join(out)


def _found(token: _Token) -> str:
    if token.kind == "end":
        return "the end of the condition"
    text = token.text if len(token.text) <= 40 else token.text[:37] + "..."
    return text if token.kind == "string" else f"'{text}'"


def _collect_paths(node: Expr, found: dict[str, None]) -> dict[str, None]:
    match node:
        case Path():
            found.setdefault(node.dotted, None)
        case ListExpr(items=children) | And(operands=children) | Or(operands=children):
            for child in children:
                _collect_paths(child, found)
        case Compare(left=left, right=right):
            _collect_paths(left, found)
            _collect_paths(right, found)
        case Match(left=child) | Not(operand=child):
            _collect_paths(child, found)
    return found


# --------------------------------------------------------------------------------------------
# Public entry points


def parse(source: str) -> Condition:
    """Parse a `when:` expression; raises ``ConditionSyntaxError`` pointing at the column."""
    if not isinstance(source, str):
        raise ConditionSyntaxError(
            f"expected a condition string but found {type(source).__name__}",
            source=str(source),
            position=0,
        )
    if len(source) > MAX_SOURCE_CHARS:
        raise ConditionSyntaxError(
            f"expected at most {MAX_SOURCE_CHARS} characters but the condition has {len(source)}",
            source=source,
            position=MAX_SOURCE_CHARS,
        )
    root = _Parser(source).parse()
    return Condition(source, root, tuple(_collect_paths(root, {})))


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def parse_cached(source: str) -> Condition:
    """``parse`` memoised: the engine evaluates the same few conditions for many resources.

    Safe to share because a ``Condition`` is immutable. Errors are not cached, only results.
    """
    return parse(source)
