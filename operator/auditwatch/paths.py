"""Field names in rules and message templates, and what they point at in an audit event.

Two spellings reach the same value: dotted paths (`objectRef.resource`,
`requestObject.spec.hostNetwork`) and Parseable's flattened names (`objectRef_resource`). A
flattened name is matched against the typed columns of `schema.py` first (so `user_username` is
the `user.username` column); anything else is split on `_` and walked in the event. Arrays are
walked element by element: a path through a list yields the values of every element
(`requestObject.spec.containers.image` yields each image), and a `*` segment yields every value
of an object (`requestObject.data.*`: each value of a ConfigMap).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from auditwatch.rules.ast import ANY_KEY
from auditwatch.schema import TYPED_BY_COLUMN, TYPED_BY_PATH, TypedField


def split_name(name: str) -> tuple[str, ...]:
    """A template or CLI name (`a.b.c` or `a_b_c`) as the segments a rule would hold."""
    return tuple(name.split(".")) if "." in name else (name,)


def event_path(segments: Sequence[str]) -> tuple[str, ...]:
    """The key path in the event that rule segments mean (flattened names expanded)."""
    if len(segments) == 1 and "_" in segments[0]:
        typed = TYPED_BY_COLUMN.get(segments[0])
        if typed is not None:
            return typed.path
        return tuple(part for part in segments[0].split("_") if part)
    return tuple(segments)


def typed_field(segments: Sequence[str]) -> TypedField | None:
    """The typed column these segments name, if any."""
    return TYPED_BY_PATH.get(event_path(segments))


def walk(value: Any, path: Sequence[str]) -> Iterator[Any]:
    """Every value at `path` below `value`, descending into every element of a list."""
    if isinstance(value, list):
        for element in value:
            yield from walk(element, path)
        return
    if not path:
        if value is not None:
            yield value
        return
    if not isinstance(value, dict):
        return
    if path[0] == ANY_KEY:
        for child in value.values():
            yield from walk(child, path[1:])
    elif path[0] in value:
        yield from walk(value[path[0]], path[1:])


def lookup(event: dict[str, Any], name: str) -> list[Any]:
    """All values `name` (dotted or flattened) points at in `event`; empty when missing.

    A list at the end of the path contributes its elements, so `user.groups` yields each group.
    """
    return list(walk(event, event_path(split_name(name))))
