"""Parseable's `type: column` rule config as a syntax tree.

A column rule is one comparison plus `repeats`. The config is checked strictly: Parseable
silently ignores keys it does not know (so `ignore_case` in snake_case quietly made a rule
case-sensitive); here every unknown key is an error that names it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from auditwatch import paths
from auditwatch.rules import ast
from auditwatch.rules.errors import RuleError, regex_problem

_NUMBER_OPERATORS: dict[str, ast.Op] = {
    "=": ast.Op.EQ,
    "equalTo": ast.Op.EQ,
    "!=": ast.Op.NE,
    "notEqualTo": ast.Op.NE,
    ">": ast.Op.GT,
    "greaterThan": ast.Op.GT,
    ">=": ast.Op.GE,
    "greaterThanEquals": ast.Op.GE,
    "<": ast.Op.LT,
    "lessThan": ast.Op.LT,
    "<=": ast.Op.LE,
    "lessThanEquals": ast.Op.LE,
}
_STRING_OPERATORS: dict[str, ast.Op] = {
    "=": ast.Op.EQ,
    "exact": ast.Op.EQ,
    "!=": ast.Op.NE,
    "notExact": ast.Op.NE,
    "=%": ast.Op.CONTAINS,
    "contains": ast.Op.CONTAINS,
    "!%": ast.Op.NOT_CONTAINS,
    "notContains": ast.Op.NOT_CONTAINS,
    "~": ast.Op.REGEX,
    "regex": ast.Op.REGEX,
}
_KEYS = ("column", "operator", "value", "repeats", "ignoreCase")


def parse_column(config: str | Mapping[str, Any]) -> ast.Rule:
    """A column config (a mapping, or its JSON text) as `Rule(Compare, repeats)`."""
    if isinstance(config, str):
        text = config
        try:
            loaded = json.loads(config, parse_constant=_reject_constant)
        except json.JSONDecodeError as error:
            raise RuleError(f"invalid JSON: {error.msg}", text=text, position=error.pos) from None
        except _NotANumber as error:
            position = text.find(error.name)
            raise RuleError(str(error), text=text, position=max(position, 0)) from None
    else:
        loaded = config
        text = _as_text(config)
    return _Column(loaded, text).rule()


class _NotANumber(ValueError):
    """JSON's NaN / Infinity extensions, which no event value can be compared with."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not a number a rule can compare with")
        self.name = name


def _reject_constant(name: str) -> Any:
    raise _NotANumber(name)


def _as_text(config: Any) -> str:
    """The config as the user would recognise it, for error carets."""
    try:
        return json.dumps(config, default=str, ensure_ascii=False)
    except (TypeError, ValueError):  # non-string keys or a self-referencing YAML anchor
        return repr(config)


class _Column:
    """One config being checked; errors point at the offending key in `text`."""

    def __init__(self, config: Any, text: str) -> None:
        self.config = config
        self.text = text

    def error(self, key: str, problem: str) -> RuleError:
        position = self.text.find(json.dumps(key))
        return RuleError(f"{key}: {problem}", text=self.text, position=max(position, 0))

    def rule(self) -> ast.Rule:
        if not isinstance(self.config, Mapping):
            raise RuleError(
                "a column rule's config is an object with column, operator, value, "
                "repeats and ignoreCase",
                text=self.text,
                position=0,
            )
        for key in self.config:
            if key == "ignore_case":
                raise self.error(key, "use ignoreCase (camelCase), as Parseable's API spells it")
            if key not in _KEYS:
                raise self.error(str(key), f"unknown key (known keys: {', '.join(_KEYS)})")
        field = self.field()
        value = self.value()
        ignore_case = self.ignore_case()
        op = self.operator(value)
        if op is ast.Op.REGEX:
            problem = regex_problem(str(value), ignore_case)
            if problem is not None:
                raise self.error("value", problem)
        condition = ast.Compare(field, op, value, ignore_case and isinstance(value, str))
        return ast.Rule(condition, self.repeats())

    def field(self) -> ast.Field:
        column = self.config.get("column")
        if not isinstance(column, str) or not column:
            raise self.error("column", "must be a field name (a non-empty string)")
        # Parseable's flattened names may hold dots from the event's own keys
        # (annotations_authorization.k8s.io/decision), so only an `_`-free name is split.
        segments = (column,) if "_" in column else paths.split_name(column)
        if not all(segments):
            raise self.error("column", f"{column!r} is not a field name")
        return ast.Field(segments)

    def value(self) -> str | int | float:
        if "value" not in self.config:
            raise self.error("value", "missing")
        value = self.config["value"]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error("value", "must be a string or a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error("value", "must be a finite number")
        return value

    def operator(self, value: str | int | float) -> ast.Op:
        name = self.config.get("operator")
        table, kind, other = (
            (_STRING_OPERATORS, "a string", _NUMBER_OPERATORS)
            if isinstance(value, str)
            else (_NUMBER_OPERATORS, "a number", _STRING_OPERATORS)
        )
        if name is None:
            return ast.Op.CONTAINS if isinstance(value, str) else ast.Op.EQ
        if not isinstance(name, str):
            raise self.error("operator", "must be a string")
        if name in table:
            return table[name]
        if name in other:
            raise self.error("operator", f"{name!r} does not apply to {kind} value")
        raise self.error(
            "operator", f"unknown operator {name!r} for {kind} value (known: {', '.join(table)})"
        )

    def repeats(self) -> int:
        repeats = self.config.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int):
            raise self.error("repeats", "must be an integer")
        if repeats < 1:
            raise self.error("repeats", "must be >= 1")
        return repeats

    def ignore_case(self) -> bool:
        ignore_case = self.config.get("ignoreCase", False)
        if not isinstance(ignore_case, bool):
            raise self.error("ignoreCase", "must be true or false")
        return ignore_case
