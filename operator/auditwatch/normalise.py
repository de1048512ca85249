"""Normalise decoded audit events into one Arrow batch with the stable schema of `schema.py`.

Typed columns come from one `pa.array` call converting the event dicts to a struct in C++, not
from Python code per event, because this runs on every batch the receiver accepts. They follow
one rule, `typed_value`, so the vectorised rule evaluator (typed columns) and the
per-event reference evaluator (`typed_value`) agree on every event, type clashes included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from auditwatch import exactjson
from auditwatch.decode import DecodeError
from auditwatch.schema import (
    EVENT_JSON,
    EVENT_SCHEMA,
    TIMESTAMP,
    TYPED_BY_COLUMN,
    TYPED_FIELDS,
    TypedField,
)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

TIME_KEYS = ("stageTimestamp", "requestReceivedTimestamp", "timestamp")
"""Where the event time is read from, in order of preference (`timestamp` is pre-v1)."""

_RFC3339 = (
    r"^\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])[T ]"
    r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
)
"""RFC 3339 date-times (upper-case `T` or a space, `Z` or an offset). Arrow's own ISO 8601
parser is laxer (`+0200`), so strings are checked against this first and every batch parses the
same string the same way."""

_BEYOND_MICROSECONDS = r"(\.\d{6})\d+"


@dataclass
class EventBatch:
    """A batch of audit events: the Arrow table (schema.EVENT_SCHEMA) and the parsed events.

    `events[i]` is row i of `table` as the dict the sender sent. The decoder already holds these
    dicts, so they are kept rather than parsed again; a batch built by the fast path
    (columnar.py), read back from storage or handed over by a decoding worker parses them lazily
    from the `event` column: all at once through `events`, or only the rows asked for through
    `event(i)`.
    """

    table: pa.Table
    _events: list[dict[str, Any]] | None = field(default=None, repr=False)
    staged: pa.Buffer | None = field(default=None, repr=False, kw_only=True)
    """The whole table as the store's staging message (`store.wal.batch_message`), when the
    decoding worker process made it: the store then only has to write it."""
    _parsed: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    annotations_complete: bool = field(default=False, kw_only=True)
    """Whether the `annotations` column holds every event's annotations: null there is an event
    with none (missing or null), never one whose `annotations` is something else than an
    object, which only its `event` text holds. The rule evaluator then reads annotations from
    the column alone, without searching the texts of the rows without a map."""
    segment: str | None = field(default=None, repr=False, kw_only=True)
    """The staging segment (stem) the store wrote these events to, on a batch `Store.append`
    returned: alert counts are kept per segment so a crash can recount (engine.py)."""

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def events(self) -> list[dict[str, Any]]:
        if self._events is None:
            self._events = [parse_event(text) for text in self.table.column(EVENT_JSON).to_pylist()]
        return self._events

    def event(self, row: int) -> dict[str, Any]:
        """Row `row` as the sender's dict, parsing only that row when the batch holds none."""
        if self._events is not None:
            return self._events[row]
        parsed = self._parsed.get(row)
        if parsed is None:
            parsed = self._parsed[row] = parse_event(self.table.column(EVENT_JSON)[row].as_py())
        return parsed

    def parsed_event(self, row: int) -> dict[str, Any] | None:
        """Row `row`'s event if the batch holds it parsed already, else None (nothing parsed)."""
        if self._events is not None:
            return self._events[row]
        return self._parsed.get(row)

    def filter(self, mask: pa.BooleanArray | pa.ChunkedArray) -> EventBatch:
        """The rows where mask is true, events included (null counts as false)."""
        indices = pc.indices_nonzero(pc.fill_null(mask, False))
        table = self.table.take(indices)
        events = None if self._events is None else [self._events[i] for i in indices.to_pylist()]
        return EventBatch(table, events, annotations_complete=self.annotations_complete)

    @classmethod
    def concat(cls, batches: Sequence[EventBatch]) -> EventBatch:
        """One batch of all rows in order; events stay parsed only if every batch has them."""
        if not batches:
            return EventBatch(EVENT_SCHEMA.empty_table(), [])
        table = pa.concat_tables([batch.table for batch in batches])
        complete = all(batch.annotations_complete for batch in batches)
        if any(batch._events is None for batch in batches):
            return EventBatch(table, annotations_complete=complete)
        events = [event for batch in batches for event in batch.events]
        return EventBatch(table, events, annotations_complete=complete)


def parse_event(text: str) -> dict[str, Any]:
    """A stored `event` text as the event, every number as exact as its text (exactjson.py).

    The fast path (columnar.py) keeps the sender's bytes, which msgspec checked as JSON without
    reading every number: one beyond a double's range (1e999) or 64 bits must read back too.
    """
    event: dict[str, Any] = exactjson.loads(text)
    return event


def typed_value(event: dict[str, Any], typed: TypedField) -> Any:
    """The value of `typed`'s column for this event: None when missing or of another JSON type.

    Strings hold only JSON strings, int64 only JSON integers in range (a boolean or 200.0 is
    not one), lists only arrays (an element that is not a string is None), and annotations only
    objects: each key is kept, a value that is not a string becomes None, so `exists` still sees
    the key while every comparison on its value is false.
    """
    value: Any = event
    for key in typed.path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return _CONFORM[column_kind(typed.type)](value)


def normalise(events: list[dict[str, Any]], received_at: datetime) -> EventBatch:
    """Build the batch for events received at `received_at` (UTC; a naive time is taken as UTC).

    Every event must be JSON-serialisable (what the decoder returns always is); a value that
    does not fit its typed column is null there and intact in `event`, never an error. An event
    nesting deeper than `exactjson.MAX_DEPTH` raises DecodeError (the receiver's 400).
    """
    try:
        texts = list(map(orjson.dumps, events))
    except orjson.JSONEncodeError:
        raise _unwritable(events) from None
    event_json = pa.array(texts, pa.string())
    values = _PathValues(events)
    leaves = _leaf_columns(values)
    table = assemble(
        [leaves[f.path] for f in TYPED_FIELDS],
        [leaves[(key,)] for key in TIME_KEYS],
        received_at,
        event_json,
    )
    annotations = values.at(TYPED_BY_COLUMN["annotations"].path)
    complete = all(isinstance(found, dict | None) for found in annotations)
    return EventBatch(table, events, annotations_complete=complete)


def _unwritable(events: list[dict[str, Any]]) -> DecodeError:
    """The error naming the first event orjson cannot write back (only nesting, in practice)."""
    for index, event in enumerate(events):
        try:
            orjson.dumps(event)
        except orjson.JSONEncodeError as error:
            if "Recursion" in str(error):
                return DecodeError(
                    f"event {index} nests deeper than {exactjson.MAX_DEPTH} levels (the limit)"
                )
            return DecodeError(f"event {index} cannot be kept: {error}")
    raise AssertionError("orjson refused the batch but none of its events")


def assemble(
    typed: list[pa.Array], times: list[pa.Array], received_at: datetime, event_json: pa.Array
) -> pa.Table:
    """The batch's table from its parts: the typed columns (in TYPED_FIELDS order), the
    candidate event times (string columns, in TIME_KEYS order) and the events' JSON text."""
    columns = [
        *typed,
        _event_time(times),
        pa.repeat(pa.scalar(_as_utc(received_at), TIMESTAMP), len(event_json)),
        event_json,
    ]
    return pa.Table.from_arrays(columns, schema=EVENT_SCHEMA)


def from_table(table: pa.Table) -> EventBatch:
    """A batch over a table read back from storage (events parsed lazily)."""
    return EventBatch(table)


class _PathValues:
    """The raw value at each key path for every event, sharing the walk of common prefixes.

    `map(dict.get, ...)` runs the per-event lookups in C; a parent that is not an object is
    replaced by an empty one so the walk below it yields None without a per-event check.
    """

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self._values: dict[tuple[str, ...], list[Any]] = {}
        self._parents: dict[tuple[str, ...], list[dict[str, Any]]] = {(): events}

    def at(self, path: tuple[str, ...]) -> list[Any]:
        values = self._values.get(path)
        if values is None:
            parents = self._objects(path[:-1])
            values = list(map(dict.get, parents, repeat(path[-1], len(parents))))
            self._values[path] = values
        return values

    def _objects(self, path: tuple[str, ...]) -> list[dict[str, Any]]:
        objects = self._parents.get(path)
        if objects is None:
            objects = [value if isinstance(value, dict) else _EMPTY for value in self.at(path)]
            self._parents[path] = objects
        return objects


_EMPTY: dict[str, Any] = {}


def column_kind(arrow_type: pa.DataType) -> str:
    if pa.types.is_map(arrow_type):
        return "map"
    if pa.types.is_list(arrow_type):
        return "list"
    if pa.types.is_integer(arrow_type):
        return "int"
    return "string"


def _conform_string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _conform_int(value: Any) -> int | None:
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    return None


def _conform_list(value: Any) -> list[str | None] | None:
    if not isinstance(value, list):
        return None
    return [element if isinstance(element, str) else None for element in value]


def _conform_map(value: Any) -> dict[str, str | None] | None:
    if not isinstance(value, dict):
        return None
    return {key: item if isinstance(item, str) else None for key, item in value.items()}


_CONFORM: dict[str, Callable[[Any], Any]] = {
    "string": _conform_string,
    "int": _conform_int,
    "list": _conform_list,
    "map": _conform_map,
}


class Leaf(NamedTuple):
    """A value normalise reads from every event: a typed column's, or a candidate event time."""

    path: tuple[str, ...]
    type: pa.DataType


LEAVES = tuple(Leaf(f.path, f.type) for f in TYPED_FIELDS) + tuple(
    Leaf((key,), pa.string()) for key in TIME_KEYS
)
"""Every value read from an event: the typed columns', then the candidate event times."""


@dataclass(frozen=True, eq=False)
class _Subtree:
    """The leaves under one top-level key of the event and the Arrow type holding them all
    (a struct for an object such as `user`), so that Arrow can convert them in one go."""

    key: str
    type: pa.DataType
    leaves: tuple[Leaf, ...]


def _nested_type(leaves: Sequence[Leaf], depth: int) -> pa.DataType:
    """The type of the value `depth` keys down the common path of `leaves`."""
    if len(leaves) == 1 and len(leaves[0].path) == depth:
        return leaves[0].type
    children: dict[str, list[Leaf]] = {}
    for leaf in leaves:
        children.setdefault(leaf.path[depth], []).append(leaf)
    return pa.struct([(key, _nested_type(group, depth + 1)) for key, group in children.items()])


def _subtrees() -> tuple[_Subtree, ...]:
    by_key: dict[str, list[Leaf]] = {}
    for leaf in LEAVES:
        by_key.setdefault(leaf.path[0], []).append(leaf)
    return tuple(
        _Subtree(key, _nested_type(leaves, 1), tuple(leaves)) for key, leaves in by_key.items()
    )


_SUBTREES = _subtrees()


def _leaf_columns(values: _PathValues) -> dict[tuple[str, ...], pa.Array]:
    """The column of every leaf, by path, as `typed_value` defines it.

    Walking paths in Python costs a list per path and per parent object. Instead Arrow converts
    the event dicts (extra keys ignored) to one struct of every subtree in C++, and the columns
    are its fields. Subtrees where Arrow would silently convert a clash are left out of it; if
    it raises on a clash, each subtree is converted on its own, so only the clashing one is
    built value by value.
    """
    exact = [tree for tree in _SUBTREES if _arrow_is_exact(values, tree)]
    whole = _convert(values.events, pa.struct([(tree.key, tree.type) for tree in exact]))
    columns: dict[tuple[str, ...], pa.Array] = {}
    for tree in _SUBTREES:
        converted = None
        if tree in exact:
            if whole is None:
                converted = _convert(values.at((tree.key,)), tree.type)
            else:
                converted = pc.struct_field(whole, [tree.key])
        for leaf in tree.leaves:
            columns[leaf.path] = _leaf_column(values, leaf, converted)
    return columns


def _arrow_is_exact(values: _PathValues, tree: _Subtree) -> bool:
    """Whether Arrow converts the subtree exactly or raises (reads its values only if needed)."""
    if not _may_clash_silently(tree.type):
        return True
    return _no_silent_clash(values.at((tree.key,)), tree.type)


def _leaf_column(values: _PathValues, leaf: Leaf, subtree: pa.Array | None) -> pa.Array:
    """A leaf's column from its converted subtree, else built from its own values."""
    if subtree is None:
        return _typed_column(values.at(leaf.path), leaf.type)
    if len(leaf.path) == 1:
        return subtree
    return pc.struct_field(subtree, list(leaf.path[1:]))


def _typed_column(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    """The column `typed_value` defines: one `pa.array` call unless a value clashes."""
    column = _convert(values, arrow_type) if _no_silent_clash(values, arrow_type) else None
    if column is None:
        conform = _CONFORM[column_kind(arrow_type)]
        column = pa.array([conform(value) for value in values], arrow_type)
    return column


def _convert(values: list[Any], arrow_type: pa.DataType) -> pa.Array | None:
    """Arrow's conversion of `values`, or None when a value clashes with the type."""
    try:
        return pa.array(values, arrow_type)
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        return None


_NONE = type(None)
_EXPECTED_TYPES: dict[str, set[type]] = {
    "int": {int, _NONE},
    "list": {list, _NONE},
    "map": {dict, _NONE},
}
"""The only JSON value types Arrow converts exactly to these kinds of typed column."""


def _no_silent_clash(values: Iterable[Any], arrow_type: pa.DataType) -> bool:
    """False when Arrow would convert a clashing value rather than raise.

    Arrow raises on every JSON type clash but these: a float for an int (200.5 becomes 200), a
    string for a list ("abc" becomes its characters), and an empty string or array for a map
    (an empty map instead of null) or an object (harmless: its fields are null either way).
    Only value types are looked at, with map/filter/set running in C, and only down to the
    leaves where this can happen; test_normalise pins which clashes Arrow raises on.
    """
    if pa.types.is_struct(arrow_type):
        children = [child for child in arrow_type if _may_clash_silently(child.type)]
        if not children:
            return True
        parents = list(values)
        if not set(map(type, parents)) <= {dict, _NONE}:
            return False
        return all(
            _no_silent_clash(map(dict.get, filter(None, parents), repeat(child.name)), child.type)
            for child in children
        )
    expected = _EXPECTED_TYPES.get(column_kind(arrow_type))
    return expected is None or set(map(type, values)) <= expected


def _may_clash_silently(arrow_type: pa.DataType) -> bool:
    if pa.types.is_struct(arrow_type):
        return any(_may_clash_silently(child.type) for child in arrow_type)
    return column_kind(arrow_type) in _EXPECTED_TYPES


def _event_time(candidates: list[pa.Array]) -> pa.Array:
    """The first candidate (string columns, by `TIME_KEYS`) that parses, per event."""
    first, *fallbacks = candidates
    times = _parse_times(first)
    for strings in fallbacks:
        if times.null_count == 0:
            break
        times = pc.coalesce(times, _parse_times(strings))
    return times


def _parse_times(strings: pa.Array) -> pa.Array:
    """RFC 3339 strings as UTC microseconds (digits past microseconds dropped); else null."""
    strings = pc.if_else(pc.match_substring_regex(strings, _RFC3339), strings, None)
    try:
        return strings.cast(TIMESTAMP)
    except pa.ArrowInvalid:
        strings = pc.replace_substring_regex(strings, _BEYOND_MICROSECONDS, r"\1")
    try:
        return strings.cast(TIMESTAMP)
    except pa.ArrowInvalid:
        return _parse_times_one_by_one(strings)


def _parse_times_one_by_one(strings: pa.Array) -> pa.Array:
    """Slow path for a batch holding a date that does not exist (February 30th)."""
    micros: list[int | None] = []
    for text in strings:
        try:
            micros.append(text.cast(TIMESTAMP).value)
        except pa.ArrowInvalid:
            micros.append(None)
    return pa.array(micros, pa.int64()).cast(TIMESTAMP)


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
