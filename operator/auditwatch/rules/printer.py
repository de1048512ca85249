"""A syntax tree back to composite rule text that parses to the same tree.

Used wherever a rule is shown or stored as text (status, `convert`, `lint`): unlike Parseable's
printer, which drops escapes so saved rules with `"` or `\\` stop loading, every value here
survives the round trip `parse_expression(print_expression(e)) == e`.
"""

from __future__ import annotations

import decimal
import math

from auditwatch.rules import ast
from auditwatch.rules.parse import IDENT, KEYWORDS

_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}


def print_expression(expr: ast.Expr) -> str:
    """Canonical text of `expr`; ValueError for a tree no rule text can produce."""
    if isinstance(expr, ast.Compare):
        return _compare(expr)
    if isinstance(expr, ast.Exists):
        return f"{_field(expr.field)} exists"
    if isinstance(expr, ast.Not):
        return f"!({print_expression(expr.operand)})"
    if isinstance(expr, ast.And):
        return " and ".join(
            f"({print_expression(operand)})"
            if isinstance(operand, ast.Or)
            else print_expression(operand)
            for operand in expr.operands
        )
    if isinstance(expr, ast.Or):
        return " or ".join(print_expression(operand) for operand in expr.operands)
    raise ValueError(f"not a rule expression: {expr!r}")


def _field(field: ast.Field) -> str:
    """Segments as written: IDENTs bare, dotted; others (and a leading keyword) as ["..."]."""
    if not field.segments:
        raise ValueError("a field needs at least one segment")
    first, *rest = field.segments
    parts = [first if _is_ident(first) and first not in KEYWORDS else f"[{_string(first)}]"]
    parts.extend(
        f".{segment}" if _is_ident(segment) or segment == ast.ANY_KEY else f"[{_string(segment)}]"
        for segment in rest
    )
    return "".join(parts)


def _is_ident(segment: str) -> bool:
    return IDENT.fullmatch(segment) is not None


def _compare(compare: ast.Compare) -> str:
    field = _field(compare.field)
    op = compare.op
    if op in ast.SET_OPS:
        if not isinstance(compare.value, tuple) or not compare.value:
            raise ValueError(f"'{op.value}' needs a non-empty tuple of values: {compare!r}")
        if compare.ignore_case and not any(isinstance(v, str) for v in compare.value):
            raise ValueError(f"ignore_case needs a string value: {compare!r}")
        values = ", ".join(_scalar(value, compare.ignore_case) for value in compare.value)
        return f"{field} {op.value} ({values})"
    value = compare.value
    if isinstance(value, tuple):
        raise ValueError(f"'{op.value}' needs a single value: {compare!r}")
    if op in ast.STRING_ONLY_OPS and not isinstance(value, str):
        raise ValueError(f"'{op.value}' needs a string value: {compare!r}")
    if op in ast.ORDER_OPS and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"'{op.value}' needs a number: {compare!r}")
    if compare.ignore_case and not isinstance(value, str):
        raise ValueError(f"ignore_case needs a string value: {compare!r}")
    return f"{field} {op.value} {_scalar(value, compare.ignore_case)}"


def _scalar(value: ast.Scalar, ignore_case: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value) + ("i" if ignore_case else "")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    raise ValueError(f"not a rule value: {value!r}")


def _float(value: float) -> str:
    """The shortest digits that read back as exactly `value`, without an exponent."""
    if not math.isfinite(value):
        raise ValueError(f"rules have no spelling for {value!r}")
    text = repr(value)
    if "e" in text:
        text = format(decimal.Decimal(text), "f")
    return text if "." in text else f"{text}.0"


def _string(value: str) -> str:
    """A double-quoted literal: JSON escapes; anything unprintable as \\uXXXX, to stay visible."""
    escaped = []
    for char in value:
        if char in _SHORT_ESCAPES:
            escaped.append(_SHORT_ESCAPES[char])
        elif char.isprintable():
            escaped.append(char)
        elif ord(char) > 0xFFFF:  # beyond four hex digits: a UTF-16 surrogate pair, as JSON does
            code = ord(char) - 0x10000
            escaped.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            escaped.append(f"\\u{ord(char):04x}")
    return '"' + "".join(escaped) + '"'
