"""Printing rules: canonical text that always parses back to the same tree (unlike Parseable's)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auditwatch.rules import ast
from auditwatch.rules.ast import And, Compare, Exists, Field, Not, Op, Or
from auditwatch.rules.column import parse_column
from auditwatch.rules.parse import KEYWORDS, parse_expression
from auditwatch.rules.printer import print_expression


def cmp(field: str, op: Op, value: Any, ignore_case: bool = False) -> Compare:
    return Compare(Field(tuple(field.split("."))), op, value, ignore_case)


def typed(expr: ast.Expr) -> Any:
    """`expr` with every literal's type spelled out: `==` alone takes True for 1 and 1.0 for 1."""
    if isinstance(expr, Compare):
        values = expr.value if isinstance(expr.value, tuple) else (expr.value,)
        literals = [(type(value).__name__, repr(value)) for value in values]
        return ("compare", expr.field.segments, expr.op, literals, expr.ignore_case)
    if isinstance(expr, Exists):
        return ("exists", expr.field.segments)
    if isinstance(expr, Not):
        return ("not", typed(expr.operand))
    kind = "and" if isinstance(expr, And) else "or"
    return (kind, [typed(operand) for operand in expr.operands])


def round_trip(expr: ast.Expr) -> str:
    text = print_expression(expr)
    parsed = parse_expression(text)
    assert typed(parsed) == typed(expr), text
    return text


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        (cmp("verb", Op.EQ, "get"), 'verb = "get"'),
        (cmp("objectRef.resource", Op.NE, "secrets"), 'objectRef.resource != "secrets"'),
        (cmp("responseStatus_code", Op.GE, 400), "responseStatus_code >= 400"),
        (cmp("x", Op.LT, -1.5), "x < -1.5"),
        (cmp("x", Op.EQ, True), "x = true"),
        (cmp("verb", Op.CONTAINS, "GET", True), 'verb =% "GET"i'),
        (cmp("verb", Op.NOT_REGEX, "^g"), 'verb !~ "^g"'),
        (cmp("verb", Op.IN, ("get", 1, False)), 'verb in ("get", 1, false)'),
        (cmp("verb", Op.NOT_IN, ("a", "B", 2), True), 'verb not in ("a"i, "B"i, 2)'),
        (cmp("userAgent", Op.STARTS_WITH, "kubectl/"), 'userAgent startswith "kubectl/"'),
        (cmp("userAgent", Op.ENDS_WITH, "x"), 'userAgent endswith "x"'),
        (Exists(Field(("requestObject", "spec"))), "requestObject.spec exists"),
        (
            cmp("requestObject.data.*", Op.REGEX, "AKIA[0-9A-Z]{16}"),
            'requestObject.data.* ~ "AKIA[0-9A-Z]{16}"',
        ),
        (Not(Exists(Field(("annotations", "*")))), "!(annotations.* exists)"),
        (Not(cmp("verb", Op.EQ, "get")), '!(verb = "get")'),
        (
            And((Or((cmp("a", Op.EQ, 1), cmp("b", Op.EQ, 2))), cmp("c", Op.EQ, 3))),
            "(a = 1 or b = 2) and c = 3",
        ),
        (
            Or((And((cmp("a", Op.EQ, 1), cmp("b", Op.EQ, 2))), Not(cmp("c", Op.EQ, 3)))),
            "a = 1 and b = 2 or !(c = 3)",
        ),
    ],
)
def test_canonical_text(expr: ast.Expr, text: str) -> None:
    assert print_expression(expr) == text
    assert round_trip(expr) == text


@pytest.mark.parametrize(
    ("segments", "text"),
    [
        (("user_username",), "user_username"),
        (("requestObject", "spec", "hostNetwork"), "requestObject.spec.hostNetwork"),
        (("annotations", "authorization.k8s.io/decision"),
         'annotations["authorization.k8s.io/decision"]'),
        (("a b", "c"), '["a b"].c'),
        (("not",), '["not"]'),
        (("in", "not"), '["in"].not'),
        (("",), '[""]'),
        (('q"b\\',), '["q\\"b\\\\"]'),
        (("requestObject", "data", "*"), "requestObject.data.*"),
        (("a", "*", "b"), "a.*.b"),
        (("a", "*", "*"), "a.*.*"),
        (("a", "*", "k.j"), 'a.*["k.j"]'),
        (("*",), '["*"]'),  # a field cannot start with a bare `*`
        (("*", "*"), '["*"].*'),
        (("a", "*b"), 'a["*b"]'),  # only a whole `*` segment is the wildcard
        (("a", "**"), 'a["**"]'),
    ],
)  # fmt: skip
def test_fields_print_as_written(segments: tuple[str, ...], text: str) -> None:
    assert print_expression(Exists(Field(segments))) == f"{text} exists"
    round_trip(Exists(Field(segments)))


@pytest.mark.parametrize("op", [Op.NOT_IN, Op.IN])
@pytest.mark.parametrize("word", sorted(KEYWORDS))
def test_a_field_named_like_a_keyword_keeps_its_meaning(word: str, op: Op) -> None:
    """Bare, `not not in ("x")` would read as `not (not in ("x"))`."""
    round_trip(Compare(Field((word,)), op, ("x",)))
    round_trip(Not(Compare(Field((word,)), op, ("x",))))


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ('say "hi"', r'"say \"hi\""'),
        ("C:\\temp\\", r'"C:\\temp\\"'),
        ("a/b", '"a/b"'),
        ("two\nlines\r\t\b\f", r'"two\nlines\r\t\b\f"'),
        ("\x00\x1f\x7f\u200b\u2028", r'"\u0000\u001f\u007f\u200b\u2028"'),
        ("\U000e0001", r'"\udb40\udc01"'),
        ("é 日本 😀", '"é 日本 😀"'),
    ],
)
def test_strings_keep_every_character(value: str, literal: str) -> None:
    """Parseable's printer drops escapes, so saved rules with `"` or `\\` stop loading."""
    expr = cmp("f", Op.EQ, value)
    assert print_expression(expr) == f"f = {literal}"
    round_trip(expr)


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (0.1, "0.1"),
        (2.0, "2.0"),
        (-0.0, "-0.0"),
        (1e16, "10000000000000000.0"),
        (1e-7, "0.0000001"),
        (1.7976931348623157e308, "17976931348623157" + "0" * 292 + ".0"),
        (5e-324, "0." + "0" * 323 + "5"),
        (10**30, "1" + "0" * 30),
    ],
)
def test_numbers_print_exactly(value: float, literal: str) -> None:
    expr = cmp("x", Op.GT, value)
    assert print_expression(expr) == f"x > {literal}"
    round_trip(expr)


@pytest.mark.parametrize(
    "expr",
    [
        cmp("x", Op.EQ, float("nan")),
        cmp("x", Op.EQ, float("inf")),
        cmp("x", Op.EQ, 5, ignore_case=True),
        cmp("x", Op.IN, (1, 2), ignore_case=True),
        cmp("x", Op.LT, "5"),
        cmp("x", Op.LT, True),
        cmp("x", Op.CONTAINS, 5),
        cmp("x", Op.IN, ()),
        cmp("x", Op.IN, "abc"),
        cmp("x", Op.EQ, ("a",)),
        Exists(Field(())),
    ],
)
def test_trees_no_rule_text_can_express_are_refused(expr: ast.Expr) -> None:
    with pytest.raises(ValueError):
        print_expression(expr)


def test_a_column_rule_prints_as_composite_text() -> None:
    """How `auditwatch convert` can show a Parseable column rule in the composite form."""
    rule = parse_column(
        {"column": "user_username", "operator": "regex", "value": 'a"b', "ignoreCase": True}
    )
    assert print_expression(rule.condition) == r'user_username ~ "a\"b"i'


def test_printing_canonicalises_parseable_rules() -> None:
    text = '( verb =% "list"  or verb=%"get" )and(objectRef_resource="secrets")'
    assert print_expression(parse_expression(text)) == (
        '(verb =% "list" or verb =% "get") and objectRef_resource = "secrets"'
    )


# --- The round-trip property ---------------------------------------------------------------------

_segments = st.one_of(
    st.text(max_size=8),
    st.from_regex(r"[A-Za-z_][\w-]{0,6}", fullmatch=True),
    st.sampled_from(["verb", "objectRef_resource", "not", "and", "in", "a.b", "x-1", "-"]),
    st.sampled_from(["*", "*", "**", "*a", "a.*"]),  # the wildcard, and segments that are not it
)
_fields = st.lists(_segments, min_size=1, max_size=3).map(lambda s: Field(tuple(s)))
_numbers = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False))
_scalars = st.one_of(st.text(), _numbers, st.booleans())
_regexes = st.one_of(
    st.text(max_size=10).map(re.escape),
    st.sampled_from(["^get$", "a|b", "[0-9]+", r"\d{3}", "(?:x)?y", "^system:serviceaccount:"]),
)


@st.composite
def _compares(draw: st.DrawFn) -> Compare:
    field = draw(_fields)
    op = draw(st.sampled_from(list(Op)))
    value: Any
    if op in ast.SET_OPS:
        value = tuple(draw(st.lists(_scalars, min_size=1, max_size=4)))
        has_text = any(isinstance(v, str) for v in value)
    elif op in (Op.REGEX, Op.NOT_REGEX):
        value, has_text = draw(_regexes), True
    elif op in ast.STRING_ONLY_OPS:
        value, has_text = draw(st.text()), True
    elif op in ast.ORDER_OPS:
        value, has_text = draw(_numbers), False
    else:
        value = draw(_scalars)
        has_text = isinstance(value, str)
    return Compare(field, op, value, has_text and draw(st.booleans()))


_leaves = st.one_of(_compares(), _fields.map(Exists))
_exprs = st.recursive(
    _leaves,
    lambda children: st.one_of(
        children.map(Not),
        st.lists(children, min_size=2, max_size=3).map(ast.conjunction),
        st.lists(children, min_size=2, max_size=3).map(ast.disjunction),
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(_exprs)
def test_every_tree_prints_to_text_that_parses_back_to_it(expr: ast.Expr) -> None:
    text = round_trip(expr)
    assert parse_expression(text) == expr
    assert print_expression(parse_expression(text)) == text
