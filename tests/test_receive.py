"""The HTTP receiver end to end: real samples in every body shape, bad input, health and metrics.

A real Engine and receiver on a loopback port with a real data directory; what was kept is read
back from storage with `auditwatch.store.query`.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import zstandard
from aiohttp import web
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from tests.e2e_support import (
    LOG_SAMPLES,
    Running,
    WebhookSink,
    alert_doc,
    basic_auth,
    canonical,
    free_port,
    get_json,
    post,
    read_lines,
    running_receiver,
    secret_doc,
    stored,
    stream_doc,
    synthetic_events,
    write_yaml,
)

from auditwatch import receive
from auditwatch.cli import main
from auditwatch.config.model import StreamSpec
from auditwatch.metrics import Metrics
from auditwatch.normalise import EventBatch
from auditwatch.receive import (
    FORWARDED_HEADER,
    RETRY_HEADERS,
    Decoder,
    Limits,
    Receiver,
    ReceiverOptions,
    Rejected,
    prepare_batch,
)
from auditwatch.rules.evaluate import compile_rule
from auditwatch.rules.parse import parse_expression
from auditwatch.store import StorageUnavailable, Store

LIST_RULE = 'verb = "list"'


IN_THREADS_AND_WORKERS = pytest.mark.parametrize(
    "server", [0, 1], ids=["in-process", "decode-worker"], indirect=True
)
"""Run a test both ways the receiver decodes: in threads, and in a worker process (serve's
default), whose batches come back through a memory-mapped handoff file."""


@pytest.fixture
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    """Streams: open (alert on lists), copy, small (body limit), strict (event limit), basic,
    bearer, broken; no alert targets (notifications are test_serve's)."""
    resources = tmp_path / "resources"
    write_yaml(
        resources / "streams.yaml",
        stream_doc("open"),
        stream_doc("copy"),
        stream_doc("small", max_body_bytes=2048),
        stream_doc("strict", max_event_bytes=1024),
        stream_doc("basic", basic_secret="basic-creds"),
        stream_doc("bearer", bearer_secret="bearer-token"),
        stream_doc("broken"),
        secret_doc("basic-creds", username="sender", password="s3cret"),
        secret_doc("bearer-token", token="tok-123"),
    )
    write_yaml(resources / "alert.yaml", alert_doc("lists", "open", LIST_RULE, None))
    data = tmp_path / "data"
    async with running_receiver(resources, data, getattr(request, "param", 0)) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def sample_events(samples: Path, *names: str) -> list[dict[str, Any]]:
    return [event for name in names for event in read_lines(samples / name)]


def strip_kind(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """EventList items as the apiserver sends them: without their own kind/apiVersion."""
    return [{k: v for k, v in e.items() if k not in ("kind", "apiVersion")} for e in events]


def event_list(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": events}
    )


def vector_array(events: list[dict[str, Any]]) -> bytes:
    """What Vector's file source + http sink (codec json) posts."""
    return orjson.dumps(
        [
            {
                "message": orjson.dumps(event).decode(),
                "file": "/var/log/kubernetes/audit/audit.log",
                "host": "control-plane",
                "source_type": "file",
                "timestamp": "2024-05-01T10:00:00.000000Z",
            }
            for event in events
        ]
    )


def aks_records(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "records": [
                {"category": "kube-audit", "properties": {"log": orjson.dumps(e).decode()}}
                for e in events
            ]
        }
    )


def eventhubs_event(samples: Path) -> dict[str, Any]:
    text = (samples / "aks-envelope-EventHubs.json").read_bytes().removeprefix(b"\xef\xbb\xbf")
    event: dict[str, Any] = orjson.loads(orjson.loads(text)["properties"]["log"])
    return event | {"cluster": "kubeauditlogtestcluster"}  # from the record's resourceId


def shape(name: str, samples: Path) -> tuple[list[bytes], list[dict[str, Any]], dict[str, str]]:
    """Request bodies of one shape, the events they carry, and extra headers."""
    logs = sample_events(samples, *LOG_SAMPLES)
    if name == "single event":
        events = sample_events(samples, "secret-recon-then-exec.log")
        return [orjson.dumps(e) for e in events], events, {}
    if name == "pretty single event":
        path = samples / "single-events" / "lease-update-pretty.json"
        return [path.read_bytes()], [orjson.loads(path.read_bytes())], {}
    if name == "JSON array":
        return [orjson.dumps(logs)], logs, {}
    if name == "EventList":
        items = strip_kind(logs)
        return [event_list(items)], items, {}
    if name == "NDJSON":
        events = sample_events(samples, "impersonation-and-403s.log")
        return [(samples / "impersonation-and-403s.log").read_bytes()], events, {}
    if name == "Vector envelopes":
        return [vector_array(logs)], logs, {}
    if name == "AKS records":
        return [aks_records(logs)], logs, {}
    if name == "AKS EventHubs record":
        body = (samples / "aks-envelope-EventHubs.json").read_bytes()
        return [body], [eventhubs_event(samples)], {}
    if name == "gzip NDJSON":
        body = b"\n".join((samples / log).read_bytes() for log in LOG_SAMPLES)
        return [gzip.compress(body)], logs, {"Content-Encoding": "gzip"}
    if name == "zstd EventList":
        items = strip_kind(logs)
        body = zstandard.ZstdCompressor().compress(event_list(items))
        return [body], items, {"Content-Encoding": "zstd"}
    raise AssertionError(name)


SHAPES = [
    "single event",
    "pretty single event",
    "JSON array",
    "EventList",
    "NDJSON",
    "Vector envelopes",
    "AKS records",
    "AKS EventHubs record",
    "gzip NDJSON",
    "zstd EventList",
]


async def alert_matches(session: aiohttp.ClientSession, server: Running) -> int:
    status = await get_json(session, server.url + "/api/v1/status")
    matches: int = status["alerts"]["default/lists"].get("matches", 0)
    return matches


@IN_THREADS_AND_WORKERS
@pytest.mark.parametrize("shape_name", SHAPES)
async def test_every_body_shape_is_stored_once_as_sent(
    shape_name: str, samples: Path, server: Running, session: aiohttp.ClientSession
) -> None:
    bodies, events, headers = shape(shape_name, samples)
    by_header = server.url + "/api/v1/ingest"
    by_path = server.url + "/api/v1/logstream/copy"
    for body in bodies:
        answer = await post(session, by_header, body, headers | {"X-P-Stream": "open"})
        assert answer.status == 200, answer.body
        assert answer.body["stored"] == answer.body["received"] > 0
        assert answer.body["duplicates"] == 0
        answer = await post(session, by_path, body, headers)
        assert answer.status == 200, answer.body
        assert answer.body["stored"] == answer.body["received"]
    lists = sum(1 for event in events if event.get("verb") == "list")
    assert await alert_matches(session, server) == lists

    # The apiserver re-sends a batch it got no 2xx for: kept once, counted once.
    for body in bodies:
        again = await post(session, server.url + "/api/v1/logstream/open", body, headers)
        assert again.status == 200, again.body
        assert again.body["stored"] == 0
        assert again.body["duplicates"] == again.body["received"]
        again = await post(session, by_header, body, headers | {"X-P-Stream": "copy"})
        assert again.body["stored"] == 0
    assert await alert_matches(session, server) == lists

    await server.close()
    assert canonical(stored(server.data, "open")) == canonical(events)
    assert canonical(stored(server.data, "copy")) == canonical(events)


async def test_type_clashes_inside_events_are_accepted_and_kept_intact(
    server: Running, session: aiohttp.ClientSession
) -> None:
    odd = {
        "auditID": "odd-1",
        "stage": "ResponseComplete",
        "verb": 42,
        "user": "not-an-object",
        "objectRef": {"resource": ["secrets"], "name": None},
        "responseStatus": {"code": "403"},
        "sourceIPs": "10.0.0.1",
        "annotations": [1, 2],
        "stageTimestamp": "yesterday",
        "requestReceivedTimestamp": 1714557600,
    }
    odder = {"auditID": 7, "stage": {"x": 1}, "verb": True, "impersonatedUser": []}
    answer = await post(session, server.url + "/api/v1/logstream/open", [odd, odder])
    assert answer.status == 200, answer.body
    assert answer.body["stored"] == 2
    await server.close()
    assert canonical(stored(server.data, "open")) == canonical([odd, odder])


def too_big_event(samples: Path) -> dict[str, Any]:
    event = read_lines(samples / "privileged-pod.log")[0]
    assert len(orjson.dumps(event)) > 1024
    return event


def small_events(count: int) -> list[dict[str, Any]]:
    return synthetic_events("small", count)


BAD_REQUESTS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    # (case, path, body, headers, status, words the error must contain)
    ("malformed JSON", "open", b'{"auditID": "a", "verb": ', {}, 400, "invalid JSON"),
    (
        "NDJSON with a bad third line",
        "open",
        b'{"auditID":"n1","verb":"get"}\n{"auditID":"n2","verb":"get"}\n{"auditID": nope}\n',
        {},
        400,
        "line 3",
    ),
    (
        "array item that is not an object",
        "open",
        b'[{"auditID":"x1","verb":"get"}, 5]',
        {},
        400,
        "[1]",
    ),
    ("JSON that is a string", "open", b'"hello"', {}, 400, "not an event"),
    (
        "EventList nested 2,000 levels deep",
        "open",
        b'{"kind":"EventList","items":[{"auditID":"d1","x":' + b"[" * 2000 + b"]" * 2000 + b"}]}",
        {},
        400,
        "depth limit",
    ),
    (
        "Vector envelope around plain text",
        "open",
        orjson.dumps([{"message": "GET /healthz 200", "source_type": "file"}]),
        {},
        400,
        "message",
    ),
    ("empty body", "open", b"", {}, 400, "empty"),
    (
        "unknown encoding",
        "open",
        b'{"auditID":"e1"}',
        {"Content-Encoding": "x-snappy"},
        415,
        "x-snappy",
    ),
    ("unknown stream", "nosuch", b'{"auditID":"u1"}', {}, 401, "credentials"),
    (
        "body over maxBodyBytes",
        "small",
        orjson.dumps(small_events(12)),
        {},
        413,
        "2048",
    ),
    ("missing credentials", "basic", b'{"auditID":"b1"}', {}, 401, "credentials"),
    (
        "wrong password",
        "basic",
        b'{"auditID":"b2"}',
        basic_auth("sender", "wrong"),
        403,
        "credentials",
    ),
    (
        "garbage basic credentials",
        "basic",
        b'{"auditID":"b3"}',
        {"Authorization": "Basic %%%"},
        401,
        "credentials",
    ),
    (
        "basic credentials for a bearer stream",
        "bearer",
        b'{"auditID":"t1"}',
        basic_auth("sender", "s3cret"),
        403,
        "credentials",
    ),
    (
        "wrong bearer token",
        "bearer",
        b'{"auditID":"t2"}',
        {"Authorization": "Bearer tok-124"},
        403,
        "credentials",
    ),
    ("missing bearer token", "bearer", b'{"auditID":"t3"}', {}, 401, "credentials"),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "words"),
    [
        *[pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
        pytest.param(
            "open",
            b'{"auditID":"e2"}',
            {"Content-Encoding": "br"},
            415,
            "br",
            id="brotli encoding",
        ),
    ],
)
async def test_bad_requests_are_refused_with_a_reason_and_keep_nothing(
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    words: str,
    server: Running,
    session: aiohttp.ClientSession,
) -> None:
    answer = await post(session, f"{server.url}/api/v1/logstream/{path}", body, headers)
    assert answer.status == status, answer.body
    assert isinstance(answer.body, dict), answer.body
    assert words in answer.body["error"]
    if status == 401:
        assert "WWW-Authenticate" in answer.headers
    metrics = await metric_samples(session, server)
    assert metrics.get(("auditwatch_events_received_total", path), 0) == 0

    # Nothing of it was kept, and the receiver goes on serving.
    good = synthetic_events("after", 2)
    creds = {"basic": basic_auth("sender", "s3cret"), "bearer": {"Authorization": "Bearer tok-123"}}
    target = path if path != "nosuch" else "open"
    answer = await post(
        session, f"{server.url}/api/v1/logstream/{target}", good, creds.get(target, {})
    )
    assert answer.status == 200, answer.body
    await server.close()
    assert canonical(stored(server.data, target)) == canonical(good)


async def test_missing_stream_header_is_a_400(
    server: Running, session: aiohttp.ClientSession
) -> None:
    answer = await post(session, server.url + "/api/v1/ingest", synthetic_events("h", 1))
    assert answer.status == 400
    assert "X-P-Stream" in answer.body["error"]


@IN_THREADS_AND_WORKERS
async def test_gzip_header_on_a_plain_body_is_a_400(
    server: Running, session: aiohttp.ClientSession
) -> None:
    answer = await post(
        session,
        server.url + "/api/v1/logstream/open",
        orjson.dumps(synthetic_events("g", 2)),
        {"Content-Encoding": "gzip"},
    )
    assert answer.status == 400, answer.body
    assert isinstance(answer.body, dict), f"not a JSON answer: {answer.body!r}"
    assert "gzip" in answer.body["error"]


async def test_compressed_body_over_the_limit_once_decompressed_is_a_413(
    server: Running, session: aiohttp.ClientSession
) -> None:
    """The CRD: maxBodyBytes is the largest body after decompression."""
    body = orjson.dumps(small_events(20))
    assert len(body) > 3 * 2048 and len(gzip.compress(body)) < 2048
    answer = await post(
        session,
        server.url + "/api/v1/logstream/small",
        gzip.compress(body),
        {"Content-Encoding": "gzip"},
    )
    assert answer.status == 413, answer.body


async def test_chunked_body_over_the_limit_is_a_413(
    server: Running, session: aiohttp.ClientSession
) -> None:
    """Without Content-Length the limit is enforced while reading."""
    body = orjson.dumps(small_events(12))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    async with session.post(server.url + "/api/v1/logstream/small", data=chunks()) as response:
        assert response.status == 413
        assert "2048" in (await response.json())["error"]
    assert stored(server.data, "small") == []


@IN_THREADS_AND_WORKERS
async def test_an_event_over_max_event_bytes_refuses_the_whole_body(
    samples: Path, server: Running, session: aiohttp.ClientSession
) -> None:
    body = [small_events(1)[0], too_big_event(samples)]
    answer = await post(session, server.url + "/api/v1/logstream/strict", body)
    assert answer.status == 413
    assert "event 1" in answer.body["error"] and "1024" in answer.body["error"]
    await server.close()
    assert stored(server.data, "strict") == []


async def test_credentials_are_checked_for_basic_and_bearer_streams(
    server: Running, session: aiohttp.ClientSession
) -> None:
    events = synthetic_events("auth", 3)
    answer = await post(
        session, server.url + "/api/v1/logstream/basic", events, basic_auth("sender", "s3cret")
    )
    assert answer.status == 200, answer.body
    answer = await post(
        session,
        server.url + "/api/v1/ingest",
        events,
        {"X-P-Stream": "bearer", "Authorization": "Bearer tok-123"},
    )
    assert answer.status == 200, answer.body
    await server.close()
    assert canonical(stored(server.data, "basic")) == canonical(events)
    assert canonical(stored(server.data, "bearer")) == canonical(events)


CHALLENGE_HEADER = 'Basic realm="auditwatch", Bearer realm="auditwatch"'

PROBES = {
    "no credentials": {},
    "Basic and nothing after it": {"Authorization": "Basic"},
    "Basic and a space": {"Authorization": "Basic "},
    "Bearer and nothing after it": {"Authorization": "Bearer"},
    "garbage basic": {"Authorization": "Basic %%%"},
    "wrong basic": basic_auth("sender", "guess"),
    "wrong bearer": {"Authorization": "Bearer guess"},
    "other scheme": {"Authorization": "Digest username=sender"},
}


@pytest.mark.parametrize("probe", PROBES)
async def test_stream_names_cannot_be_found_by_probing(
    probe: str, server: Running, session: aiohttp.ClientSession
) -> None:
    """An unknown stream answers exactly as a stream with basic auth and one with a bearer
    token do to the same missing or wrong credentials: 401 without usable credentials (a
    scheme with nothing after it included), 403 with wrong ones."""
    headers = PROBES[probe]
    answers = []
    for stream in ("nosuch", "basic", "bearer"):
        for url in (
            f"{server.url}/api/v1/logstream/{stream}",
            f"{server.url}/api/v1/ingest",
        ):
            answer = await post(session, url, b'{"auditID":"p"}', headers | {"X-P-Stream": stream})
            answers.append((answer.status, answer.body, answer.headers.get("WWW-Authenticate")))
    assert len(set(map(repr, answers))) == 1, answers
    status, body, challenge = answers[0]
    expected = 403 if probe.startswith(("wrong", "other")) else 401
    assert status == expected, body
    assert "credentials" in body["error"]
    assert challenge == (CHALLENGE_HEADER if status == 401 else None)


async def test_storage_failure_is_a_503_with_retry_after_and_the_retry_succeeds(
    server: Running, session: aiohttp.ClientSession
) -> None:
    (server.data / "broken").write_text("a file where the stream's directory belongs")
    events = synthetic_events("disk", 4)
    url = server.url + "/api/v1/logstream/broken"
    answer = await post(session, url, events)
    assert answer.status == 503, answer.body
    assert int(answer.headers["Retry-After"]) > 0
    assert "broken" in answer.body["error"]
    # Other streams are unaffected, and the sender's retry is kept once the disk is fine.
    assert (await post(session, server.url + "/api/v1/logstream/open", events)).status == 200
    (server.data / "broken").unlink()
    retried = await post(session, url, events)
    assert retried.status == 200, retried.body
    assert retried.body["stored"] == 4
    await server.close()
    assert canonical(stored(server.data, "broken")) == canonical(events)


async def test_store_refusing_a_batch_is_a_503(
    server: Running, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Store, stream: str, batch: Any) -> Any:
        raise StorageUnavailable("staging is full")

    monkeypatch.setattr(Store, "append", full)
    answer = await post(session, server.url + "/api/v1/logstream/open", synthetic_events("f", 2))
    assert answer.status == 503
    assert answer.headers["Retry-After"].isdigit()
    assert answer.body == {"error": "staging is full"}
    monkeypatch.undo()
    await server.close()
    assert stored(server.data, "open") == []


async def metric_samples(
    session: aiohttp.ClientSession, server: Running
) -> dict[tuple[str, str], float]:
    """Counter samples by (name, stream or alert label)."""
    async with session.get(server.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = sample.labels.get("stream") or sample.labels.get("alert") or ""
            samples[(sample.name, label)] = sample.value
    return samples


async def rejection_reasons(session: aiohttp.ClientSession, server: Running) -> dict[str, float]:
    """auditwatch_requests_rejected_total summed by reason."""
    async with session.get(server.url + "/metrics") as response:
        text = await response.text()
    reasons: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "auditwatch_requests_rejected_total":
                reason = sample.labels["reason"]
                reasons[reason] = reasons.get(reason, 0) + sample.value
    return reasons


async def test_unknown_stream_names_do_not_become_metric_labels(
    server: Running, session: aiohttp.ClientSession
) -> None:
    for n in range(20):
        await post(session, f"{server.url}/api/v1/logstream/random-{n}", b'{"auditID":"r"}')
    async with session.get(server.url + "/metrics") as response:
        text = await response.text()
    assert "random-" not in text


async def test_health_metrics_and_status(
    samples: Path, server: Running, session: aiohttp.ClientSession
) -> None:
    assert await get_json(session, server.url + "/api/v1/liveness") == {"status": "alive"}
    ready = await get_json(session, server.url + "/api/v1/readiness")
    assert ready["ready"] is True

    events = sample_events(samples, "secret-recon-then-exec.log")
    lists = sum(1 for e in events if e.get("verb") == "list")
    await post(session, server.url + "/api/v1/logstream/open", events)
    await post(session, server.url + "/api/v1/logstream/open", events[:5])
    await post(session, server.url + "/api/v1/logstream/nosuch", events)

    metrics = await metric_samples(session, server)
    assert metrics[("auditwatch_events_stored_total", "open")] == len(events)
    assert metrics[("auditwatch_events_received_total", "open")] == len(events) + 5
    assert metrics[("auditwatch_events_duplicate_total", "open")] == 5
    assert metrics[("auditwatch_rule_matches_total", "default/lists")] == lists
    rejected = await rejection_reasons(session, server)
    assert rejected == {"unknown_stream": 1}

    status = await get_json(session, server.url + "/api/v1/status")
    assert set(status) == {"streams", "alerts", "problems"}
    assert status["problems"] == []
    assert set(status["streams"]) == {
        "open",
        "copy",
        "small",
        "strict",
        "basic",
        "bearer",
        "broken",
    }
    stream = status["streams"]["open"]
    assert stream["eventsReceived"] == len(events)
    assert stream["ingestPath"] == "/api/v1/logstream/open"
    assert stream["lastEventTime"] is not None
    assert [c["type"] for c in stream["conditions"]] == ["Ready"]
    assert stream["conditions"][0]["status"] == "True"
    alert = status["alerts"]["default/lists"]
    assert (alert["namespace"], alert["name"], alert["stream"]) == ("default", "lists", "open")
    assert alert["state"] == "Firing"
    assert alert["matches"] == lists
    last_list = [e for e in events if e.get("verb") == "list"][-1]
    assert alert["lastMatch"]["auditID"] == last_list["auditID"]
    assert alert["lastMatch"]["user"] == last_list["user"]["username"]
    assert alert["conditions"][0]["type"] == "Ready"
    assert alert["conditions"][0]["status"] == "True"
    assert alert["observedGeneration"] == 1


async def test_a_decoding_worker_that_dies_costs_one_503(tmp_path: Path, samples: Path) -> None:
    """The request it was to decode gets a 503 to retry; the next one a new worker."""
    resources = tmp_path / "resources"
    write_yaml(resources / "streams.yaml", stream_doc("open"))
    events = sample_events(samples, "impersonation-and-403s.log")
    async with (
        running_receiver(resources, tmp_path / "data", decode_workers=1) as running,
        aiohttp.ClientSession() as session,
    ):
        url = running.url + "/api/v1/logstream/open"
        assert (await post(session, url, event_list(events[:3]))).status == 200
        (worker,) = [p for p in multiprocessing.active_children() if p.name == "auditwatch-decoder"]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        answer = await post(session, url, event_list(events[3:6]))
        assert answer.status == 503
        assert answer.headers["Retry-After"] == RETRY_HEADERS["Retry-After"]
        assert answer.body == {"error": "a decoding worker died; retry"}
        answer = await post(session, url, event_list(events[3:6]))
        assert (answer.status, answer.body["stored"]) == (200, 3)


async def test_a_decoding_worker_hands_over_whether_annotations_are_all_in_their_column() -> None:
    """A batch decoded in a worker process says what one decoded here says: whether its
    `annotations` column holds every event's annotations (the rule evaluator then skips the
    event texts). It says so outside the table, which the store keeps as it is."""
    limits = Limits(body_bytes=1 << 20, event_bytes=1 << 16)
    received = datetime.now(UTC)
    mapped = [{"auditID": "a", "annotations": {"a": "forbid"}}, {"auditID": "b"}]
    listed = [*mapped, {"auditID": "c", "annotations": [{"a": "forbid"}]}]
    rule = compile_rule(parse_expression('annotations["a"] = "forbid"'))
    decoder = Decoder(workers=1)
    try:
        cases = ((mapped, True, [True, False]), (listed, False, [True, False, True]))
        for events, complete, matches in cases:
            body = orjson.dumps(events)
            batch = await decoder.prepare(body, None, limits, received)
            here = prepare_batch(body, None, limits, received)
            assert batch.annotations_complete is here.annotations_complete is complete
            assert batch.table.schema.metadata is None
            assert batch.table.equals(here.table)
            assert rule.evaluate(batch).to_pylist() == matches
    finally:
        decoder.close()


# -- a follower: forwarding to the leader's receiver ------------------------------------------


class Follower:
    """The engine side of a receiver that keeps nothing itself and forwards to `leader`."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.leader: str | None = None

    def forward_to(self) -> str | None:
        return self.leader

    def stream(self, name: str) -> StreamSpec | None:
        raise Rejected(503, "standby", "no leader", RETRY_HEADERS)

    def clock(self) -> datetime:
        return datetime.now(UTC)

    async def ingest(self, stream: StreamSpec, batch: EventBatch) -> dict[str, int]:
        raise AssertionError("a follower never ingests")

    def status(self) -> dict[str, Any]:
        return {"streams": {}, "alerts": {}, "problems": ["follower"]}

    def readiness(self) -> tuple[bool, str]:
        return self.leader is not None, "follower"


@dataclass
class RunningFollower:
    url: str
    ingestor: Follower


@pytest.fixture
async def follower() -> AsyncIterator[RunningFollower]:
    ingestor = Follower()
    runner = web.AppRunner(Receiver(ingestor, forward_to=ingestor.forward_to).app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield RunningFollower(f"http://127.0.0.1:{runner.addresses[0][1]}", ingestor)
    finally:
        await runner.cleanup()


async def forwarded_codes(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """auditwatch_requests_forwarded_total by code."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "auditwatch_requests_forwarded_total"
    }


async def test_a_follower_answers_with_the_leaders_answer_and_the_leader_keeps_the_events(
    samples: Path,
    server: Running,
    follower: RunningFollower,
    session: aiohttp.ClientSession,
) -> None:
    follower.ingestor.leader = server.url
    events = sample_events(samples, "secret-recon-then-exec.log")
    lists = sum(1 for e in events if e.get("verb") == "list")
    answer = await post(session, follower.url + "/api/v1/logstream/open", event_list(events))
    assert answer.status == 200 and answer.body["stored"] == len(events), answer.body
    plain = sample_events(samples, "impersonation-and-403s.log")
    answer = await post(
        session,
        follower.url + "/api/v1/ingest",
        gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in plain)),
        {"X-P-Stream": "copy", "Content-Encoding": "gzip"},
    )
    assert answer.status == 200 and answer.body["stored"] == len(plain), answer.body
    answer = await post(
        session,
        follower.url + "/api/v1/logstream/basic",
        synthetic_events("f", 2),
        basic_auth("sender", "s3cret"),
    )
    assert answer.status == 200, answer.body

    # Refusals are the leader's, with what senders act on.
    answer = await post(session, follower.url + "/api/v1/logstream/open", b"{not json")
    assert answer.status == 400 and "error" in answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    answer = await post(
        session, follower.url + "/api/v1/logstream/bearer", synthetic_events("b", 1)
    )
    assert answer.status == 401 and answer.headers["WWW-Authenticate"] == CHALLENGE_HEADER
    answer = await post(session, follower.url + "/api/v1/logstream/small", small_events(20))
    assert answer.status == 413
    answer = await post(session, follower.url + "/api/v1/logstream/nosuch", events)
    assert answer.status == 401 and "credentials" in answer.body["error"]

    status = await get_json(session, server.url + "/api/v1/status")
    assert status["alerts"]["default/lists"]["matches"] == lists
    assert await forwarded_codes(session, follower.url) == {
        "200": 3,
        "400": 1,
        "401": 2,
        "413": 1,
    }
    await server.close()
    assert canonical(stored(server.data, "open")) == canonical(events)
    assert canonical(stored(server.data, "copy")) == canonical(plain)


async def test_a_follower_passes_compressed_and_chunked_bodies_through_unchanged(
    follower: RunningFollower, session: aiohttp.ClientSession
) -> None:
    body = gzip.compress(orjson.dumps(synthetic_events("z", 50)))
    async with WebhookSink() as sink:
        follower.ingestor.leader = sink.url.removesuffix("/hook")
        headers = {"Content-Encoding": "gzip", "Authorization": "Bearer t", "X-Other": "dropped"}
        answer = await post(session, follower.url + "/api/v1/ingest", body, headers)
        assert answer.status == 200

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 100):
                yield body[start : start + 100]

        async with session.post(
            follower.url + "/api/v1/logstream/open",
            data=chunks(),
            headers={"Content-Encoding": "gzip"},
        ) as response:
            assert response.status == 200
    first, second = sink.received
    assert first.raw == body and second.raw == body
    assert first.headers["Content-Encoding"] == "gzip" == second.headers["Content-Encoding"]
    assert first.headers["Authorization"] == "Bearer t" and "X-Other" not in first.headers
    assert first.headers[FORWARDED_HEADER] == "1"


async def test_a_forwarded_request_is_never_forwarded_again(
    server: Running, follower: RunningFollower, session: aiohttp.ClientSession
) -> None:
    follower.ingestor.leader = server.url
    events = synthetic_events("hop", 3)
    answer = await post(
        session, follower.url + "/api/v1/logstream/open", events, {FORWARDED_HEADER: "1"}
    )
    assert answer.status == 503 and answer.headers["Retry-After"]
    assert "leader" in answer.body["error"]
    assert await rejection_reasons(session, server) == {}
    await server.close()
    assert stored(server.data, "open") == []


async def test_an_unreachable_leader_is_a_503_with_retry_after(
    follower: RunningFollower, session: aiohttp.ClientSession
) -> None:
    follower.ingestor.leader = f"http://127.0.0.1:{free_port()}"
    answer = await post(session, follower.url + "/api/v1/logstream/open", synthetic_events("u", 1))
    assert answer.status == 503 and answer.headers["Retry-After"]
    assert follower.ingestor.leader in answer.body["error"]
    async with session.get(follower.url + "/metrics") as response:
        assert 'reason="leader_unreachable"' in await response.text()


# -- slow and hostile senders -------------------------------------------------------------------


SHORT_DEADLINES = ReceiverOptions(header_timeout=1.5, body_timeout=1.5)


@pytest.fixture
async def hurried(tmp_path: Path) -> AsyncIterator[Running]:
    """Streams open (alert on lists) and copy, with deadlines of 1.5 s."""
    resources = tmp_path / "resources"
    write_yaml(resources / "streams.yaml", stream_doc("open"), stream_doc("copy"))
    write_yaml(resources / "alert.yaml", alert_doc("lists", "open", LIST_RULE, None))
    async with running_receiver(resources, tmp_path / "data", options=SHORT_DEADLINES) as running:
        yield running


async def raw_connection(
    server: Running, data: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A socket to the server that has sent `data` and then goes silent."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    return reader, writer


def slow_post(stream: str, length: int, sent: bytes) -> bytes:
    return (
        f"POST /api/v1/logstream/{stream} HTTP/1.1\r\nHost: auditwatch\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode() + sent


async def test_slow_senders_hold_no_slot_and_are_cut_off_at_the_deadlines(
    hurried: Running, session: aiohttp.ClientSession
) -> None:
    """40 connections that send a POST's headers and one byte of its body, and 5 that send
    half a request line, then go silent: other requests, on their stream and on another, are
    answered 200 meanwhile; the first get 408 and are closed once the body deadline passes,
    the others are closed once the header deadline passes."""
    started = time.monotonic()
    bodies = [await raw_connection(hurried, slow_post("open", 100, b"[")) for _ in range(40)]
    headers = [await raw_connection(hurried, b"POST /api/v1/log") for _ in range(5)]
    await asyncio.sleep(0.3)  # every slow request is in its handler by now

    for stream in ("copy", "open"):
        answer = await post(
            session, f"{hurried.url}/api/v1/logstream/{stream}", synthetic_events(stream, 3)
        )
        assert answer.status == 200, answer.body
        assert answer.body["stored"] == 3
    assert time.monotonic() - started < SHORT_DEADLINES.body_timeout, "answered too late"

    for reader, writer in bodies:
        answer = await asyncio.wait_for(reader.read(), SHORT_DEADLINES.body_timeout + 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert b'{"error":"the body did not arrive within 1.5 s"}' in answer
        writer.close()
    for reader, writer in headers:
        assert await asyncio.wait_for(reader.read(), SHORT_DEADLINES.header_timeout + 5) == b""
        writer.close()
    reasons = await rejection_reasons(session, hurried)
    assert reasons == {"body_timeout": 40}
    await hurried.close()
    assert len(stored(hurried.data, "open")) == 3


async def test_one_streams_slow_bodies_cannot_starve_another_stream(
    tmp_path: Path, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies still arriving may hold 4 MiB here, one stream 3 MiB of it: once senders that
    stall with 1 MiB sent each hold the stream's share, it gets 503 (retry) for another half
    MiB, while the other stream is still served a half-MiB body."""
    monkeypatch.setattr(receive, "MAX_READING_BYTES", 4 << 20)
    resources = tmp_path / "resources"
    write_yaml(resources / "streams.yaml", stream_doc("open"), stream_doc("copy"))
    half_mib = b" " * (512 << 10)
    async with running_receiver(resources, tmp_path / "data") as running:
        stalled = [
            await raw_connection(running, slow_post("open", 2 << 20, b" " * (1 << 20)))
            for _ in range(3)
        ]
        await asyncio.sleep(0.3)
        answer = await post(session, running.url + "/api/v1/logstream/open", half_mib + b"[]")
        assert answer.status == 503, answer.body
        assert answer.headers["Retry-After"] == RETRY_HEADERS["Retry-After"]
        events = synthetic_events("c", 2)
        answer = await post(
            session, running.url + "/api/v1/logstream/copy", half_mib + orjson.dumps(events)
        )
        assert answer.status == 200, answer.body
        for _, writer in stalled:
            writer.close()
    assert canonical(stored(running.data, "copy")) == canonical(events)


async def test_a_malformed_chunked_request_logs_a_short_reason_not_its_bytes(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await raw_connection(
        server,
        b"POST /api/v1/logstream/open HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10\r\n" + b"SECRET-PAYLOAD!!" + b"A" * 120_000,
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") or answer.startswith(b"HTTP/1.0 400 ")
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert "SECRET-PAYLOAD" not in logged and "AAAA" not in logged
    assert len(logged) < 1000, logged[:300]
    (record,) = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert "chunk" in record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- who may read status and metrics ------------------------------------------------------------


STATUS_TOKEN = "status-t0ken"


async def test_status_and_metrics_need_the_status_token_and_probes_do_not(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    resources = tmp_path / "resources"
    write_yaml(resources / "streams.yaml", stream_doc("open"))
    write_yaml(resources / "alert.yaml", alert_doc("lists", "open", LIST_RULE, None))
    options = ReceiverOptions(status_token=STATUS_TOKEN)
    async with running_receiver(resources, tmp_path / "data", options=options) as running:
        await post(session, running.url + "/api/v1/logstream/open", synthetic_events("s", 1))
        for path in ("/api/v1/status", "/metrics"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, basic_auth("a", "b")):
                async with session.get(running.url + path, headers=headers) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "status token" in (await response.json())["error"]
                    assert "tester" not in await response.text()
            bearer = {"Authorization": f"Bearer {STATUS_TOKEN}"}
            async with session.get(running.url + path, headers=bearer) as response:
                assert response.status == 200
        for probe in ("/api/v1/liveness", "/api/v1/readiness"):
            async with session.get(running.url + probe) as response:
                assert response.status == 200

        # `auditwatch status` passes the token from its flag or the environment.
        cli = CliRunner()
        args = ["status", "--server", running.url]
        refused = await asyncio.to_thread(
            cli.invoke, main, args, env={"AUDITWATCH_STATUS_TOKEN": ""}
        )
        assert refused.exit_code == 1 and "401" in refused.output
        shown = await asyncio.to_thread(
            cli.invoke, main, args, env={"AUDITWATCH_STATUS_TOKEN": STATUS_TOKEN}
        )
        assert shown.exit_code == 0, shown.output
        assert "lists" in shown.output and "open" in shown.output
        shown = await asyncio.to_thread(cli.invoke, main, [*args, "--token", STATUS_TOKEN])
        assert shown.exit_code == 0, shown.output


def own_network_address() -> str:
    """An address of this host other than loopback (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: nothing is sent
            address: str = probe.getsockname()[0]
        except OSError:
            address = ""
    if not address or ipaddress.ip_address(address).is_loopback:
        pytest.skip("this host has no network address besides loopback")
    return address


async def test_without_a_token_status_and_metrics_answer_loopback_clients_only(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    resources = tmp_path / "resources"
    write_yaml(resources / "streams.yaml", stream_doc("open"))
    address = own_network_address()
    async with running_receiver(resources, tmp_path / "data", host="0.0.0.0") as running:
        port = running.url.rsplit(":", 1)[1]
        for path in ("/api/v1/status", "/metrics"):
            async with session.get(f"http://{address}:{port}{path}") as response:
                assert response.status == 403
                assert "--status-token" in (await response.json())["error"]
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                assert response.status == 200
        for probe in ("/api/v1/liveness", "/api/v1/readiness"):
            async with session.get(f"http://{address}:{port}{probe}") as response:
                assert response.status == 200
        answer = await post(
            session, f"http://{address}:{port}/api/v1/logstream/open", synthetic_events("n", 1)
        )
        assert answer.status == 200, answer.body
