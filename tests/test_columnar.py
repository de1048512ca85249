"""columnar.py: the fast path builds the batch the general path (decode + normalise) builds.

Every body the fast path takes must give the same typed columns and event times as the general
path, and `event` texts that parse to the same events; every body it cannot be sure of must go
to the general path (None), which also words the errors.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.test_normalise import TYPED_PATHS, json_objects, json_values

from auditwatch.columnar import batch_from_json
from auditwatch.decode import decode_file, decode_json
from auditwatch.normalise import EventBatch, from_table, normalise
from auditwatch.schema import EVENT_JSON, EVENT_SCHEMA

RECEIVED = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def sample_events(samples: Path) -> list[dict[str, Any]]:
    """Every event of every sample (logs, AKS exports, single events), unwrapped."""
    files = [p for p in sorted(samples.rglob("*")) if p.is_file() and p.suffix != ".md"]
    return [event for path in files for event in decode_file(path)]


def event_list(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": events})


def assert_same_batch(fast: EventBatch, body: bytes) -> None:
    """`fast` equals the general path's batch of `body`, `event` texts compared as JSON."""
    events = decode_json(body)
    general_batch = normalise(events, RECEIVED)
    general = general_batch.table
    # msgspec takes only an object of strings (or null) as annotations: the column has them all
    assert fast.annotations_complete and general_batch.annotations_complete
    assert fast.table.schema == EVENT_SCHEMA
    for name in EVENT_SCHEMA.names:
        if name != EVENT_JSON:
            assert fast.table[name].equals(general[name]), name
    assert [orjson.loads(text) for text in fast.table[EVENT_JSON].to_pylist()] == events
    assert fast.events == events


def test_real_samples_as_the_apiserver_posts_them_take_the_fast_path(samples: Path) -> None:
    events = sample_events(samples)
    assert len(events) > 60
    body = event_list(events)
    batch = batch_from_json(body, RECEIVED)
    assert batch is not None
    assert_same_batch(batch, body)


def test_an_array_of_events_takes_the_fast_path(samples: Path) -> None:
    events = sample_events(samples)[:50]
    body = orjson.dumps(events)
    batch = batch_from_json(body, RECEIVED)
    assert batch is not None
    assert_same_batch(batch, body)


def test_event_text_is_the_senders_bytes(samples: Path) -> None:
    """Go escapes <, > and & as \\u003c...: the stored text is what was sent, byte for byte."""
    item = (
        b'{"auditID":"a-1","stage":"ResponseComplete","verb":"get","requestURI":"/x?a=1\\u0026b"}'
    )
    body = b'{"kind":"EventList","items":[' + item + b"]}\n"
    batch = batch_from_json(body, RECEIVED)
    assert batch is not None
    assert batch.table[EVENT_JSON].to_pylist() == [item.decode()]
    assert batch.table["requestURI"].to_pylist() == ["/x?a=1&b"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"kind":"EventList","items":[{"auditID":"a"}]}\n{"auditID":"b"}', id="NDJSON"
        ),
        pytest.param(b'{"kind": "EventList",\n "items": [{"auditID": "a"}]}', id="pretty-printed"),
        pytest.param(b'{"auditID":"a","verb":"get"}', id="one event"),
        pytest.param(b'[{"message":"{\\"auditID\\":\\"a\\"}"}]', id="Vector envelope"),
        pytest.param(b'{"records":[{"properties":{"log":"{}"}}]}', id="AKS records"),
        pytest.param(
            b'{"kind":"EventList","auditID":"x","items":[{"auditID":"a"}]}', id="list-event"
        ),
        pytest.param(b'{"kind":"EventList","items":null}', id="no items"),
        pytest.param(b'{"kind":"EventList","items":[]}', id="empty"),
        pytest.param(b'{"kind":"Other","items":[{"auditID":"a"}]}', id="not an EventList"),
        pytest.param(b'[{"auditID":"a"},3]', id="non-object item"),
        pytest.param(b'[{"auditID":null,"verb":null}]', id="markers only null"),
        pytest.param(b'[{"auditID":"a","x":"\xff"}]', id="invalid UTF-8"),
        pytest.param(b'[{"auditID":"a"}', id="truncated"),
        pytest.param(b'\xef\xbb\xbf[{"auditID":"a"}]', id="BOM"),
        pytest.param(b'[{"auditID":"a","user":null}]', id="null object on a typed path"),
        pytest.param(b'[{"auditID":"a","responseStatus":{"code":200.0}}]', id="float code"),
        pytest.param(b'[{"auditID":"a","responseStatus":{"code":true}}]', id="boolean code"),
        pytest.param(b'[{"auditID":"a","responseStatus":{"code":9223372036854775808}}]', id="big"),
        pytest.param(b'[{"auditID":"a","sourceIPs":["1.2.3.4",5]}]', id="non-string element"),
        pytest.param(b'[{"auditID":"a","annotations":{"k":1}}]', id="non-string annotation"),
        pytest.param(b'[{"auditID":5}]', id="number for a string"),
        pytest.param(
            b'[{"auditID":"a","requestObject":' + b"[" * 2000 + b"]" * 2000 + b"}]",
            id="nested too deep",
        ),
    ],
)
def test_bodies_it_cannot_be_sure_of_go_to_the_general_path(body: bytes) -> None:
    assert batch_from_json(body, RECEIVED) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_objects, min_size=1, max_size=5), st.booleans())
def test_any_json_objects_give_the_general_paths_batch_or_none(
    events: list[dict[str, Any]], as_array: bool
) -> None:
    body = orjson.dumps(events) if as_array else event_list(events)
    batch = batch_from_json(body, RECEIVED)
    if batch is not None:
        assert_same_batch(batch, body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TYPED_PATHS), json_values)
def test_any_value_at_a_typed_path_gives_the_general_paths_batch_or_none(
    path: tuple[str, ...], value: Any
) -> None:
    event: dict[str, Any] = {"auditID": "a-1", "stage": "ResponseComplete", "verb": "get"}
    target = event
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    body = event_list([event, {"auditID": "a-2", "verb": "list"}])
    batch = batch_from_json(body, RECEIVED)
    if batch is not None:
        assert_same_batch(batch, body)


def test_values_of_the_typed_kinds_take_the_fast_path() -> None:
    """The property tests above would pass if everything went to the general path."""
    event = {
        "auditID": "a-1",
        "stage": "ResponseComplete",
        "verb": "create",
        "user": {"username": "u", "groups": ["g1", "g2"]},
        "impersonatedUser": {"username": "i"},
        "sourceIPs": ["10.0.0.1"],
        "objectRef": {"resource": "pods", "namespace": "ns", "name": "p"},
        "responseStatus": {"code": -(2**63), "status": "Failure"},
        "annotations": {"a": "b"},
        "stageTimestamp": "2024-05-01T12:00:00.123456789Z",
        "requestObject": {"anything": [1, 2.5, None, True, {"deep": "x"}]},
    }
    body = event_list([event])
    batch = batch_from_json(body, RECEIVED)
    assert batch is not None
    assert_same_batch(batch, body)
    assert batch.table["responseStatus_code"].to_pylist() == [-(2**63)]
    assert batch.table["eventTime"].to_pylist()[0] == datetime(
        2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC
    )
    assert batch.table["annotations"].type == pa.map_(pa.string(), pa.string())


def test_a_number_beyond_a_double_or_64_bits_is_kept_and_reads_back_exact() -> None:
    """Valid JSON that orjson refuses or rounds: msgspec does not read numbers it skips, so the
    event is kept as sent, and reading it back (parse_event) writes back the same text."""
    body = b'[{"auditID":"a-1","verb":"get","requestObject":{"r":1e999,"b":123456789012345678901}}]'
    batch = batch_from_json(body, RECEIVED)
    assert batch is not None
    assert batch.table[EVENT_JSON].to_pylist() == [body[1:-1].decode()]
    assert orjson.dumps(batch.event(0)) == body[1:-1]
    assert from_table(batch.table).events[0]["verb"] == "get"
