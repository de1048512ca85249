"""decode.py: every body shape a real sender posts, and a clear error for every bad one."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from tests.sample_data import SAMPLES

from auditwatch.decode import (
    BodyTooLarge,
    DecodeError,
    UnsupportedEncoding,
    decode_body,
    decode_file,
)
from auditwatch.normalise import normalise

RECEIVED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("impersonation-and-403s.log", 37),
        ("secret-recon-then-exec.log", 15),
        ("sekoia-mixed.log", 8),
        ("pod-exec.log", 1),
        ("privileged-pod.log", 1),
        ("single-events/lease-update-pretty.json", 1),
        ("aks-envelope-EventHubs.json", 1),
        ("aks-envelope-KubeAuditLog.json", 1),
    ],
)
def test_every_sample_decodes_to_its_events(name: str, count: int) -> None:
    events = decode_file(SAMPLES / name)
    assert len(events) == count
    assert all(isinstance(event.get("auditID"), str) for event in events)


def test_aks_record_is_unwrapped_to_the_event_it_carries() -> None:
    raw = orjson.loads((SAMPLES / "aks-envelope-EventHubs.json").read_bytes()[3:])
    [event] = decode_file(SAMPLES / "aks-envelope-EventHubs.json")
    assert event == orjson.loads(raw["properties"]["log"]) | {"cluster": "kubeauditlogtestcluster"}
    assert event["auditID"] == "4e2a4193-cb3d-4ff7-bf37-32c392fbc23b"
    assert "properties" not in event


def test_log_file_body_equals_decode_file() -> None:
    path = SAMPLES / "secret-recon-then-exec.log"
    assert decode_body(path.read_bytes()) == decode_file(path)


@pytest.fixture(scope="module")
def webhook_events() -> list[dict[str, Any]]:
    """The impersonation sample as the webhook sends it: items without kind/apiVersion."""
    events = decode_file(SAMPLES / "impersonation-and-403s.log")
    return [{k: v for k, v in e.items() if k not in ("kind", "apiVersion")} for e in events]


def _ndjson(values: list[Any]) -> bytes:
    return b"".join(orjson.dumps(value) + b"\n" for value in values)


def _vector(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "message": orjson.dumps(event).decode(),
        "file": "/var/log/kubernetes/audit.log",
        "host": "node-1",
        "source_type": "file",
        "timestamp": "2024-05-01T12:00:00Z",
    }


def _aks(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "category": "kube-audit",
        "properties": {"log": orjson.dumps(event).decode() + "\n", "stream": "stdout"},
        "time": "2024-05-01T12:00:00Z",
    }


Shape = Callable[[list[dict[str, Any]]], tuple[bytes, str | None]]
SHAPES: dict[str, Shape] = {
    "array": lambda evs: (orjson.dumps(evs), None),
    "eventlist": lambda evs: (
        orjson.dumps({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": evs}),
        None,
    ),
    "ndjson": lambda evs: (_ndjson(evs), None),
    "ndjson-crlf-blank-lines-bom": lambda evs: (
        b"\xef\xbb\xbf\r\n" + b"\r\n\r\n".join(orjson.dumps(e) for e in evs) + b"\r\n\n",
        None,
    ),
    "ndjson-of-eventlists-and-arrays": lambda evs: (
        _ndjson([{"kind": "EventList", "items": evs[:10]}, evs[10:20], *evs[20:]]),
        None,
    ),
    "vector-array": lambda evs: (orjson.dumps([_vector(e) for e in evs]), None),
    "fluent-bit-ndjson": lambda evs: (
        _ndjson([{"log": orjson.dumps(e).decode(), "stream": "stdout"} for e in evs]),
        None,
    ),
    "aks-records": lambda evs: (orjson.dumps({"records": [_aks(e) for e in evs]}), None),
    "aks-single-records-ndjson": lambda evs: (_ndjson([_aks(e) for e in evs]), None),
    "gzip-ndjson": lambda evs: (gzip.compress(_ndjson(evs)), "gzip"),
    "x-gzip-multimember": lambda evs: (
        gzip.compress(_ndjson(evs[:5])) + gzip.compress(_ndjson(evs[5:])),
        "x-gzip",
    ),
    "zstd-eventlist": lambda evs: (
        zstandard.ZstdCompressor().compress(orjson.dumps({"kind": "EventList", "items": evs})),
        "zstd",
    ),
    "gzip-then-zstd": lambda evs: (
        zstandard.ZstdCompressor().compress(gzip.compress(orjson.dumps(evs))),
        "gzip, zstd",
    ),
    "identity-upper-case": lambda evs: (orjson.dumps(evs), "IDENTITY"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_of_the_same_events_gives_the_same_batch(
    shape: str, webhook_events: list[dict[str, Any]]
) -> None:
    body, encoding = SHAPES[shape](webhook_events)
    events = decode_body(body, encoding)
    assert events == webhook_events
    expected = normalise(webhook_events, RECEIVED).table
    assert normalise(events, RECEIVED).table.equals(expected)


def test_single_objects_decode_one_event_each(webhook_events: list[dict[str, Any]]) -> None:
    compact = [decode_body(orjson.dumps(e)) for e in webhook_events]
    pretty = [decode_body(orjson.dumps(e, option=orjson.OPT_INDENT_2)) for e in webhook_events]
    assert compact == pretty == [[e] for e in webhook_events]


@pytest.mark.parametrize("body", [b"[]", b'{"kind":"EventList","items":[]}', b"[]\n[]\n"])
def test_empty_collections_are_zero_events(body: bytes) -> None:
    assert decode_body(body) == []


def test_object_that_is_neither_event_nor_envelope_is_kept_as_sent() -> None:
    assert decode_body(b'{"hello": "world", "n": 1}') == [{"hello": "world", "n": 1}]


def test_event_with_a_message_field_is_not_mistaken_for_an_envelope() -> None:
    event = {"auditID": "a1", "verb": "get", "message": '{"auditID": "other"}'}
    assert decode_body(orjson.dumps(event)) == [event]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty body"),
        (b" \n\r\n\t", "empty body"),
        (b"\xef\xbb\xbf", "empty body"),
        (b"42", "the body is a number, not an event object"),
        (b'"x"', "the body is a string, not an event object"),
        (b'[{"verb":"get"}, {"verb":"list"}, "x"]', "[2] is a string, not an event object"),
        (b"[[]]", "[0] is an array, not an event object"),
        (
            b'{"kind":"EventList","items":[{},{},{},"oops"]}',
            "items[3] is a string, not an event object",
        ),
        (b'{"kind":"EventList","items":{"a":1}}', "items is not an array"),
        (b'{"verb":"get"}\n{"verb":"list"}\n{"verb": }\n', "line 3, column 10"),
        (b'{"verb":"get"}\n\n7\n', "line 3 is a number, not an event object"),
        (
            b'{"verb":"get"}\n{"kind":"EventList","items":[{}, null]}\n',
            "line 2: items[1] is null, not an event object",
        ),
        (b'{\n  "verb": "get",\n  "stage" "x"\n}\n', "invalid JSON at line 3, column 11"),
        (b'{"verb":"get"} trailing', "invalid JSON at line 1, column 16"),
        (b'{"message": "plain text log line"}', "message is not JSON"),
        (b'[{"message": "[1, 2]"}]', "[0].message holds an array, not an event object"),
        (b'{"log": "\\"text\\""}', "log holds a string, not an event object"),
        (
            b'{"records":[{"properties":{"log":"{}"}}, {"properties":{}}]}',
            "records[1] is not an AKS record with a properties.log string",
        ),
        (b'{"records":[{"properties":{"log":"nope"}}]}', "records[0].properties.log is not JSON"),
        (b'{"verb": "g\xff"}', "invalid JSON"),
    ],
)
def test_bad_body_is_rejected_with_the_place_named(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_body(body)
    assert message in str(caught.value)


def test_one_bad_line_rejects_the_whole_body() -> None:
    good = (SAMPLES / "impersonation-and-403s.log").read_bytes()
    with pytest.raises(DecodeError, match="line 38 is a string"):
        decode_body(good + b'"not an event"\n')


@pytest.mark.parametrize("encoding", ["br", "deflate", "gzip, compress"])
def test_unknown_encoding_is_unsupported(encoding: str) -> None:
    with pytest.raises(UnsupportedEncoding, match="unsupported Content-Encoding"):
        decode_body(gzip.compress(b"{}"), encoding)


def test_body_not_valid_for_its_encoding() -> None:
    body = orjson.dumps({"verb": "get"})
    with pytest.raises(DecodeError, match="not valid gzip"):
        decode_body(body, "gzip")
    with pytest.raises(DecodeError, match="not valid zstd"):
        decode_body(body, "zstd")
    with pytest.raises(DecodeError, match="gzip body is truncated"):
        decode_body(gzip.compress(body)[:-12], "gzip")
    with pytest.raises(DecodeError, match="zstd body is truncated"):
        decode_body(zstandard.ZstdCompressor().compress(body)[:-4], "zstd")
    with pytest.raises(DecodeError, match="not valid gzip"):
        decode_body(gzip.compress(body) + b"junk", "gzip")


def _bomb(size: int) -> bytes:
    return b"[" + b"{}," * (size // 3) + b"{}]"


def test_decompression_bomb_stops_at_the_cap() -> None:
    cap = 1024 * 1024
    bomb = _bomb(50 * cap)
    with pytest.raises(BodyTooLarge, match=f"more than {cap} bytes"):
        decode_body(gzip.compress(bomb), "gzip", max_decoded_bytes=cap)
    with pytest.raises(BodyTooLarge, match=f"more than {cap} bytes"):
        decode_body(zstandard.ZstdCompressor().compress(bomb), "zstd", max_decoded_bytes=cap)
    with pytest.raises(BodyTooLarge):
        decode_body(bomb, None, max_decoded_bytes=cap)
    assert len(decode_body(gzip.compress(_bomb(cap // 2)), "gzip", max_decoded_bytes=cap)) > 0


def test_errors_are_decode_errors() -> None:
    assert issubclass(BodyTooLarge, DecodeError)
    assert issubclass(UnsupportedEncoding, DecodeError)
    assert issubclass(DecodeError, ValueError)


def test_decode_file_reads_compressed_logs(tmp_path: Path) -> None:
    raw = (SAMPLES / "sekoia-mixed.log").read_bytes()
    (tmp_path / "audit.log.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "audit.log.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    expected = decode_body(raw)
    assert decode_file(tmp_path / "audit.log.gz") == expected
    assert decode_file(tmp_path / "audit.log.zst") == expected


def test_decode_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.log"
    bad.write_bytes(b'{"verb":"get"}\n{"verb":\n')
    with pytest.raises(DecodeError, match="^" + re.escape(f"{bad}: invalid JSON at line 2")):
        decode_file(bad)
    truncated = tmp_path / "cut.log.gz"
    truncated.write_bytes(gzip.compress(b'{"verb":"get"}\n' * 100)[:-10])
    with pytest.raises(DecodeError, match="^" + re.escape(f"{truncated}: gzip body is truncated")):
        decode_file(truncated)
    with pytest.raises(OSError, match=re.escape("missing.log")):
        decode_file(tmp_path / "missing.log")


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("zstd", zstandard.ZstdCompressor().compress)],
)
def test_large_compressed_body_below_the_cap_decodes_whole(encoding: str, compress: Any) -> None:
    long_uri = "/api/v1/" + "x" * (9 * 1024 * 1024)
    body = compress(orjson.dumps([{"verb": "get", "requestURI": long_uri}]))
    assert decode_body(body, encoding) == [{"verb": "get", "requestURI": long_uri}]


@pytest.mark.parametrize(
    ("body", "verbs"),
    [
        (b'\n\n{"verb":"get"}\n\n{"verb":"list"}\n', ["get", "list"]),
        (b'[\n{"verb":"get"},\n{"verb":"list"}\n]\n', ["get", "list"]),
        (b'{"verb":"get"}\n   \n\t\r\n', ["get"]),
        (b'\r\n{"kind":"EventList","items":[\n{"verb":"get"}]}', ["get"]),
    ],
)
def test_ndjson_and_one_document_are_told_apart_by_the_first_line(
    body: bytes, verbs: list[str]
) -> None:
    assert [event["verb"] for event in decode_body(body)] == verbs


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'\n\n{"verb": }\n', "invalid JSON at line 3, column 10"),
        (b'\n \n{"verb":"get"}\n{"verb": }', "invalid JSON at line 4, column 10"),
        (b'[\n{"verb":"get"},\n{"verb": }\n]', "invalid JSON at line 3, column 10"),
        (b'"x"\n{"verb":"get"}\n', "line 1 is a string, not an event object"),
    ],
)
def test_json_errors_name_the_line_of_the_body(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_body(body)
    assert message in str(caught.value)
