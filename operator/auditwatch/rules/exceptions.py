"""Exceptions as data: Falco-style tuples of fields and values, compiled into one expression.

An AuditAlert's `spec.exceptions` names the events it must not report, without touching its
rule text: each exception is a tuple of fields (`user.username`, `objectRef.namespace`) with a
list of value tuples, each field compared with an explicit operator (`=` by default). An event
is excepted when, for some exception and some of its value tuples, every field matches.

The result is an ordinary rule expression (`ast.Expr`), so the evaluation plan runs it in the
same pass as the rules, on the rows the rule matched, with its nodes shared across alerts
(`rules/plan.py`, `PlanAlert.unless`). Every problem is a `RuleError` on the text at fault,
with the path in the spec that holds it (`ExceptionError`), so a bad field or operator makes the
alert Invalid with a position, as a bad rule does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from auditwatch import paths
from auditwatch.rules import ast
from auditwatch.rules.errors import RuleError
from auditwatch.rules.parse import parse_expression
from auditwatch.schema import TYPED_BY_COLUMN

COMPARISONS: dict[str, ast.Op] = {
    "=": ast.Op.EQ,
    "in": ast.Op.IN,
    "startswith": ast.Op.STARTS_WITH,
    "endswith": ast.Op.ENDS_WITH,
    "contains": ast.Op.CONTAINS,
    "glob": ast.Op.REGEX,
}
"""The operators an exception may compare a field with (Falco's names; `glob`: `*` and `?`)."""

EVENT_KEYS: dict[str, frozenset[str] | None] = {
    "kind": frozenset(),
    "apiVersion": frozenset(),
    "level": frozenset(),
    "auditID": frozenset(),
    "stage": frozenset(),
    "requestURI": frozenset(),
    "verb": frozenset(),
    "user": frozenset({"username", "uid", "groups", "extra"}),
    "impersonatedUser": frozenset({"username", "uid", "groups", "extra"}),
    "sourceIPs": frozenset(),
    "userAgent": frozenset(),
    "objectRef": frozenset(
        {
            "resource",
            "namespace",
            "name",
            "uid",
            "apiGroup",
            "apiVersion",
            "resourceVersion",
            "subresource",
        }
    ),
    "responseStatus": frozenset({"code", "status", "reason", "message", "metadata", "details"}),
    "requestObject": None,
    "responseObject": None,
    "requestReceivedTimestamp": frozenset(),
    "stageTimestamp": frozenset(),
    "annotations": None,
}
"""The keys of an audit.k8s.io Event, and the keys below each that are fixed (None: free, as
in the objects sent, `extra` and `annotations`). A field outside them is a typo."""


class ExceptionError(Exception):
    """A problem in `spec.exceptions`: where (`spec.exceptions["x"].fields[1]`) and what."""

    def __init__(self, where: str, error: RuleError) -> None:
        super().__init__(f"{where}: {error}")
        self.where = where
        self.error = error


@dataclass(frozen=True)
class ExceptionSpec:
    """One named exception: fields, how each is compared, and the value tuples excepted."""

    name: str
    fields: tuple[str, ...]
    comps: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]


def parse_field(text: str) -> ast.Field:
    """`text` as a rule field naming a part of an audit event; RuleError (with the column) if
    it is not a field or names nothing an audit event has."""
    if not isinstance(text, str) or not text:
        raise RuleError("a field name is needed", text=str(text), position=0)
    try:
        parsed = parse_expression(f"{text} exists")
    except RuleError as error:
        message = f"not a field name ({error.message})"
        raise RuleError(message, text=text, position=error.position) from None
    if not isinstance(parsed, ast.Exists):
        raise RuleError("expected one field name", text=text, position=0)
    _check_known(parsed.field, text)
    return parsed.field


def _check_known(field: ast.Field, text: str) -> None:
    if len(field.segments) == 1 and field.segments[0] in TYPED_BY_COLUMN:
        return
    path = paths.event_path(field.segments)
    if path[0] not in EVENT_KEYS:
        known = ", ".join(sorted(EVENT_KEYS))
        raise RuleError(
            f"unknown field {path[0]!r}: an audit event has {known}", text=text, position=0
        )
    fixed = EVENT_KEYS[path[0]]
    if fixed and len(path) > 1 and path[1] not in fixed:
        offset = text.find(path[1])
        raise RuleError(
            f"unknown field {path[0]}.{path[1]}: {path[0]} has {', '.join(sorted(fixed))}",
            text=text,
            position=max(offset, 0),
        )


def compile_exceptions(exceptions: Sequence[ExceptionSpec], where: str) -> ast.Expr | None:
    """The events any of `exceptions` excepts, as one expression (None when there are none).

    `where` is the path of the exceptions in the resource (`spec.exceptions`).
    """
    branches = [_compile_one(exception, f'{where}["{exception.name}"]') for exception in exceptions]
    found = [branch for branch in branches if branch is not None]
    return ast.disjunction(found) if found else None


def _compile_one(exception: ExceptionSpec, where: str) -> ast.Expr | None:
    if not exception.fields:
        raise ExceptionError(
            f"{where}.fields", RuleError("list at least one field", text="", position=0)
        )
    comps = exception.comps or ("=",) * len(exception.fields)
    if len(comps) != len(exception.fields):
        message = f"{len(comps)} operator(s) for {len(exception.fields)} field(s)"
        raise ExceptionError(f"{where}.comps", RuleError(message, text="", position=0))
    fields = []
    for index, text in enumerate(exception.fields):
        try:
            fields.append(parse_field(text))
        except RuleError as error:
            raise ExceptionError(f"{where}.fields[{index}]", error) from None
    ops = []
    for index, comp in enumerate(comps):
        if comp not in COMPARISONS:
            known = ", ".join(COMPARISONS)
            problem = RuleError(f"unknown operator {comp!r} (use {known})", text=comp, position=0)
            raise ExceptionError(f"{where}.comps[{index}]", problem)
        ops.append(comp)
    tuples = []
    for row, values in enumerate(exception.values):
        if len(values) != len(fields):
            message = f"{len(values)} value(s) for {len(fields)} field(s)"
            problem = RuleError(message, text=repr(list(values)), position=0)
            raise ExceptionError(f"{where}.values[{row}]", problem)
        tests: list[ast.Expr] = [
            _compare(field, comp, value, f"{where}.values[{row}][{column}]")
            for column, (field, comp, value) in enumerate(zip(fields, ops, values, strict=True))
        ]
        tuples.append(ast.conjunction(tests))
    return ast.disjunction(tuples) if tuples else None


def _compare(field: ast.Field, comp: str, value: Any, where: str) -> ast.Compare:
    op = COMPARISONS[comp]
    if op is ast.Op.IN:
        if not isinstance(value, list) or not value or not all(map(_is_scalar, value)):
            raise _value_error(where, value, "'in' takes a non-empty list of values")
        return ast.Compare(field, op, tuple(value))
    if not _is_scalar(value):
        raise _value_error(where, value, f"{comp!r} takes one value (a string, number or bool)")
    if comp != "=" and not isinstance(value, str):
        raise _value_error(where, value, f"{comp!r} compares text: the value must be a string")
    if comp == "glob":
        return ast.Compare(field, op, glob_pattern(value))
    return ast.Compare(field, op, value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _value_error(where: str, value: Any, message: str) -> ExceptionError:
    return ExceptionError(where, RuleError(message, text=repr(value), position=0))


def glob_pattern(glob: str) -> str:
    """A shell glob (`*` any text, `?` one character) as a regex matching the whole value."""
    parts = ("[^\n]*" if char == "*" else "." if char == "?" else re.escape(char) for char in glob)
    return r"\A" + "".join(parts) + r"\Z"


def exception_specs(exceptions: Mapping[str, Any]) -> list[ExceptionSpec]:
    """`spec.exceptions` entries holding fields (the schema checked their shapes)."""
    return [
        ExceptionSpec(
            name,
            tuple(entry["fields"]),
            tuple(entry.get("comps", ())),
            tuple(tuple(values) for values in entry.get("values", ())),
        )
        for name, entry in sorted(exceptions.items())
        if "fields" in entry
    ]
