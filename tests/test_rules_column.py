"""Parseable's `type: column` rules: every operator spelling, defaults, and strict checking."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import pytest

from auditwatch.rules.ast import Compare, Field, Op, Rule
from auditwatch.rules.column import parse_column
from auditwatch.rules.errors import RuleError


def column_error(config: Any) -> RuleError:
    with pytest.raises(RuleError) as caught:
        parse_column(config)
    return caught.value


@pytest.mark.parametrize(
    ("operator", "op"),
    [
        ("=", Op.EQ),
        ("equalTo", Op.EQ),
        ("!=", Op.NE),
        ("notEqualTo", Op.NE),
        (">", Op.GT),
        ("greaterThan", Op.GT),
        (">=", Op.GE),
        ("greaterThanEquals", Op.GE),
        ("<", Op.LT),
        ("lessThan", Op.LT),
        ("<=", Op.LE),
        ("lessThanEquals", Op.LE),
    ],
)
def test_numeric_operators_by_symbol_and_name(operator: str, op: Op) -> None:
    config = {"column": "responseStatus_code", "operator": operator, "value": 403}
    assert parse_column(config) == Rule(Compare(Field(("responseStatus_code",)), op, 403))


@pytest.mark.parametrize(
    ("operator", "op"),
    [
        ("=", Op.EQ),
        ("exact", Op.EQ),
        ("!=", Op.NE),
        ("notExact", Op.NE),
        ("=%", Op.CONTAINS),
        ("contains", Op.CONTAINS),
        ("!%", Op.NOT_CONTAINS),
        ("notContains", Op.NOT_CONTAINS),
        ("~", Op.REGEX),
        ("regex", Op.REGEX),
    ],
)
def test_string_operators_by_symbol_and_name(operator: str, op: Op) -> None:
    config = {"column": "verb", "operator": operator, "value": "get"}
    assert parse_column(config) == Rule(Compare(Field(("verb",)), op, "get"))


def test_defaults_equal_for_numbers_contains_for_strings_and_one_repeat() -> None:
    assert parse_column({"column": "code", "value": 2.5}) == Rule(
        Compare(Field(("code",)), Op.EQ, 2.5), repeats=1
    )
    assert parse_column({"column": "verb", "value": "li"}) == Rule(
        Compare(Field(("verb",)), Op.CONTAINS, "li"), repeats=1
    )


def test_repeats_and_ignore_case_from_a_parseable_json_config() -> None:
    text = '{"column": "user_username", "operator": "notContains", "value": "Admin",'
    text += ' "repeats": 3, "ignoreCase": true}'
    assert parse_column(text) == Rule(
        Compare(Field(("user_username",)), Op.NOT_CONTAINS, "Admin", ignore_case=True), repeats=3
    )


def test_ignore_case_does_not_touch_a_numeric_rule() -> None:
    rule = parse_column({"column": "code", "value": 5, "ignoreCase": True})
    assert rule.condition == Compare(Field(("code",)), Op.EQ, 5, ignore_case=False)


def test_snake_case_ignore_case_is_rejected_with_the_right_spelling() -> None:
    error = column_error({"column": "verb", "value": "GET", "ignore_case": True})
    assert "ignoreCase" in error.message
    assert error.message.startswith("ignore_case:")
    assert error.text[error.position :].startswith('"ignore_case"')


@pytest.mark.parametrize(
    ("config", "key", "problem"),
    [
        ({"column": "verb", "value": "x", "repeats": 0}, "repeats", "must be >= 1"),
        ({"column": "verb", "value": "x", "repeats": -2}, "repeats", "must be >= 1"),
        ({"column": "verb", "value": "x", "repeats": 1.5}, "repeats", "must be an integer"),
        ({"column": "verb", "value": "x", "repeats": True}, "repeats", "must be an integer"),
        ({"column": "verb", "value": "x", "repeats": "2"}, "repeats", "must be an integer"),
        ({"column": "verb", "value": "x", "ignoreCase": "yes"}, "ignoreCase", "true or false"),
        ({"column": "verb", "value": "x", "colour": 1}, "colour", "unknown key"),
        ({"value": "x"}, "column", "non-empty string"),
        ({"column": "", "value": "x"}, "column", "non-empty string"),
        ({"column": 5, "value": "x"}, "column", "non-empty string"),
        ({"column": "a..b", "value": "x"}, "column", "not a field name"),
        ({"column": "verb"}, "value", "missing"),
        ({"column": "verb", "value": True}, "value", "string or a number"),
        ({"column": "verb", "value": None}, "value", "string or a number"),
        ({"column": "verb", "value": ["get"]}, "value", "string or a number"),
        ({"column": "code", "value": math.inf}, "value", "finite"),
        ({"column": "code", "value": 5, "operator": "contains"}, "operator", "does not apply"),
        ({"column": "verb", "value": "5", "operator": ">"}, "operator", "does not apply"),
        ({"column": "verb", "value": "x", "operator": "=="}, "operator", "unknown operator"),
        ({"column": "verb", "value": "x", "operator": 1}, "operator", "must be a string"),
        ({"column": "verb", "value": "(", "operator": "regex"}, "value", "invalid regex"),
        (
            {"column": "verb", "value": "[", "operator": "~", "ignoreCase": True},
            "value",
            "invalid regex",
        ),
    ],
)
def test_invalid_configs_name_the_key(config: dict[str, Any], key: str, problem: str) -> None:
    error = column_error(config)
    assert error.message.startswith(f"{key}: ")
    assert problem in error.message
    if f'"{key}"' in error.text:
        assert error.text[error.position :].startswith(f'"{key}"')


def test_a_regex_with_ignore_case_is_accepted() -> None:
    rule = parse_column(
        {"column": "verb", "operator": "regex", "value": "^GET$", "ignoreCase": True}
    )
    assert rule.condition == Compare(Field(("verb",)), Op.REGEX, "^GET$", ignore_case=True)


def test_invalid_json_points_at_the_json_error() -> None:
    error = column_error('{"column": "verb", "value": }')
    assert "invalid JSON" in error.message
    assert error.position == 28


def test_nan_in_json_is_not_a_number_to_compare_with() -> None:
    error = column_error('{"column": "code", "value": NaN}')
    assert error.position == 28
    assert "NaN" in error.message


def test_a_config_that_is_not_an_object() -> None:
    assert "object" in column_error(["verb", "=", "get"]).message
    assert "object" in column_error('"verb"').message


def test_yaml_values_without_a_json_form_are_rule_errors() -> None:
    """YAML gives dates and other non-JSON objects; they must not crash the error report."""
    error = column_error({"column": "stageTimestamp", "value": datetime.date(2024, 1, 1)})
    assert error.message == "value: must be a string or a number"
    assert "2024-01-01" in error.text


def test_flattened_names_stay_whole_and_dotted_names_split() -> None:
    decision = "annotations_authorization.k8s.io/decision"
    assert parse_column({"column": decision, "operator": "=", "value": "forbid"}).condition == (
        Compare(Field((decision,)), Op.EQ, "forbid")
    )
    assert parse_column({"column": "objectRef.resource", "value": "secrets"}).condition == (
        Compare(Field(("objectRef", "resource")), Op.CONTAINS, "secrets")
    )


def test_the_error_text_is_the_config_as_json() -> None:
    config = {"column": "verb", "value": "x", "repeats": 0}
    error = column_error(config)
    assert json.loads(error.text) == config
    shown, caret, message = error.pretty().splitlines()
    assert caret.index("^") == shown.index('"repeats"')
    assert message == f"repeats: must be >= 1 at line 1, column {shown.index('repeats')}"
