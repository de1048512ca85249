"""JSON text straight to an EventBatch, for the bodies the apiserver's webhook and Vector send.

The general path (decode.py into Python dicts, then normalise.py) is most of what ingest costs:
a dict for every object of every event, then each event encoded back to JSON for the `event`
column. This path reads a one-line `EventList` or array of events with msgspec, which builds
small structs holding only the typed fields (everything else is skipped, not built), and keeps
each event's own bytes as its `event` text.

It takes a body only when the batch is sure to be the one the general path would build (the
`event` text aside: the sender's bytes rather than orjson's, the same JSON value). Anything
else returns None and the caller takes the general path, which also words the errors: NDJSON,
envelopes, a value in a typed field of another JSON type than its column's, an item that is not
an event, text that is not UTF-8. tests/test_columnar.py holds the two paths equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import accumulate, repeat
from operator import add, attrgetter
from typing import Annotated, Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from auditwatch.decode import EVENT_MARKERS, NON_SPACE, collector_paused
from auditwatch.exactjson import MAX_DEPTH
from auditwatch.normalise import LEAVES, EventBatch, assemble, column_kind
from auditwatch.schema import TYPED_BY_COLUMN, TYPED_FIELDS

_INT64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]

_VALUE_TYPES: dict[str, Any] = {
    "map": dict[str, str] | None,
    "list": list[str] | None,
    "int": _INT64 | None,
    "string": str | None,
}
"""The type msgspec checks a leaf against, by `column_kind`: exactly the JSON values its column
keeps (msgspec is strict: no float for an int, no boolean for either); null is None."""


def _struct(name: str, leaves: Sequence[tuple[tuple[str, ...], Any]]) -> type[msgspec.Struct]:
    """A struct with a field per first key of `leaves`, nested objects as nested structs.

    A nested struct defaults to an empty one, so `attrgetter("user.username")` reads None
    when `user` is missing; a `user` sent as null (or any non-object) fails validation, and the
    general path takes the body.
    """
    children: dict[str, list[tuple[tuple[str, ...], Any]]] = {}
    for path, arrow_type in leaves:
        children.setdefault(path[0], []).append((path[1:], arrow_type))
    fields: list[tuple[str, Any, Any]] = []
    for key, group in children.items():
        if len(group) == 1 and not group[0][0]:
            fields.append((key, _VALUE_TYPES[column_kind(group[0][1])], None))
        else:
            nested = _struct(f"{name}_{key}", group)
            fields.append((key, nested, msgspec.field(default_factory=nested)))
    return msgspec.defstruct(name, fields, gc=False)


_Event = _struct("Event", LEAVES)
_READERS: tuple[Callable[[Any], Any], ...] = tuple(attrgetter(".".join(path)) for path, _ in LEAVES)

_EventList = msgspec.defstruct(
    "EventList",
    [("kind", str | None, None), ("items", list[msgspec.Raw] | None, None)]
    + [(marker, Any, msgspec.UNSET) for marker in sorted(EVENT_MARKERS)],
    gc=False,
)
"""An object at the top of the body: an EventList unless it has an event's keys itself."""

_body_decoder = msgspec.json.Decoder(list[msgspec.Raw] | _EventList)
_event_decoder = msgspec.json.Decoder(_Event)

_NOT_SURE = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)
"""What msgspec raises on a body the general path must judge (RecursionError: nesting deeper
than msgspec goes, about 1,000 levels; orjson's limit is 1,024)."""

_MARKER_COLUMNS = tuple(marker for marker in sorted(EVENT_MARKERS) if marker in TYPED_BY_COLUMN)


def batch_from_json(data: bytes, received_at: datetime) -> EventBatch | None:
    """The batch of a decompressed body, or None when the general path must take it."""
    with collector_paused():  # a list per column and a struct per event: no cycles among them
        return _batch(data, received_at)


def _batch(data: bytes, received_at: datetime) -> EventBatch | None:
    items = _items(data)
    if not items:
        return None
    try:
        events = list(map(_event_decoder.decode, items))
    except _NOT_SURE:
        return None
    columns = [
        pa.array(list(map(reader, events)), arrow_type)
        for reader, (_, arrow_type) in zip(_READERS, LEAVES, strict=True)
    ]
    typed, times = columns[: len(TYPED_FIELDS)], columns[len(TYPED_FIELDS) :]
    if not _all_events(typed):
        return None
    event_json = _event_text(items)
    if event_json is None:
        return None
    # msgspec admitted only an object of strings or null as `annotations`: the column holds them
    return EventBatch(assemble(typed, times, received_at, event_json), annotations_complete=True)


def _items(data: bytes) -> list[msgspec.Raw] | None:
    """The raw items of a one-line array or EventList; None for any other body."""
    for line_break in (b"\n", b"\r"):
        at = data.find(line_break)
        if at != -1 and NON_SPACE.search(data, at) is not None:
            return None  # NDJSON or pretty-printed: the `event` text would not be one line
    try:
        body = _body_decoder.decode(data)
    except _NOT_SURE:
        return None
    if isinstance(body, list):
        return body
    is_event_list = body.kind == "EventList" and all(
        getattr(body, marker) is msgspec.UNSET for marker in EVENT_MARKERS
    )
    return body.items if is_event_list else None


def _all_events(typed: list[pa.Array]) -> bool:
    """Whether every item is an event as decode.py tells one: it has one of EVENT_MARKERS.

    A marker with a value is present; one with all of them null or missing may be an envelope
    (or a marker present as null), which the general path sorts out.
    """
    has_marker = None
    for column in _MARKER_COLUMNS:
        valid = pc.is_valid(typed[TYPED_FIELDS.index(TYPED_BY_COLUMN[column])])
        has_marker = valid if has_marker is None else pc.or_(has_marker, valid)
    return has_marker is not None and bool(pc.all(has_marker).as_py())


def _event_text(items: list[msgspec.Raw]) -> pa.Array | None:
    """The items' bytes as a string column, or None if they are not valid UTF-8 or one of
    them may nest deeper than MAX_DEPTH (the general path words the 400)."""
    data = b"".join(items)
    if len(data) >= 2**31:
        return None
    ends = list(accumulate(map(len, items), initial=0))
    if _may_nest_too_deep(data, ends):
        return None
    offsets = pa.array(ends, pa.int32())
    text = pa.StringArray.from_buffers(len(items), offsets.buffers()[1], pa.py_buffer(data))
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return None
    return text


def _may_nest_too_deep(data: bytes, ends: list[int]) -> bool:
    """Whether an item, `data[ends[i]:ends[i + 1]]`, holds more than MAX_DEPTH brackets and
    braces (a bound on its nesting, brackets in strings included); counted in C, per item only
    when the whole body holds that many."""
    if data.count(b"{") + data.count(b"[") <= MAX_DEPTH:
        return False
    starts, stops = ends[:-1], ends[1:]
    braces = map(data.count, repeat(b"{"), starts, stops)
    brackets = map(data.count, repeat(b"["), starts, stops)
    return int(max(map(add, braces, brackets))) > MAX_DEPTH
