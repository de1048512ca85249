"""normalise.py: the stable batch schema, type clashes, event times, and EventBatch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.sample_data import SAMPLES

from auditwatch.decode import decode_file
from auditwatch.normalise import EventBatch, from_table, normalise, typed_value
from auditwatch.schema import EVENT_SCHEMA, TYPED_BY_COLUMN, TYPED_FIELDS

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _sample_events() -> list[dict[str, Any]]:
    return [event for path in sorted(SAMPLES.rglob("*.*")) for event in _decode(path)]


def _decode(path: Path) -> list[dict[str, Any]]:
    return [] if path.suffix == ".md" else decode_file(path)


def _column(batch: EventBatch, name: str) -> list[Any]:
    return list(batch.table.column(name).to_pylist())


def _as_arrow_value(value: Any) -> Any:
    """typed_value's annotations dict as Arrow's map to_pylist shows it (a list of pairs)."""
    return list(value.items()) if isinstance(value, dict) else value


def _assert_columns_follow_typed_value(batch: EventBatch, events: list[dict[str, Any]]) -> None:
    for typed in TYPED_FIELDS:
        expected = [_as_arrow_value(typed_value(event, typed)) for event in events]
        assert _column(batch, typed.column) == expected, typed.column


def test_samples_normalise_to_the_schema_with_their_values() -> None:
    events = _sample_events()
    batch = normalise(events, RECEIVED)
    assert batch.table.schema == EVENT_SCHEMA
    assert len(batch) == len(events) == 65
    assert batch.events is events
    _assert_columns_follow_typed_value(batch, events)
    assert [orjson.loads(text) for text in _column(batch, "event")] == events
    assert batch.table.column("eventTime").null_count == 0
    assert set(_column(batch, "p_timestamp")) == {RECEIVED}


def test_impersonation_sample_typed_columns() -> None:
    events = decode_file(SAMPLES / "impersonation-and-403s.log")
    table = normalise(events, RECEIVED).table
    codes = table.column("responseStatus_code")
    assert pc.sum(pc.equal(codes, 403)).as_py() == 11
    assert set(table.column("user_username").to_pylist()) == {"system:admin"}
    assert table.column("impersonatedUser_username").null_count == 0
    first = table.slice(0, 1).to_pylist()[0]
    assert first["verb"] == "list"
    assert first["objectRef_resource"] == "pods"
    assert first["user_groups"] == ["system:masters", "system:authenticated"]
    assert first["eventTime"] == datetime(2017, 9, 11, 19, 55, 5, tzinfo=UTC)


def test_annotations_are_a_map_column() -> None:
    [event] = decode_file(SAMPLES / "pod-exec.log")
    [row] = normalise([event], RECEIVED).table.to_pylist()
    assert dict(row["annotations"]) == event["annotations"]
    assert row["objectRef_subresource"] == "exec"
    assert row["responseStatus_code"] == event["responseStatus"]["code"]


CLASHING_EVENT: dict[str, Any] = {
    "auditID": "clash-1",
    "verb": 42,
    "stage": None,
    "level": ["Metadata"],
    "user": {"username": {"name": "alice"}, "groups": "system:masters"},
    "impersonatedUser": "bob",
    "sourceIPs": ["10.0.0.1", 7, None, {"ip": "x"}],
    "objectRef": ["pods"],
    "responseStatus": {"code": "403", "status": False, "reason": 1.5},
    "annotations": {"authorization.k8s.io/decision": "allow", "count": 3, "nested": {"a": 1}},
}


def test_type_clash_keeps_the_event_and_nulls_the_typed_column() -> None:
    good = decode_file(SAMPLES / "pod-exec.log")
    batch = normalise([*good, CLASHING_EVENT], RECEIVED)
    row = batch.table.slice(1, 1).to_pylist()[0]
    assert row["auditID"] == "clash-1"
    for column in ("verb", "stage", "level", "user_username", "user_groups"):
        assert row[column] is None, column
    for column in ("impersonatedUser_username", "objectRef_resource", "responseStatus_code"):
        assert row[column] is None, column
    assert row["responseStatus_status"] is None
    assert row["responseStatus_reason"] is None
    assert row["sourceIPs"] == ["10.0.0.1", None, None, None]
    assert dict(row["annotations"]) == {
        "authorization.k8s.io/decision": "allow",
        "count": None,
        "nested": None,
    }
    assert orjson.loads(row["event"]) == CLASHING_EVENT
    assert batch.table.slice(0, 1).to_pylist()[0]["verb"] == "create"
    _assert_columns_follow_typed_value(batch, batch.events)


@pytest.mark.parametrize("code", [True, 200.0, 2**63, 2**64 - 1, "200", [200]])
def test_code_that_is_not_an_int64_is_null(code: Any) -> None:
    batch = normalise(
        [{"responseStatus": {"code": code}}, {"responseStatus": {"code": 200}}], RECEIVED
    )
    assert _column(batch, "responseStatus_code") == [None, 200]
    assert typed_value(batch.events[0], TYPED_BY_COLUMN["responseStatus_code"]) is None


def test_typed_value_walks_only_objects() -> None:
    username = TYPED_BY_COLUMN["user_username"]
    assert typed_value({"user": {"username": "alice"}}, username) == "alice"
    assert typed_value({"user": [{"username": "alice"}]}, username) is None
    assert typed_value({"user": "alice"}, username) is None
    assert typed_value({}, username) is None


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        (
            {"stageTimestamp": "2023-09-01T15:37:02.757366Z"},
            datetime(2023, 9, 1, 15, 37, 2, 757366, tzinfo=UTC),
        ),
        (
            {"requestReceivedTimestamp": "2023-09-01T15:37:02.7Z"},
            datetime(2023, 9, 1, 15, 37, 2, 700000, tzinfo=UTC),
        ),
        ({"timestamp": "2017-09-11T19:55:05Z"}, datetime(2017, 9, 11, 19, 55, 5, tzinfo=UTC)),
        (
            {"stageTimestamp": "2023-09-01T17:37:02+02:00"},
            datetime(2023, 9, 1, 15, 37, 2, tzinfo=UTC),
        ),
        (
            {"stageTimestamp": "2023-09-01 15:37:02.123456789-00:30"},
            datetime(2023, 9, 1, 16, 7, 2, 123456, tzinfo=UTC),
        ),
        (
            {
                "stageTimestamp": "2023-09-01T15:37:03Z",
                "requestReceivedTimestamp": "2023-09-01T15:37:02Z",
                "timestamp": "2023-09-01T15:37:01Z",
            },
            datetime(2023, 9, 1, 15, 37, 3, tzinfo=UTC),
        ),
        (
            {"stageTimestamp": "yesterday", "requestReceivedTimestamp": "2023-09-01T15:37:02Z"},
            datetime(2023, 9, 1, 15, 37, 2, tzinfo=UTC),
        ),
        (
            {"stageTimestamp": 1693582622, "timestamp": "2023-09-01T15:37:02Z"},
            datetime(2023, 9, 1, 15, 37, 2, tzinfo=UTC),
        ),
        ({"stageTimestamp": "2023-09-01T15:37:02"}, None),
        ({"stageTimestamp": "2023-09-01T15:37:02+0200"}, None),
        ({"stageTimestamp": "2023-09-01"}, None),
        ({"stageTimestamp": "2023-02-30T00:00:00Z"}, None),
        ({"stageTimestamp": "2023-09-01T24:00:00Z"}, None),
        ({}, None),
    ],
)
def test_event_time_variants(times: dict[str, Any], expected: datetime | None) -> None:
    valid_neighbour = {"stageTimestamp": "2020-01-01T00:00:00Z"}
    batch = normalise([valid_neighbour, {"verb": "get", **times}], RECEIVED)
    assert _column(batch, "eventTime") == [datetime(2020, 1, 1, tzinfo=UTC), expected]


@pytest.mark.parametrize(
    "received",
    [
        RECEIVED,
        RECEIVED.replace(tzinfo=None),
        RECEIVED.astimezone(timezone(timedelta(hours=-5))),
    ],
)
def test_ingest_time_is_received_at_in_utc(received: datetime) -> None:
    batch = normalise([{"verb": "get"}, {"verb": "list"}], received)
    assert _column(batch, "p_timestamp") == [RECEIVED, RECEIVED]


def test_empty_batch_has_the_schema() -> None:
    batch = normalise([], RECEIVED)
    assert len(batch) == 0
    assert batch.table.schema == EVENT_SCHEMA
    assert batch.events == []


def test_batch_from_table_parses_events_lazily_and_once() -> None:
    events = decode_file(SAMPLES / "secret-recon-then-exec.log")
    stored = from_table(normalise(events, RECEIVED).table)
    assert stored._events is None
    assert stored.events == events
    assert stored.events is stored.events


@pytest.mark.parametrize("lazy", [False, True])
def test_filter_keeps_rows_and_events_together(lazy: bool) -> None:
    events = decode_file(SAMPLES / "impersonation-and-403s.log")
    batch = normalise(events, RECEIVED)
    if lazy:
        batch = from_table(batch.table)
    forbidden = pc.equal(batch.table.column("responseStatus_code"), 403).combine_chunks()
    assert forbidden.to_pylist()[0] is True
    without_first = pa.array([None, *forbidden.to_pylist()[1:]], pa.bool_())
    for mask, count in ((forbidden, 11), (without_first, 10)):
        kept = batch.filter(mask)
        expected = [e for e, keep in zip(events, mask.to_pylist(), strict=True) if keep]
        assert len(kept) == len(expected) == count
        assert kept.events == expected
        assert [e["responseStatus"]["code"] for e in kept.events] == [403] * count
        assert _column(kept, "auditID") == [e["auditID"] for e in expected]
    assert len(batch.filter(pa.array([False] * len(batch)))) == 0


def test_concat_joins_batches_in_order() -> None:
    first = normalise(decode_file(SAMPLES / "sekoia-mixed.log"), RECEIVED)
    second = normalise(decode_file(SAMPLES / "pod-exec.log"), RECEIVED)
    joined = EventBatch.concat([first, second])
    assert len(joined) == 9
    assert joined.events == first.events + second.events
    lazy = EventBatch.concat([first, from_table(second.table)])
    assert lazy._events is None
    assert lazy.events == joined.events
    assert len(EventBatch.concat([])) == 0


TYPED_KEYS = sorted({f.path[0] for f in TYPED_FIELDS} | {f.path[-1] for f in TYPED_FIELDS})
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_keys = st.sampled_from([*TYPED_KEYS, "stageTimestamp", "timestamp"]) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_objects, max_size=5))
def test_any_json_objects_normalise_and_round_trip(events: list[dict[str, Any]]) -> None:
    batch = normalise(events, RECEIVED)
    assert batch.table.schema == EVENT_SCHEMA
    assert [orjson.loads(text) for text in _column(batch, "event")] == events
    assert from_table(batch.table).events == events
    _assert_columns_follow_typed_value(batch, events)


TYPED_PATHS = sorted(
    {f.path[:depth] for f in TYPED_FIELDS for depth in range(1, len(f.path) + 1)}
    | {("stageTimestamp",)}
)
"""Every path a typed column or the event time reads, and every object on the way."""


@pytest.mark.parametrize(
    "clash",
    [
        200.0,
        200.5,
        -0.0,
        True,
        False,
        0,
        2**63,
        -(2**63),
        2**64 - 1,
        "abc",
        "",
        "200",
        [],
        ["a", 1],
        ["a", None, True],
        [["a", "b"]],
        [{"username": "x"}],
        {},
        {"k": 1},
        {"k": None, "j": "v"},
        {"k": ["x"]},
        {"k": {"username": "x"}},
        {"code": 200.0, "username": "abc", "groups": "abc"},
        None,
    ],
    ids=repr,
)
def test_any_json_value_at_any_typed_path_follows_typed_value(clash: Any) -> None:
    """Arrow converts some clashes silently (200.0 to 200, "abc" to ["a", "b", "c"], "" or []
    to an empty map), so each one, at every path, must still give typed_value's column."""
    for path in TYPED_PATHS:
        events = _sample_events()[:3]
        target = events[1]
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = clash
        batch = normalise(events, RECEIVED)
        assert batch.table.schema == EVENT_SCHEMA
        try:
            _assert_columns_follow_typed_value(batch, events)
        except AssertionError as failure:
            raise AssertionError(f"{clash!r} at {path}: {failure}") from None


def test_silent_arrow_conversions_become_null() -> None:
    events: list[dict[str, Any]] = [
        {"responseStatus": {"code": 200.0}, "sourceIPs": "10.0.0.1", "annotations": []},
        {"responseStatus": {"code": True}, "user": {"groups": "system:masters"}},
        {"responseStatus": {"code": 404}, "user": {"groups": ["g"]}, "annotations": {"a": "b"}},
        {"annotations": {"a": 1, "b": {"c": "d"}, "e": "f"}},
    ]
    table = normalise(events, RECEIVED).table
    assert table.column("responseStatus_code").to_pylist() == [None, None, 404, None]
    assert table.column("sourceIPs").to_pylist() == [None, None, None, None]
    assert table.column("user_groups").to_pylist() == [None, None, ["g"], None]
    assert table.column("annotations").to_pylist() == [
        None,
        None,
        [("a", "b")],
        [("a", None), ("b", None), ("e", "f")],
    ]


def test_a_batch_says_whether_its_annotations_column_holds_every_events_annotations() -> None:
    """Only objects (or none) in `annotations` leave nothing to find in the event texts; a
    filtered batch keeps what it says, a concatenation says it only if all its parts do."""
    mapped = normalise([{"annotations": {"a": "b"}}, {"annotations": None}, {}], RECEIVED)
    listed = normalise([{"annotations": [{"a": "b"}]}, {}], RECEIVED)
    texted = normalise([{"annotations": "a=b"}], RECEIVED)
    assert mapped.annotations_complete
    assert not listed.annotations_complete and not texted.annotations_complete
    assert not from_table(mapped.table).annotations_complete  # stored: nobody vouches for it
    assert mapped.filter(pa.array([False, True, True])).annotations_complete
    assert not listed.filter(pa.array([False, True])).annotations_complete
    assert EventBatch.concat([mapped, mapped]).annotations_complete
    assert not EventBatch.concat([mapped, listed]).annotations_complete
    assert not EventBatch.concat([EventBatch(mapped.table), mapped]).annotations_complete
