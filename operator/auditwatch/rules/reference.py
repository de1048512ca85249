"""The rule language's meaning, one event at a time: the yardstick for the vectorised evaluator.

This is the straightforward reading of the language contract, kept deliberately simple so it
can be trusted by inspection; `evaluate.py` must give the same answer on every event (the tests
check that property on random rules and events). It also serves the evaluator's slow path: the
fields without a typed column (`requestObject...`) are tested per event with `value_test`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

from auditwatch import normalise, paths
from auditwatch.rules.ast import (
    ORDER_OPS,
    SET_OPS,
    STRING_ONLY_OPS,
    And,
    Compare,
    Exists,
    Expr,
    Field,
    Not,
    Op,
    Or,
    Scalar,
)

ValueTest = Callable[[Any], bool]
"""Whether one value a field resolved to satisfies a comparison."""

_NUMBER_OPS: dict[Op, Callable[[Any, Any], bool]] = {
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
}


def matches(expr: Expr, event: dict[str, Any]) -> bool:
    """Whether `event` satisfies `expr`."""
    if isinstance(expr, Compare):
        test = value_test(expr)
        return any(test(value) for value in field_values(expr.field, event))
    if isinstance(expr, Exists):
        return bool(field_values(expr.field, event))
    if isinstance(expr, Not):
        return not matches(expr.operand, event)
    if isinstance(expr, And):
        return all(matches(operand, event) for operand in expr.operands)
    if isinstance(expr, Or):
        return any(matches(operand, event) for operand in expr.operands)
    raise TypeError(f"not a rule expression: {expr!r}")


def filter_events(expr: Expr, events: Sequence[dict[str, Any]]) -> list[bool]:
    """`matches` for each event, in order."""
    return [matches(expr, event) for event in events]


def field_values(field: Field, event: dict[str, Any]) -> list[Any]:
    """Every non-null value `field` resolves to in `event` (arrays walked element by element).

    A field with a typed column is read the way the column holds it, so a value of the wrong
    JSON type (a `code` sent as text) is missing here exactly as it is null in the column.
    """
    typed = paths.typed_field(field.segments)
    if typed is None:
        return list(paths.walk(event, paths.event_path(field.segments)))
    return cell_values(normalise.typed_value(event, typed))


def cell_values(cell: Any) -> list[Any]:
    """The values a typed column cell holds: none for null, the non-null elements of a list."""
    if cell is None:
        return []
    if isinstance(cell, list):
        return [element for element in cell if element is not None]
    return [cell]


def value_test(compare: Compare) -> ValueTest:
    """The per-value predicate of a comparison (regexes compiled once, here)."""
    literal = compare.value
    if compare.op in SET_OPS:
        if not isinstance(literal, tuple):
            raise TypeError(f"{compare.op.value!r} needs a tuple of values, not {literal!r}")
        return _set_test(compare.op is Op.IN, literal, compare.ignore_case)
    if isinstance(literal, tuple):
        raise TypeError(f"{compare.op.value!r} needs a single value, not {literal!r}")
    return _scalar_test(compare.op, literal, compare.ignore_case)


def value_kind(value: Any) -> type | None:
    """The type class the language compares within: text, number (not bool), or bool."""
    if isinstance(value, bool):
        return bool
    if isinstance(value, int | float):
        return float
    if isinstance(value, str):
        return str
    return None


def _never(value: Any) -> bool:
    return False


def _set_test(is_in: bool, literals: tuple[Scalar, ...], ignore_case: bool) -> ValueTest:
    """`in`: equal to some element; `not in`: comparable with some element and equal to none.

    Like `!=`, `not in` only holds for values of a type the list could have matched, so
    `code not in ("a")` is false on a numeric code, the same as `code != "a"`.
    """
    equal_tests = [_scalar_test(Op.EQ, literal, ignore_case) for literal in literals]
    kinds = {value_kind(literal) for literal in literals}

    def is_member(value: Any) -> bool:
        return any(test(value) for test in equal_tests)

    if is_in:
        return is_member
    return lambda value: value_kind(value) in kinds and not is_member(value)


def _scalar_test(op: Op, literal: Scalar, ignore_case: bool) -> ValueTest:
    kind = value_kind(literal)
    if kind is str:
        assert isinstance(literal, str)
        return _text_test(op, literal, ignore_case)
    if kind is float and op not in STRING_ONLY_OPS:
        compare = _NUMBER_OPS[op]
        return lambda value: value_kind(value) is float and compare(value, literal)
    if kind is bool and op is Op.EQ:
        return lambda value: isinstance(value, bool) and value is literal
    if kind is bool and op is Op.NE:
        return lambda value: isinstance(value, bool) and value is not literal
    return _never


def _text_test(op: Op, literal: str, ignore_case: bool) -> ValueTest:
    if op in ORDER_OPS:
        return _never
    if op in (Op.REGEX, Op.NOT_REGEX):
        search = re.compile(literal, re.IGNORECASE if ignore_case else 0).search
        if op is Op.REGEX:
            return lambda value: isinstance(value, str) and search(value) is not None
        return lambda value: isinstance(value, str) and search(value) is None
    fold: Callable[[str], str] = str.casefold if ignore_case else str
    text = fold(literal)
    tests: dict[Op, Callable[[str], bool]] = {
        Op.EQ: lambda value: value == text,
        Op.NE: lambda value: value != text,
        Op.CONTAINS: lambda value: text in value,
        Op.NOT_CONTAINS: lambda value: text not in value,
        Op.STARTS_WITH: lambda value: value.startswith(text),
        Op.ENDS_WITH: lambda value: value.endswith(text),
    }
    test = tests[op]
    return lambda value: isinstance(value, str) and test(fold(value))
