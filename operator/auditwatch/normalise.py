"""Normalise decoded audit events into one Arrow batch with the stable schema of `schema.py`.

Columns are built column-wise (one list comprehension or one `pa.array` call per column, never a
Python object per event), because this runs on every batch the receiver accepts. Typed columns
follow one rule, `typed_value`, so the vectorised rule evaluator (typed columns) and the
per-event reference evaluator (`typed_value`) agree on every event, type clashes included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from auditwatch.schema import EVENT_SCHEMA, TIMESTAMP, TYPED_FIELDS, TypedField

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_TIME_KEYS = ("stageTimestamp", "requestReceivedTimestamp", "timestamp")
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
    dicts, so they are kept rather than parsed again; a batch read back from storage parses
    them lazily from the `event` column, once.
    """

    table: pa.Table
    _events: list[dict[str, Any]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def events(self) -> list[dict[str, Any]]:
        if self._events is None:
            self._events = [orjson.loads(text) for text in self.table.column("event").to_pylist()]
        return self._events

    def filter(self, mask: pa.BooleanArray | pa.ChunkedArray) -> EventBatch:
        """The rows where mask is true, events included (null counts as false)."""
        indices = pc.indices_nonzero(pc.fill_null(mask, False))
        table = self.table.take(indices)
        if self._events is None:
            return EventBatch(table)
        events = self._events
        return EventBatch(table, [events[i] for i in indices.to_pylist()])

    @classmethod
    def concat(cls, batches: Sequence[EventBatch]) -> EventBatch:
        """One batch of all rows in order; events stay parsed only if every batch has them."""
        if not batches:
            return EventBatch(EVENT_SCHEMA.empty_table(), [])
        table = pa.concat_tables([batch.table for batch in batches])
        if any(batch._events is None for batch in batches):
            return EventBatch(table)
        return EventBatch(table, [event for batch in batches for event in batch.events])


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
    return _CONFORM[_kind(typed.type)](value)


def normalise(events: list[dict[str, Any]], received_at: datetime) -> EventBatch:
    """Build the batch for events received at `received_at` (UTC; a naive time is taken as UTC).

    Every event must be JSON-serialisable (what the decoder returns always is); a value that
    does not fit its typed column is null there and intact in `event`, never an error.
    """
    event_json = pa.array(list(map(orjson.dumps, events)), pa.string())
    values = _PathValues(events)
    columns: list[pa.Array] = [_typed_column(values.at(f.path), f.type) for f in TYPED_FIELDS]
    columns.append(_event_time(values))
    columns.append(pa.repeat(pa.scalar(_as_utc(received_at), TIMESTAMP), len(events)))
    columns.append(event_json)
    return EventBatch(pa.Table.from_arrays(columns, schema=EVENT_SCHEMA), events)


def from_table(table: pa.Table) -> EventBatch:
    """A batch over a table read back from storage (events parsed lazily)."""
    return EventBatch(table)


class _PathValues:
    """The raw value at each key path for every event, sharing the walk of common prefixes.

    `map(dict.get, ...)` runs the per-event lookups in C; a parent that is not an object is
    replaced by an empty one so the walk below it yields None without a per-event check.
    """

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._events = events
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


def _kind(arrow_type: pa.DataType) -> str:
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


def _typed_column(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    """The column `typed_value` defines, built with one `pa.array` call when nothing clashes.

    Arrow itself rejects a non-string where a string is due, so the common all-clean case skips
    the per-value check; ints are checked up front because Arrow would accept 200.0 or True.
    """
    kind = _kind(arrow_type)
    candidates: list[Any]
    if kind == "int":
        candidates = [value if type(value) is int else None for value in values]
    elif kind == "list":
        candidates = [value if isinstance(value, list) else None for value in values]
    elif kind == "map":
        candidates = [value if isinstance(value, dict) else None for value in values]
    else:
        candidates = values
    try:
        return pa.array(candidates, arrow_type)
    except (pa.ArrowTypeError, pa.ArrowInvalid, OverflowError):
        conform = _CONFORM[kind]
        return pa.array([conform(value) for value in candidates], arrow_type)


def _event_time(values: _PathValues) -> pa.Array:
    """The first of `_TIME_KEYS` that parses, per event; null when none does."""
    first, *fallbacks = _TIME_KEYS
    times = _parse_times(values.at((first,)))
    for key in fallbacks:
        if times.null_count == 0:
            break
        times = pc.coalesce(times, _parse_times(values.at((key,))))
    return times


def _parse_times(values: list[Any]) -> pa.Array:
    """RFC 3339 strings as UTC microseconds (digits past microseconds dropped); else null."""
    strings = _typed_column(values, pa.string())
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
