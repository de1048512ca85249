"""The composite rule grammar: Parseable's rules unchanged, the extensions, positioned errors."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.sample_data import SAMPLES

from auditwatch.rules import ast
from auditwatch.rules.ast import And, Compare, Exists, Field, Not, Op, Or
from auditwatch.rules.errors import RuleError
from auditwatch.rules.parse import MAX_NESTING, parse_expression, parse_rule
from auditwatch.rules.printer import print_expression

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rules.md"


def cmp(field: str, op: str, value: Any, ignore_case: bool = False) -> Compare:
    """A comparison on a dotted field name (a name without dots is one segment)."""
    return Compare(Field(tuple(field.split("."))), Op(op), value, ignore_case)


def error_of(text: str) -> RuleError:
    with pytest.raises(RuleError) as caught:
        parse_expression(text)
    return caught.value


# --- Parseable's grammar, unchanged -------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["=", "!=", "=%", "!%", "~"])
def test_every_parseable_string_operator(symbol: str) -> None:
    assert parse_expression(f'user_username {symbol} "alice"') == cmp(
        "user_username", symbol, "alice"
    )


@pytest.mark.parametrize("symbol", ["=", "!=", "<", ">", "<=", ">="])
def test_every_parseable_number_operator_takes_digits(symbol: str) -> None:
    parsed = parse_expression(f"responseStatus_code {symbol} 403")
    assert parsed == cmp("responseStatus_code", symbol, 403)
    assert isinstance(parsed, Compare) and type(parsed.value) is int


def test_the_product_example_rule() -> None:
    text = (
        '(verb =% "list" or verb =% "get") and '
        '(objectRef_resource = "secrets" and user_username !% "authorized-user")'
    )
    assert parse_expression(text) == And(
        (
            Or((cmp("verb", "=%", "list"), cmp("verb", "=%", "get"))),
            cmp("objectRef_resource", "=", "secrets"),
            cmp("user_username", "!%", "authorized-user"),
        )
    )


def test_and_binds_tighter_than_or() -> None:
    a, b, c = cmp("a", "=", 1), cmp("b", "=", 2), cmp("c", "=", 3)
    assert parse_expression("a = 1 or b = 2 and c = 3") == Or((a, And((b, c))))
    assert parse_expression("a = 1 and b = 2 or c = 3") == Or((And((a, b)), c))
    assert parse_expression("(a = 1 or b = 2) and c = 3") == And((Or((a, b)), c))


@pytest.mark.parametrize(
    "text",
    [
        "a = 1 or b = 2 or c = 3",
        "a = 1 or (b = 2 or c = 3)",
        "(a = 1 or b = 2) or c = 3",
    ],
)
def test_or_chains_flatten_whatever_the_grouping(text: str) -> None:
    assert parse_expression(text) == Or((cmp("a", "=", 1), cmp("b", "=", 2), cmp("c", "=", 3)))


def test_and_chains_flatten_whatever_the_grouping() -> None:
    flat = And((cmp("a", "=", 1), cmp("b", "=", 2), cmp("c", "=", 3)))
    assert parse_expression("a = 1 and (b = 2 and c = 3)") == flat
    assert parse_expression("a = 1 and b = 2 and c = 3") == flat


def test_negated_group_and_plain_parentheses() -> None:
    assert parse_expression('!(verb = "get")') == Not(cmp("verb", "=", "get"))
    assert parse_expression('!( verb = "get" or verb = "list" )') == Not(
        Or((cmp("verb", "=", "get"), cmp("verb", "=", "list")))
    )
    assert parse_expression('!(!(verb = "get"))') == Not(Not(cmp("verb", "=", "get")))
    assert parse_expression('((verb = "get"))') == cmp("verb", "=", "get")


@pytest.mark.parametrize(
    "text",
    [
        'verb="get"',
        'verb  =  "get"',
        'verb\n=\n"get"',
        '  verb = "get"\n',
        '\tverb\t=\t"get"\t',
    ],
)
def test_whitespace_around_operators_is_optional(text: str) -> None:
    assert parse_expression(text) == cmp("verb", "=", "get")


@pytest.mark.parametrize("gap", [" ", "   ", "\n", "\t", " \r\n  "])
def test_any_whitespace_around_keywords(gap: str) -> None:
    text = f'verb = "get"{gap}and{gap}stage = "x"{gap}or{gap}level = "y"'
    assert parse_expression(text) == Or(
        (And((cmp("verb", "=", "get"), cmp("stage", "=", "x"))), cmp("level", "=", "y"))
    )


def test_string_escapes() -> None:
    parsed = parse_expression(r'f = "q\" b\\ s\/ n\n r\r t\t b\b f\f"')
    assert parsed == cmp("f", "=", 'q" b\\ s/ n\n r\r t\t b\b f\f')


def test_raw_line_breaks_inside_a_string_are_kept() -> None:
    assert parse_expression('f = "two\nlines"') == cmp("f", "=", "two\nlines")


@pytest.mark.parametrize(
    "name", ["objectRef_resource", "user_username", "x-1_y", "2fa", "-", "naïve", "日本"]
)
def test_identifiers_are_letters_digits_dashes_and_underscores(name: str) -> None:
    assert parse_expression(f"{name} = 1") == Compare(Field((name,)), Op.EQ, 1)


@pytest.mark.parametrize("word", ["and", "or", "not", "in", "exists", "true", "startswith"])
def test_a_keyword_is_still_a_field_name_where_parseable_allows_one(word: str) -> None:
    parsed = parse_expression(f'{word} = "x" and a = 1 or {word} != 2')
    assert parsed == Or(
        (And((cmp(word, "=", "x"), cmp("a", "=", 1))), Compare(Field((word,)), Op.NE, 2))
    )


# --- Extensions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("objectRef.resource = 1", cmp("objectRef.resource", "=", 1)),
        (
            'annotations["authorization.k8s.io/decision"] = "forbid"',
            Compare(Field(("annotations", "authorization.k8s.io/decision")), Op.EQ, "forbid"),
        ),
        ('["a.b"].c["d"] exists', Exists(Field(("a.b", "c", "d")))),
        ('["esc\\"aped"] exists', Exists(Field(('esc"aped',)))),
        ('verb in ("get", "list")', cmp("verb", "in", ("get", "list"))),
        ('verb not in ("get")', cmp("verb", "not in", ("get",))),
        ('verb not \n in("get")', cmp("verb", "not in", ("get",))),
        ('x in (1, -2.5, true, "s")', cmp("x", "in", (1, -2.5, True, "s"))),
        ('verb in ("GET"i, "List"i)', cmp("verb", "in", ("GET", "List"), True)),
        ('userAgent startswith "kubectl/"', cmp("userAgent", "startswith", "kubectl/")),
        ('userAgent endswith "b46a3f8"', cmp("userAgent", "endswith", "b46a3f8")),
        ("requestObject.spec exists", Exists(Field(("requestObject", "spec")))),
        ('not verb = "get"', Not(cmp("verb", "=", "get"))),
        ('not(verb = "get")', Not(cmp("verb", "=", "get"))),
        ('not not verb = "get"', Not(Not(cmp("verb", "=", "get")))),
        ("x = -1", cmp("x", "=", -1)),
        ("x > -1.5", cmp("x", ">", -1.5)),
        ("x <= 2.25", cmp("x", "<=", 2.25)),
        ("x = true", cmp("x", "=", True)),
        ("x != false", cmp("x", "!=", False)),
        ("x=true", cmp("x", "=", True)),
        ('verb = "GET"i', cmp("verb", "=", "GET", True)),
        ('verb ~ "^(get|list)$"i', cmp("verb", "~", "^(get|list)$", True)),
        ('verb !~ "^get"', cmp("verb", "!~", "^get")),
        ('x = "\\u00e9\\ud83d\\ude00"', cmp("x", "=", "é😀")),
        ('a = "x" and(b = "y")', And((cmp("a", "=", "x"), cmp("b", "=", "y")))),
        ('(a = "x")or(b = "y")', Or((cmp("a", "=", "x"), cmp("b", "=", "y")))),
        ("x = 99999999999999999999999", cmp("x", "=", 99999999999999999999999)),
    ],
)
def test_extensions(text: str, expected: ast.Expr) -> None:
    assert parse_expression(text) == expected


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("requestObject.data.* exists", ("requestObject", "data", "*")),
        ("spec.containers.*.image exists", ("spec", "containers", "*", "image")),
        ('a.*["k.j"] exists', ("a", "*", "k.j")),
        ("a.*.* exists", ("a", "*", "*")),
        ('annotations.* exists', ("annotations", "*")),
        # The bracketed spelling means the same: a key literally named `*` cannot be addressed.
        ('a["*"] exists', ("a", "*")),
        ('["*"].b exists', ("*", "b")),
    ],
)  # fmt: skip
def test_a_star_segment_stands_for_every_key(text: str, segments: tuple[str, ...]) -> None:
    assert parse_expression(text) == Exists(Field(segments))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'requestObject.data.* ~ "AKIA[0-9A-Z]{16}"',
            cmp("requestObject.data.*", "~", "AKIA[0-9A-Z]{16}"),
        ),
        ('a.*="x"', cmp("a.*", "=", "x")),
        ('a.*!~"x"', cmp("a.*", "!~", "x")),
        ('a.* in ("x", 1)', cmp("a.*", "in", ("x", 1))),
        ('a.* not in ("x")', cmp("a.*", "not in", ("x",))),
        ('a.* startswith "-----BEGIN"', cmp("a.*", "startswith", "-----BEGIN")),
        ("not a.* exists", Not(Exists(Field(("a", "*"))))),
        ("(a.* exists)", Exists(Field(("a", "*")))),
        ('a.* = "x" and b.* = "y"', And((cmp("a.*", "=", "x"), cmp("b.*", "=", "y")))),
    ],
)
def test_a_star_segment_takes_every_operator(text: str, expected: ast.Expr) -> None:
    assert parse_expression(text) == expected


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("*.a exists", 0, "expected a comparison"),  # a field starts with a name
        ("* = 1", 0, "expected a comparison"),
        ("a.** exists", 3, "expected an operator"),
        ("a*b = 1", 1, "expected an operator"),  # `*` is a whole segment, not a glob
        ("a.*b exists", 3, "expected an operator"),
        ("a.b* exists", 3, "expected an operator"),
        ("a. * exists", 1, "expected an operator"),
        ("a .* exists", 2, "expected an operator"),
        ('a.["*"] exists', 1, "expected an operator"),
        ("a.*exists", 3, "'exists' needs whitespace"),
        ('a.*in ("x")', 3, "'in' needs whitespace"),
    ],
)
def test_misplaced_stars_point_at_the_offending_column(
    text: str, position: int, message: str
) -> None:
    error = error_of(text)
    assert error.position == position
    assert message in error.message


def test_a_star_is_still_an_ordinary_character_inside_strings() -> None:
    assert parse_expression('requestObject.rules.verbs = "*"') == cmp(
        "requestObject.rules.verbs", "=", "*"
    )
    assert parse_expression('["a*b"] = "*"') == Compare(Field(("a*b",)), Op.EQ, "*")


def test_a_column_rule_on_a_star_field() -> None:
    rule = parse_rule("column", {"column": "requestObject.data.*", "value": "AKIA"})
    assert rule.condition == cmp("requestObject.data.*", "=%", "AKIA")


def test_not_binds_tighter_than_and() -> None:
    assert parse_expression("not a = 1 and b = 2") == And((Not(cmp("a", "=", 1)), cmp("b", "=", 2)))


def test_numbers_and_booleans_keep_their_types() -> None:
    parsed = parse_expression("x in (1, 1.0, true)")
    assert isinstance(parsed, Compare) and isinstance(parsed.value, tuple)
    assert [type(v) for v in parsed.value] == [int, float, bool]


# --- Rejected input, with the offending column ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ('verb == "get"', 5, "unknown operator '=='"),
        ('verb => "get"', 5, "unknown operator '=>'"),
        ("verb = 'get'", 7, "double quotes"),
        ("verb = get", 7, "expected a string, a number, true or false"),
        ("code =% 5", 8, "must be a string"),
        ("code ~ 5", 7, "must be a string"),
        ('code < "5"', 7, "must be a number"),
        ("code < true", 7, "must be a number"),
        ("a startswith 5", 13, "expected a string"),
        ('"get" = verb', 0, "expected a comparison"),
        ("", 0, "empty"),
        (" \n\t", 0, "empty"),
        ('(verb = "get"', 13, "expected 'and', 'or' or ')'"),
        ('((verb = "get")', 15, "expected 'and', 'or' or ')'"),
        ('verb = "get")', 12, "unmatched ')'"),
        ('verb = "get" stage', 13, "expected 'and', 'or' or the end of the rule"),
        ('verb = "get" && stage = "x"', 13, "expected 'and', 'or' or the end of the rule"),
        ('verb = "get" AND stage = "x"', 13, "expected 'and', 'or' or the end of the rule"),
        ('verb = "get" and', 16, "expected a comparison"),
        ('and verb = "get"', 4, "expected an operator"),
        ('verb = "get" or and', 19, "expected an operator"),
        ('a="x"and b="y"', 5, "'and' needs whitespace"),
        ('a = "x"or b = "y"', 7, "'or' needs whitespace"),
        ("a = 5and b = 1", 5, "'and' needs whitespace"),
        ("a = 1 and!(b = 2)", 6, "'and' needs whitespace"),
        ('a["k"]in ("x")', 6, "'in' needs whitespace"),
        ('a startswith"x"', 2, "'startswith' needs whitespace"),
        ("not!(a = 1)", 3, "'not' needs whitespace"),
        ("! (a = 1)", 0, "expected a comparison"),
        ("!()", 2, "expected a comparison"),
        ('verb = "get', 7, "unterminated string"),
        ('verb = "a\\x"', 9, "invalid escape '\\x'"),
        ('a["\\x"] = 1', 3, "invalid escape '\\x'"),
        ('verb = "get" and\n  ', 16, "expected a comparison"),
        ('verb = "\\u12"', 8, "four hex digits"),
        ('verb = "\\ud800"', 8, "unpaired surrogate"),
        ('verb = "\\udc00"', 8, "unpaired surrogate"),
        ('verb ~ "("', 7, "invalid regex"),
        ('verb = "x" or stage !~ "[a-"i', 23, "invalid regex"),
        ("code = 1.", 8, "expected 'and', 'or' or the end"),
        ("code = 1e5", 8, "expected 'and', 'or' or the end"),
        ("code = +1", 7, "expected a string, a number"),
        ("code = - 1", 7, "expected a string, a number"),
        ('verb = "x"ii', 10, "expected 'and', 'or' or the end"),
        ('verb = "x" I', 11, "expected 'and', 'or' or the end"),
        ("verb in ()", 9, "expected a string, a number"),
        ('verb in ("x",)', 13, "expected a string, a number"),
        ('verb in ("x" "y")', 13, "expected ',' or ')'"),
        ('verb in "x"', 8, "expected '('"),
        ('verb in ("x"i, "y")', 15, "case-insensitive"),
        ("verb exists 5", 12, "expected 'and', 'or' or the end"),
        ("a. b = 1", 1, "expected an operator"),
        ("code = 1" + "0" * 5000, 7, "number too long"),
        ("code = 1" + "0" * 400 + ".5", 7, "number too large"),
    ],
)
def test_rejected_input_points_at_the_offending_column(
    text: str, position: int, message: str
) -> None:
    error = error_of(text)
    assert error.position == position
    assert message in error.message
    assert str(error) == f"{error.message} at line 1, column {position + 1}"


def test_too_deep_nesting_is_a_rule_error_at_the_paren() -> None:
    ok = "(" * MAX_NESTING + "a = 1" + ")" * MAX_NESTING
    assert parse_expression(ok) == cmp("a", "=", 1)
    error = error_of("(" * (MAX_NESTING + 5) + "a = 1" + ")" * (MAX_NESTING + 5))
    assert error.position == MAX_NESTING
    assert "nested" in error.message


def test_parentheses_inside_strings_do_not_count_as_nesting() -> None:
    text = 'a = "' + "(" * 100 + '"'
    assert parse_expression(text) == cmp("a", "=", "(" * 100)


def test_a_long_chain_of_nots_is_a_rule_error_not_a_crash() -> None:
    assert "nested" in error_of("not " * 2000 + "a = 1").message


def test_text_that_is_not_a_string_is_a_rule_error() -> None:
    with pytest.raises(RuleError):
        parse_expression(42)  # type: ignore[arg-type]


# --- RuleError's presentation --------------------------------------------------------------------


def test_pretty_puts_a_caret_under_the_offending_column() -> None:
    error = error_of('verb = "get" and stage == "x"')
    assert error.pretty() == "\n".join(
        [
            'verb = "get" and stage == "x"',
            "                       ^",
            "unknown operator '==' at line 1, column 24",
        ]
    )


def test_multi_line_rules_report_line_and_column() -> None:
    text = 'verb = "get"\n\tand stage == "x"\n  or level = "y"'
    error = error_of(text)
    assert (error.line, error.column) == (2, 12)
    assert error.pretty().split("\n") == [
        'verb = "get"',
        '\tand stage == "x"',
        "\t          ^",
        "unknown operator '==' at line 2, column 12",
    ]


def test_expected_names_what_was_wanted() -> None:
    assert error_of('(verb = "get"').expected == "'and', 'or' or ')'"
    assert error_of("verb ~ 5").expected == "a string"
    assert error_of('verb ~ "("').expected is None


def test_rule_errors_survive_pickling() -> None:
    error = error_of('verb == "get"')
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.text, copy.position, copy.expected) == (
        error.message,
        error.text,
        error.position,
        error.expected,
    )


# --- parse_rule -----------------------------------------------------------------------------------


def test_parse_rule_composite() -> None:
    rule = parse_rule("composite", 'verb = "get"')
    assert rule == ast.Rule(cmp("verb", "=", "get"), repeats=1)


def test_parse_rule_column_from_a_mapping_and_from_json() -> None:
    config = {"column": "responseStatus_code", "operator": ">=", "value": 400, "repeats": 3}
    expected = ast.Rule(cmp("responseStatus_code", ">=", 400), repeats=3)
    assert parse_rule("column", config) == expected
    assert parse_rule("column", json.dumps(config)) == expected


@pytest.mark.parametrize(
    ("rule_type", "config", "message"),
    [
        ("regex", 'verb = "get"', "unknown rule type 'regex'"),
        ("Composite", 'verb = "get"', "unknown rule type"),
        ("composite", {"column": "verb"}, "is the rule text"),
        ("column", "verb = 1", "invalid JSON"),
    ],
)
def test_parse_rule_rejections(rule_type: str, config: Any, message: str) -> None:
    with pytest.raises(RuleError, match=re.escape(message)):
        parse_rule(rule_type, config)


# --- Properties -----------------------------------------------------------------------------------

_TOKENS = [
    "verb", "a.b", '["k"]', "=", "!=", "=%", "!%", "~", "!~", "<", "<=", ">", ">=", "==",
    '"x"', '"x"i', '"\\"', '"\\u00', '"', "'", "(", ")", "!(", "!", "and", "or", "not", "in",
    "not in", "startswith", "endswith", "exists", "true", "false", "1", "-2.5", ",", ".",
    "[", "]", "i", "\\", " ", " ", " ", "\n", "\t", ".*", "*", '["*"]',
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join),
    )
)
def test_any_text_parses_or_raises_a_positioned_rule_error(text: str) -> None:
    try:
        parsed = parse_expression(text)
    except RuleError as error:
        assert 0 <= error.position <= len(text)
        assert error.pretty().endswith(str(error))
    else:
        # Whatever parses prints back to text with the same meaning.
        assert parse_expression(print_expression(parsed)) == parsed


# --- The documented examples --------------------------------------------------------------------


def _documented_rules() -> list[str]:
    return re.findall(r"```rule\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)


def test_the_documentation_has_examples_and_all_of_them_parse() -> None:
    rules = _documented_rules()
    assert len(rules) >= 8
    for text in rules:
        parse_expression(text)


def _matches_in(sample: str, text: str) -> int:
    from auditwatch.rules.reference import matches

    expr = parse_expression(text)
    events = [json.loads(line) for line in (SAMPLES / sample).read_text().splitlines() if line]
    return sum(matches(expr, event) for event in events)


@pytest.mark.parametrize(
    ("sample", "text", "count"),
    [
        ("pod-exec.log", 'objectRef_resource = "pods" and objectRef_subresource = "exec"', 1),
        (
            "secret-recon-then-exec.log",
            'objectRef.resource = "pods" and objectRef.subresource in ("exec", "attach")',
            2,
        ),
        ("impersonation-and-403s.log", "responseStatus_code = 403", 11),
        ("secret-recon-then-exec.log", 'annotations.* = "forbid"', 2),
        (
            "secret-recon-then-exec.log",
            'annotations["authorization.k8s.io/decision"] = "forbid"',
            2,
        ),
        (
            "privileged-pod.log",
            'verb = "create" and objectRef.resource = "pods" and '
            "(requestObject.spec.containers.securityContext.privileged = true or "
            "requestObject.spec.initContainers.securityContext.privileged = true)",
            1,
        ),
    ],
)
def test_documented_detections_match_the_real_samples(sample: str, text: str, count: int) -> None:
    assert _matches_in(sample, text) == count


def test_the_not_contains_pitfall() -> None:
    """`!% "authorized-user"` is false for the unauthorized account: the name contains it."""
    from auditwatch.rules.reference import matches

    event = {
        "verb": "get",
        "objectRef": {"resource": "secrets"},
        "user": {"username": "system:serviceaccount:default:unauthorized-user"},
    }
    pitfall = parse_expression(
        'objectRef_resource = "secrets" and user_username !% "authorized-user"'
    )
    fixed = parse_expression(
        'objectRef_resource = "secrets" and '
        'user_username != "system:serviceaccount:default:authorized-user"'
    )
    assert not matches(pitfall, event)
    assert matches(fixed, event)


_SECRET_READ_BY_SA = (
    'objectRef.resource = "secrets" and verb in ("get", "list", "watch")\n'
    '  and user.username startswith "system:serviceaccount:"'
)
_WILDCARD_CLUSTERROLE = (
    'objectRef.resource = "clusterroles" and verb in ("create", "update", "patch")\n'
    '  and (requestObject.rules.verbs = "*" or requestObject.rules.resources = "*")'
)
_PRIVILEGED_POD = (
    'objectRef.resource = "pods" and verb = "create"\n'
    "  and (requestObject.spec.containers.securityContext.privileged = true\n"
    "       or requestObject.spec.initContainers.securityContext.privileged = true)"
)


_CONFIGMAP_CREDENTIALS = (
    'objectRef.resource = "configmaps" and verb in ("create", "update", "patch")\n'
    '  and (requestObject.data.* ~ "(AKIA|ASIA)[0-9A-Z]{16}"\n'
    '       or requestObject.data.* ~ "-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----"\n'
    '       or requestObject.data.* ~ "(passw(or)?d|passphrase)[ \\t]*[:=]"i\n'
    "       or requestObject.data.password exists)"
)


def _configmap(data: dict[str, str]) -> dict[str, Any]:
    configmap = {"resource": "configmaps"}
    return {"verb": "update", "objectRef": configmap, "requestObject": {"data": data}}


def _pod(containers: list[Any], init: list[Any]) -> dict[str, Any]:
    spec = {"containers": containers, "initContainers": init}
    return {"verb": "create", "objectRef": {"resource": "pods"}, "requestObject": {"spec": spec}}


def _clusterrole(rules: list[Any]) -> dict[str, Any]:
    return {
        "verb": "create",
        "objectRef": {"resource": "clusterroles"},
        "requestObject": {"rules": rules},
    }


@pytest.mark.parametrize(
    ("text", "event", "fires"),
    [
        (
            _SECRET_READ_BY_SA,
            {
                "verb": "list",
                "objectRef": {"resource": "secrets"},
                "user": {"username": "system:serviceaccount:ns1:sa1"},
            },
            True,
        ),
        (
            _SECRET_READ_BY_SA,
            {"verb": "list", "objectRef": {"resource": "secrets"}, "user": {"username": "alice"}},
            False,
        ),
        (
            _WILDCARD_CLUSTERROLE,
            _clusterrole([{"verbs": ["get"], "resources": ["pods"]}, {"verbs": ["*"]}]),
            True,
        ),
        (
            _WILDCARD_CLUSTERROLE,
            _clusterrole([{"verbs": ["get", "list"], "resources": ["pods", "secrets"]}]),
            False,
        ),
        (_CONFIGMAP_CREDENTIALS, _configmap({"s3.json": '{"id": "AKIAI44QH8DHBEXAMPLE"}'}), True),
        (_CONFIGMAP_CREDENTIALS, _configmap({"tls.key": "-----BEGIN EC PRIVATE KEY-----"}), True),
        (_CONFIGMAP_CREDENTIALS, _configmap({"app.env": "DB_USER=pay\nDB_PASSWORD=x\n"}), True),
        (_CONFIGMAP_CREDENTIALS, _configmap({"app.yaml": "gpg:\n  Passphrase:\tx\n"}), True),
        (_CONFIGMAP_CREDENTIALS, _configmap({"password": "hunter2"}), True),
        (_CONFIGMAP_CREDENTIALS, _configmap({"DB_PASSWORD": "hunter2"}), False),  # listed keys only
        (_CONFIGMAP_CREDENTIALS, _configmap({"ca.crt": "-----BEGIN CERTIFICATE-----\n"}), False),
        (_CONFIGMAP_CREDENTIALS, _configmap({"app.yaml": "passwordFile: /run/pw\n"}), False),
        (_CONFIGMAP_CREDENTIALS, _configmap({"LOG_LEVEL": "info", "KEY_ID": "AKIA"}), False),
        (_PRIVILEGED_POD, _pod([{"name": "a"}], [{"securityContext": {"privileged": True}}]), True),
        (
            _PRIVILEGED_POD,
            _pod([{"securityContext": {"privileged": False}}], [{"name": "init"}]),
            False,
        ),
    ],
)
def test_documented_detections_on_constructed_events(
    text: str, event: dict[str, Any], fires: bool
) -> None:
    from auditwatch.rules.reference import matches

    assert text in _documented_rules() or text + "\n" in _documented_rules()
    assert matches(parse_expression(text), event) is fires
