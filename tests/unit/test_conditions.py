"""The `when:` condition language: parsing, evaluation, errors, and the no-eval guarantees."""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vigo.errors import ConditionEvalError, ConditionSyntaxError, PolicyError
from vigo.policy import conditions
from vigo.policy.conditions import (
    MAX_DEPTH,
    MAX_SOURCE_CHARS,
    And,
    Compare,
    ListExpr,
    Literal,
    Match,
    Not,
    Or,
    Path,
    parse,
    parse_cached,
)

TRAITS: dict[str, Any] = {
    "hostname": "db12",
    "os": {"family": "debian", "name": "ubuntu", "version": "22.04"},
    "kernel": {"name": "Linux", "release": "5.15.0-91-generic"},
    "cpus": 4,
    "load": 0.5,
    "memory": {"total_mb": 2048},
    "ips": ["10.0.0.1", "192.168.1.7"],
    "custom": {
        "roles": ["web", "db"],
        "env": "staging",
        "weird-key": 1,
        "is_canary": True,
        "zero": 0,
        "empty": "",
        "nothing": None,
        "labels": {"team": "infra"},
        "in": "keyword-named",
    },
}


def holds(source: str, traits: dict[str, Any] = TRAITS) -> bool:
    return parse(source).evaluate(traits)


# --------------------------------------------------------------------------------------------
# Operators, table-driven

OPERATOR_CASES = [
    # == and !=
    ('os.family == "debian"', True),
    ('os.family == "redhat"', False),
    ('custom.env != "prod"', True),
    ("cpus == 4", True),
    ("cpus == 4.0", True),  # numbers compare by value
    ("custom.is_canary == true", True),
    ("custom.is_canary == 1", False),  # booleans are not numbers
    ("custom.zero == false", False),
    ("custom.zero != false", True),
    ("custom.nothing == null", True),
    ("custom.missing == null", True),
    ('custom.missing == "web"', False),
    ('custom.missing != "web"', True),
    ('ips == ["10.0.0.1", "192.168.1.7"]', True),
    ('ips == ["192.168.1.7", "10.0.0.1"]', False),
    ("custom.labels == custom.labels", True),
    ("[1, true] == [1.0, true]", True),
    ("[1] == [true]", False),
    ('"1" == 1', False),
    # ordering
    ("cpus >= 2", True),
    ("cpus > 4", False),
    ("cpus <= 4", True),
    ("cpus < 4.5", True),
    ("load < 1", True),
    ("memory.total_mb > 1024", True),
    ("-1 < 0", True),
    ('os.version >= "20.04"', True),
    ('"abc" < "abd"', True),
    # in / not in
    ('"web" in custom.roles', True),
    ('"mail" in custom.roles', False),
    ('"mail" not in custom.roles', True),
    ('os.name in ["ubuntu", "debian"]', True),
    ('os.name not in ["ubuntu", "debian"]', False),
    ("1 in [true, 1.0]", True),
    ("true in [1]", False),
    ("null in [null]", True),
    ('"ub" in os.name', True),
    ('"" in os.name', True),
    ('"team" in custom.labels', True),
    ('"infra" in custom.labels', False),
    ('"web" in custom.missing', False),  # a missing trait contains nothing
    ('"web" not in custom.missing', True),
    ('custom.missing in "abc"', False),
    ("custom.missing in custom.labels", False),
    # =~ and !~ (regex search, not full match)
    ('hostname =~ "^db[0-9]+$"', True),
    ('hostname =~ "b1"', True),
    ('hostname !~ "^web"', True),
    (r"kernel.release !~ '^4\.'", True),
    (r"kernel.release =~ '^5\.15\.'", True),
    ('custom.missing =~ "x"', False),
    ('custom.missing !~ "x"', True),
    # paths
    ('ips[0] == "10.0.0.1"', True),
    ('ips[1] == "192.168.1.7"', True),
    ("ips[2] == null", True),  # past the end
    ('custom["weird-key"] == 1', True),
    ("custom['weird-key'] == 1", True),
    ('custom["roles"][1] == "db"', True),
    ('custom.in == "keyword-named"', True),
    ("hostname.length == null", True),  # indexing a string is null, never an attribute
    ("ips.count == null", True),
    ('custom["labels"].team == "infra"', True),
    ("cpus[0] == null", True),
    # truthiness
    ("custom.is_canary", True),
    ("custom.zero", False),
    ("custom.empty", False),
    ("custom.nothing", False),
    ("custom.missing", False),
    ("custom.roles", True),
    ("custom.labels", True),
    ("not custom.missing", True),
    ("[]", False),
    ("[0]", True),
    ('""', False),
    ("0.0", False),
    ("null", False),
    # boolean operators
    ('os.family == "debian" and cpus >= 2', True),
    ('not (hostname =~ "^db[0-9]+$") or "web" in custom.roles', True),
    ('os.name in ["ubuntu", "debian"] and memory.total_mb > 1024', True),
    ("true and false", False),
    ("false or true", True),
    ("not true", False),
    ("not not true", True),
    ("custom.zero or custom.empty or custom.labels", True),
]


@pytest.mark.parametrize(("source", "expected"), OPERATOR_CASES)
def test_operators(source: str, expected: bool) -> None:
    assert holds(source) is expected


def test_evaluate_returns_a_real_bool() -> None:
    assert holds("cpus") is True
    assert holds("custom.roles") is True
    assert holds("custom.empty") is False


def test_and_or_short_circuit() -> None:
    # The right side would fail to evaluate (null < 1); it must never be reached.
    assert holds("false and custom.missing < 1") is False
    assert holds("true or custom.missing < 1") is True
    with pytest.raises(ConditionEvalError):
        holds("true and custom.missing < 1")


PRECEDENCE_CASES = [
    ("a or b and c", "a or (b and c)"),
    ("a and b or c and d", "(a and b) or (c and d)"),
    ("not a and b", "(not a) and b"),
    ("not a or b", "(not a) or b"),
    ("not a == b", "not (a == b)"),
    ("not a in b", "not (a in b)"),
    ('a == 1 and b =~ "x" or c', '((a == 1) and (b =~ "x")) or c'),
    ("a or b or c", "a or b or c"),
]


@pytest.mark.parametrize(("source", "explicit"), PRECEDENCE_CASES)
def test_precedence(source: str, explicit: str) -> None:
    assert parse(source).root == parse(explicit).root


def test_ast_shape() -> None:
    assert parse('not a.b == "x" and c[0] in [1, -2.5]').root == And(
        (
            Not(Compare("==", Path(("a", "b")), Literal("x"))),
            Compare("in", Path(("c", 0)), ListExpr((Literal(1), Literal(-2.5)))),
        )
    )
    assert parse("a or (b or c)").root == Or((Path(("a",)), Or((Path(("b",)), Path(("c",))))))


LITERAL_CASES = [
    ('"double"', "double"),
    ("'single'", "single"),
    (r'"a\"b"', 'a"b'),
    (r"'a\'b'", "a'b"),
    (r'"back\\slash"', "back\\slash"),
    (r'"tab\tnew\nline"', "tab\tnew\nline"),
    ('"it\'s"', "it's"),
    ("'say \"hi\"'", 'say "hi"'),
    ('"ünïcødé"', "ünïcødé"),
    ("42", 42),
    ("-7", -7),
    ("0", 0),
    ("3.25", 3.25),
    ("-0.5", -0.5),
    ("1e3", 1000.0),
    ("2.5E-2", 0.025),
    ("true", True),
    ("false", False),
    ("null", None),
]


@pytest.mark.parametrize(("source", "value"), LITERAL_CASES)
def test_literals(source: str, value: object) -> None:
    root = parse(source).root
    assert root == Literal(value)
    assert type(root.value) is type(value)


def test_literal_equality_is_type_strict() -> None:
    assert Literal(1) != Literal(True)
    assert Literal(1) != Literal(1.0)
    assert Literal(0) != Literal(False)
    assert Literal("a") == Literal("a")


def test_paths_property() -> None:
    condition = parse('a.b == 1 or c[0] in d and custom["weird-key"] and a.b and [e.f]')
    assert condition.paths == ("a.b", "c[0]", "d", 'custom["weird-key"]', "e.f")
    assert condition.source.startswith("a.b == 1")
    assert parse("1 == 1").paths == ()


def test_dotted_paths_parse_back() -> None:
    for source in ("a", "a.b_c.d1", "a[0][12]", 'a["x y"]["q\\"uote"].in', "a.true.null"):
        path = parse(source).root
        assert isinstance(path, Path)
        assert parse(path.dotted).root == path


def test_whitespace_and_newlines_between_tokens() -> None:
    assert holds('  os.family\n  == "debian"\tand\ncpus>=2  ')
    assert holds('ips [ 0 ] == "10.0.0.1"')


def test_regex_keeps_backslashes_and_is_compiled_at_parse_time() -> None:
    match = parse(r"x =~ '^\d+\.\d+$'").root
    assert isinstance(match, Match)
    assert match.pattern == r"^\d+\.\d+$"
    assert match.regex.pattern == r"^\d+\.\d+$"
    assert holds(r"v =~ '^\d+\.\d+$'", {"v": "12.5"})
    assert not holds(r"v =~ '^\d+\.\d+$'", {"v": "12x5"})
    assert holds(r'v =~ "a\"b"', {"v": 'a"b'})  # an escaped quote stays a quote to the regex


def test_parse_cached_returns_the_same_condition() -> None:
    source = 'os.family == "cache-test"'
    assert parse_cached(source) is parse_cached(source)
    assert parse_cached(source) == parse(source)
    assert parse_cached.cache_info().maxsize == 4096


def test_limits() -> None:
    nested = "(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH
    assert parse(nested).root == Path(("a",))
    with pytest.raises(ConditionSyntaxError, match="nests deeper than 64") as exc:
        parse("(" + nested + ")")
    assert exc.value.position == MAX_DEPTH
    with pytest.raises(ConditionSyntaxError, match="nests deeper"):
        parse("not " * (MAX_DEPTH + 1) + "a")
    with pytest.raises(ConditionSyntaxError, match="nests deeper"):
        parse("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    # A long flat condition is fine up to the size limit.
    flat = " or ".join(["a"] * 800)
    assert len(flat) < MAX_SOURCE_CHARS
    assert parse(flat).paths == ("a",)
    with pytest.raises(ConditionSyntaxError, match="at most 4096 characters") as exc:
        parse("a" * (MAX_SOURCE_CHARS + 1))
    assert exc.value.position == MAX_SOURCE_CHARS


# --------------------------------------------------------------------------------------------
# Syntax errors: message fragment and 0-based position

SYNTAX_ERRORS = [
    (
        "",
        0,
        "expected a value (string, number, true/false/null, path, list or '(') but found the end",
    ),
    ("   ", 3, "but found the end of the condition"),
    ("a ==", 4, "expected a value"),
    ("(a or b", 7, "expected ')' to close the '(' at column 1 but found the end"),
    (
        "a or )",
        5,
        "expected a value (string, number, true/false/null, path, list or '(') but found ')'",
    ),
    ("a b", 2, "expected 'and', 'or' or the end of the condition but found 'b'"),
    ("a < b < c", 6, "comparisons cannot be chained"),
    ('a == b =~ "x"', 7, "comparisons cannot be chained"),
    ("a in b not in c", 7, "comparisons cannot be chained"),
    ("a not b", 6, "expected 'in' after 'not' but found 'b'"),
    ("a = 1", 2, "unexpected character '='; did you mean '=='?"),
    ("a && b", 2, "use 'and'"),
    ("a || b", 2, "use 'or'"),
    ("!a", 0, "use 'not'"),
    ("weird-key == 1", 5, "names cannot contain '-'"),
    ("a == @", 5, "unexpected character '@'"),
    ("'open", 0, "unterminated string"),
    ('"ends in backslash\\"', 0, "unterminated string"),
    (r'"bad \q escape"', 5, r"found '\q'"),
    (r"'\d'", 1, "expected one of the escapes"),
    ("1abc", 0, "malformed number"),
    ("1e999", 0, "number out of range"),
    ("a.", 2, "expected a name after '.' but found the end"),
    ("a.0", 2, "expected a name after '.' but found '0'"),
    ("a[", 2, "expected a list index (integer >= 0) or a quoted key"),
    ("a[-1]", 2, "expected a list index"),
    ("a[1.5]", 2, "expected a list index"),
    ("a[b]", 2, "expected a list index"),
    ("a[0", 3, "expected ']' after the index"),
    ("[1 2]", 3, "expected ',' or ']' in the list but found '2'"),
    ("[1,]", 3, "expected a value"),
    ("a =~ b", 5, "expected a quoted regex after '=~' but found 'b'"),
    ("a !~ 1", 5, "expected a quoted regex after '!~'"),
    ('a =~ "("', 5, 'invalid regex "(": missing ), unterminated subpattern'),
    ('a =~ "x{99999999999}"', 5, "invalid regex"),
    ("x == True", 5, "found 'True' (literals are lowercase: true)"),
    ("None", 0, "(literals are lowercase: null)"),
    ("and", 0, "expected a value"),
    ("a and or b", 6, "expected a value"),
    ("a in", 4, "expected a value"),
    ("not", 3, "expected a value"),
    ("a - 1", 2, "unexpected character '-'"),
    ("a.b()", 3, "conditions cannot call functions"),
    ("_private", 0, "names must not start with '_'"),
    ('a["_hidden"]', 2, "keys must not start with '_'"),
    ("ünï == 1", 0, "unexpected character 'ü'"),
    ("a == ٣", 5, "unexpected character"),  # a non-ASCII digit is not a number
]


@pytest.mark.parametrize(("source", "position", "fragment"), SYNTAX_ERRORS)
def test_syntax_errors(source: str, position: int, fragment: str) -> None:
    with pytest.raises(ConditionSyntaxError) as exc:
        parse(source)
    assert fragment in str(exc.value)
    assert exc.value.position == position
    assert exc.value.source == source
    assert f"at column {position + 1}" in str(exc.value)


def test_syntax_error_is_a_policy_error_and_value_error() -> None:
    with pytest.raises(PolicyError):
        parse("a ==")
    with pytest.raises(ValueError):
        parse("a ==")


def test_non_string_source() -> None:
    with pytest.raises(ConditionSyntaxError, match="expected a condition string but found bool"):
        parse(True)


# --------------------------------------------------------------------------------------------
# Evaluation errors

EVAL_ERRORS = [
    (
        "memory.missing_mb < 1024",
        "cannot compare 'memory.missing_mb' (null) < 1024 (integer): "
        "ordering needs two numbers or two strings",
    ),
    ("hostname > 3", "cannot compare 'hostname' = \"db12\" (string) > 3 (integer)"),
    ("custom.is_canary >= 1", "'custom.is_canary' = true (boolean) >= 1 (integer)"),
    ("ips < [1]", '\'ips\' = ["10.0.0.1", "192.168.1.7"] (list) < [1] (list)'),
    ("1 in 2", "cannot test 1 (integer) in 2 (integer): 'in' needs a list, a string, a map"),
    ('"a" in cpus', "'in' needs a list, a string, a map or null on the right"),
    ("1 in os.name", "'in' on a string needs a string (or null) on the left"),
    ("1 not in custom.labels", "'in' on a map needs a string (or null) on the left"),
    ('cpus =~ "4"', "cannot match 'cpus' = 4 (integer) =~ \"4\": regex matching needs a string"),
    ('kernel !~ "^4"', 'cannot match \'kernel\' = {"name": "Linux"'),
]


@pytest.mark.parametrize(("source", "fragment"), EVAL_ERRORS)
def test_eval_errors(source: str, fragment: str) -> None:
    with pytest.raises(ConditionEvalError) as exc:
        holds(source)
    assert fragment in str(exc.value)


def test_eval_errors_on_non_json_and_non_mapping_traits() -> None:
    with pytest.raises(ConditionEvalError, match="not a JSON value"):
        holds("x", {"x": object()})
    with pytest.raises(ConditionEvalError, match="expected traits as a mapping"):
        parse("x").evaluate(["x"])
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ConditionEvalError, match="nests deeper"):
        holds("a == b", {"a": cyclic, "b": cyclic})
    with pytest.raises(ConditionEvalError, match="key that is not a string"):
        holds("a == b", {"a": {1: 2}, "b": {1: 2}})


def test_huge_integers_are_shown_briefly() -> None:
    with pytest.raises(ConditionEvalError, match="bit integer"):
        holds("x < 'a'", {"x": 10**5000})


# --------------------------------------------------------------------------------------------
# Nothing reaches Python: no eval, no calls, no dunders, no getattr on trait values

ESCAPE_ATTEMPTS = [
    "__import__('os')",
    "__import__('os').system('id')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "x.__class__",
    "x.__dict__",
    "a._b",
    "a.b._c.d",
    "a['__class__']",
    "open('f')",
    "x()",
    "x.y()",
    "exec('1')",
    "eval('1')",
    "lambda: 1",
    "[x for x in y]",
    "a if b else c",
    "import os",
    "f'{x}'",
    "x.__getattribute__('y')",
    "os.system",  # fine to parse: it is just the trait path os.system ...
]


@pytest.mark.parametrize("source", ESCAPE_ATTEMPTS)
def test_no_road_to_python(source: str) -> None:
    if source == "os.system":
        # ... which is null on any host, not a function.
        assert parse(source).evaluate({"os": {"family": "debian"}}) is False
        return
    with pytest.raises(ConditionSyntaxError):
        parse(source)


def test_module_has_no_dynamic_execution() -> None:
    code = inspect.getsource(conditions)
    code = code.split('"""', 2)[2]  # the docstring explains eval; the code must not use it
    assert not re.search(r"(?<![\w.])(eval|exec|compile|getattr|__import__)\s*\(", code)
    assert "literal_eval" not in code
    assert "importlib" not in code


# --------------------------------------------------------------------------------------------
# Property tests

NAMES = ["a", "b", "c"]
KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
REGEX_ATOMS = ["a", "b", ".", "^", "$", "[ab]", r"\d", r"\.", "x*", "(a|b)", "c?", r"\w+"]
COMPARE_OPS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
FAST = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])


def _quote(text: str) -> str:
    # Deliberately not the module's own quoting: single quotes, so both styles are exercised.
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + escaped.replace("\n", "\\n").replace("\t", "\\t") + "'"


def render(node: Any) -> str:
    """An independent AST -> source renderer, minimal parentheses by precedence."""
    if isinstance(node, Literal):
        value = node.value
        if value is None or isinstance(value, bool):
            return {None: "null", True: "true", False: "false"}[value]
        return _quote(value) if isinstance(value, str) else repr(value)
    if isinstance(node, Path):
        out = node.segments[0]
        for segment in node.segments[1:]:
            if isinstance(segment, int):
                out += f"[{segment}]"
            elif re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", segment):
                out += "." + segment
            else:
                out += f"[{_quote(segment)}]"
        return out
    if isinstance(node, ListExpr):
        return "[" + ", ".join(_render_operand(item) for item in node.items) + "]"
    if isinstance(node, Compare):
        return f"{_render_operand(node.left)} {node.op} {_render_operand(node.right)}"
    if isinstance(node, Match):
        return f"{_render_operand(node.left)} {'!~' if node.negated else '=~'} '{node.pattern}'"
    if isinstance(node, Not):
        inner = render(node.operand)
        return "not " + (f"({inner})" if isinstance(node.operand, And | Or) else inner)
    word, weaker = (" and ", (And, Or)) if isinstance(node, And) else (" or ", (Or,))
    return word.join(
        f"({render(child)})" if isinstance(child, weaker) else render(child)
        for child in node.operands
    )


def _render_operand(node: Any) -> str:
    if isinstance(node, Literal | Path | ListExpr):
        return render(node)
    return f"({render(node)})"


def ast_depth(node: Any) -> int:
    children: tuple[Any, ...] = ()
    if isinstance(node, ListExpr):
        children = node.items
    elif isinstance(node, And | Or):
        children = node.operands
    elif isinstance(node, Compare):
        children = (node.left, node.right)
    elif isinstance(node, Match | Not):
        children = (node.left if isinstance(node, Match) else node.operand,)
    return 1 + max((ast_depth(child) for child in children), default=0)


def paths(
    names: st.SearchStrategy[str], keys: st.SearchStrategy[str], indexes: st.SearchStrategy[int]
) -> st.SearchStrategy[Path]:
    segment = st.one_of(keys, indexes)
    return st.builds(lambda first, rest: Path((first, *rest)), names, st.lists(segment, max_size=3))


LITERALS = st.builds(
    Literal,
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        # Quotes, backslashes and control characters, which plain st.text() rarely draws.
        st.text(st.sampled_from(["a", " ", "'", '"', "\\", "\n", "\t", "\r", "é"]), max_size=6),
    ),
)
REGEXES = st.lists(st.sampled_from(REGEX_ATOMS), min_size=1, max_size=4).map("".join)


def expressions(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        many = st.lists(children, min_size=2, max_size=3).map(tuple)
        return st.one_of(
            st.lists(children, max_size=3).map(lambda items: ListExpr(tuple(items))),
            st.builds(Compare, st.sampled_from(COMPARE_OPS), children, children),
            st.builds(
                lambda left, pattern, negated: Match(left, pattern, negated, re.compile(pattern)),
                children,
                REGEXES,
                st.booleans(),
            ),
            st.builds(Not, children),
            st.builds(And, many),
            st.builds(Or, many),
        )

    return st.recursive(leaves, extend, max_leaves=12)


WIDE_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda name: name not in KEYWORDS and name not in {"True", "False", "None"}
)
WIDE_KEYS = st.one_of(
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,4}", fullmatch=True),
    st.text(max_size=6).filter(lambda key: not key.startswith("_")),
)
WIDE_PATHS = paths(WIDE_NAMES, WIDE_KEYS, st.integers(0, 10**6))
# Few names and small indexes, so generated paths actually reach into generated traits.
NARROW_PATHS = paths(st.sampled_from(NAMES), st.sampled_from(NAMES), st.integers(0, 2))
# Paths twice: one_of picks branches about evenly, and paths are what reach the traits.
WIDE_EXPRESSIONS = expressions(st.one_of(LITERALS, WIDE_PATHS, WIDE_PATHS))
NARROW_EXPRESSIONS = expressions(st.one_of(LITERALS, NARROW_PATHS, NARROW_PATHS))


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # NaN and infinities too: traits are not guaranteed to be tidy
        st.text(max_size=6),
        st.sampled_from(["a", "b", "db12", ""]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=3), children, max_size=4),
    ),
    max_leaves=12,
)
TRAIT_MAPS = st.dictionaries(st.sampled_from(NAMES), JSON_VALUES, max_size=3)


@FAST
@given(WIDE_EXPRESSIONS)
def test_round_trip(node: Any) -> None:
    assume(ast_depth(node) < MAX_DEPTH // 2)
    source = render(node)
    assume(len(source) <= MAX_SOURCE_CHARS)
    assert parse(source).root == node


TOKEN_SOUP = [
    "a", "b.c", "x[0]", 'x["k"]', "_x", "==", "!=", "<", "<=", ">", ">=", "=~", "!~", "in",
    "not", "and", "or", "(", ")", "[", "]", ",", ".", "'s'", '"d"', "'\\q'", "'\\n'", "1",
    "-2", "3.5", "1e400", "true", "false", "null", "True", "'['", "'(?P'", "'a{2,1}'", "-",
    "=", "!", "'", '"', "\\", "()", "#", "é", "٣",
]  # fmt: skip


@FAST
@given(
    st.one_of(
        st.text(max_size=60),
        st.lists(st.sampled_from(TOKEN_SOUP), max_size=12).map(" ".join),
        st.lists(st.sampled_from(TOKEN_SOUP), max_size=12).map("".join),
    ),
    TRAIT_MAPS,
)
def test_arbitrary_text_only_raises_syntax_errors(source: str, traits: dict[str, Any]) -> None:
    try:
        condition = parse(source)
    except ConditionSyntaxError as exc:
        assert 0 <= exc.position <= len(source)
        return
    with contextlib.suppress(ConditionEvalError):
        assert type(condition.evaluate(traits)) is bool


@FAST
@given(NARROW_EXPRESSIONS, TRAIT_MAPS)
def test_arbitrary_traits_only_raise_eval_errors(node: Any, traits: dict[str, Any]) -> None:
    assume(ast_depth(node) < MAX_DEPTH // 2)
    condition = parse(render(node))
    with contextlib.suppress(ConditionEvalError):
        assert type(condition.evaluate(traits)) is bool


class Spy:
    """A trait value that records every way Python code could touch it."""

    log: list[str] = []  # class-level, read via the class so reading it does not record

    def __getattribute__(self, name: str) -> Any:
        Spy.log.append(f"getattribute {name}")
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:
        Spy.log.append(f"getattr {name}")
        raise AttributeError(name)


def _record(name: str, result: Any) -> Any:
    def method(self: Any, *args: Any) -> Any:
        Spy.log.append(name)
        return result() if callable(result) else result

    return method


# Each special method records its call, then answers something type-correct, so that a call we
# failed to prevent shows up in the log rather than as an unrelated TypeError.
for _name, _result in {
    "__eq__": NotImplemented, "__ne__": NotImplemented, "__lt__": NotImplemented,
    "__le__": NotImplemented, "__gt__": NotImplemented, "__ge__": NotImplemented,
    "__hash__": 0, "__bool__": True, "__len__": 0, "__iter__": lambda: iter(()),
    "__contains__": False, "__getitem__": None, "__index__": 0, "__int__": 0,
    "__float__": 0.0, "__str__": "<Spy>", "__repr__": "<Spy>", "__format__": "<Spy>",
}.items():  # fmt: skip
    setattr(Spy, _name, _record(_name, _result))


class SpyDict(dict):
    """A dict subclass: only plain dicts are indexed, so none of these may run."""

    def __getattribute__(self, name: str) -> Any:
        Spy.log.append(f"SpyDict.{name}")
        return super().__getattribute__(name)

    def __getitem__(self, key: Any) -> Any:
        Spy.log.append("SpyDict.__getitem__")
        return super().__getitem__(key)

    def __eq__(self, other: object) -> bool:
        Spy.log.append("SpyDict.__eq__")
        return False

    __hash__ = None


SPIES = st.one_of(st.builds(Spy), st.builds(lambda: SpyDict(a=1, b=[2])))
SPY_VALUES = st.recursive(
    st.one_of(SPIES, SPIES, st.none(), st.integers(0, 2), st.sampled_from(["a", ""])),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(NAMES), children, max_size=3),
    ),
    max_leaves=8,
)
# Every root name present and often a spy itself, so that paths reach spies, not null.
SPY_TRAITS = st.fixed_dictionaries(dict.fromkeys(NAMES, st.one_of(SPIES, SPY_VALUES)))
# Shallow expressions that put trait values straight into every operator; deep random trees
# mostly stop at a type error or a null before any operator sees a spy.
SPY_OPERANDS = st.one_of(
    st.sampled_from([Path((name,)) for name in NAMES]),
    NARROW_PATHS,
    LITERALS,
    st.builds(lambda path: ListExpr((path,)), NARROW_PATHS),
)
SPY_PROBES = st.one_of(
    SPY_OPERANDS,
    st.builds(Compare, st.sampled_from(COMPARE_OPS), SPY_OPERANDS, SPY_OPERANDS),
    st.builds(lambda left: Match(left, "a", False, re.compile("a")), SPY_OPERANDS),
    st.builds(Not, SPY_OPERANDS),
)
SPY_EXPRESSIONS = st.one_of(
    SPY_PROBES,
    st.builds(lambda left, right: And((left, right)), SPY_PROBES, SPY_PROBES),
    st.builds(lambda left, right: Or((left, right)), SPY_PROBES, SPY_PROBES),
)


@FAST
@given(SPY_EXPRESSIONS, SPY_TRAITS)
def test_evaluation_never_touches_trait_objects(node: Any, traits: dict[str, Any]) -> None:
    assume(ast_depth(node) < MAX_DEPTH // 2)
    condition = parse(render(node))
    Spy.log.clear()
    try:
        assert type(condition.evaluate(traits)) is bool
    except ConditionEvalError as exc:
        str(exc)  # building the message must not touch the objects either
    assert Spy.log == []


@pytest.mark.parametrize(
    "source",
    ["o", "o == 1", "1 in [o]", "o.x", "o[0]", 'o["x"]', "o < 1", '"x" in o', 'o =~ "x"', "o.a"],
)
def test_spy_objects_are_refused_not_called(source: str) -> None:
    traits = {"o": Spy(), "d": SpyDict(a=1)}
    for root in ("o", "d"):
        Spy.log.clear()
        try:
            result = parse(source.replace("o", root)).evaluate(traits)
        except ConditionEvalError as exc:
            assert "not a JSON value" in str(exc)
        else:
            assert result is False  # only a path *through* the object: null
        assert Spy.log == []


BOOLEAN_LEAVES = st.sampled_from([Path((name,)) for name in NAMES])
BOOLEAN_EXPRESSIONS = st.recursive(
    BOOLEAN_LEAVES,
    lambda children: st.one_of(
        st.builds(Not, children),
        st.builds(And, st.lists(children, min_size=2, max_size=4).map(tuple)),
        st.builds(Or, st.lists(children, min_size=2, max_size=4).map(tuple)),
    ),
    max_leaves=16,
)
PLAIN_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, 1.5, "", "x"]),
    st.lists(st.integers(0, 1), max_size=2),
    st.dictionaries(st.sampled_from(NAMES), st.integers(0, 1), max_size=1),
)


def reference(node: Any, traits: dict[str, Any]) -> bool:
    """The meaning of and/or/not, written as directly as Python allows."""
    if isinstance(node, Path):
        return bool(traits.get(node.segments[0]))
    if isinstance(node, Not):
        return not reference(node.operand, traits)
    results = [reference(child, traits) for child in node.operands]
    return all(results) if isinstance(node, And) else any(results)


@FAST
@given(
    BOOLEAN_EXPRESSIONS,
    st.dictionaries(st.sampled_from(NAMES), PLAIN_VALUES, max_size=len(NAMES)),
)
def test_boolean_operators_agree_with_reference(node: Any, traits: dict[str, Any]) -> None:
    assume(ast_depth(node) < MAX_DEPTH // 2)
    assert parse(render(node)).evaluate(traits) is reference(node, traits)
