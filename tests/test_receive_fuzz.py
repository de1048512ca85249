"""Property-based fuzzing of the receiver: hostile bodies in every shape and encoding against a
real Engine and receiver on a loopback port.

Whatever a body holds, the answer is never a 5xx, the engine's background task keeps running,
a refused body leaves nothing stored, and a valid event posted next is kept and matched. The
search is bounded (fixed `max_examples` and deadline) so that it runs in CI on every change.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.e2e_support import Running, alert_doc, running_receiver, stored, stream_doc, write_yaml

CANARY_USER = "fuzz-canary"
canary_ids = itertools.count()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    """Stream `fuzz`; the alert `canary` matches only the canary events, `gets` most fuzzed
    events (so that hostile values reach alert state, which is saved in the background)."""
    resources = tmp_path / "resources"
    write_yaml(resources / "streams.yaml", stream_doc("fuzz"))
    write_yaml(
        resources / "alerts.yaml",
        alert_doc("canary", "fuzz", f'user.username = "{CANARY_USER}"', None),
        alert_doc("gets", "fuzz", 'verb = "get"', None),
    )
    async with running_receiver(resources, tmp_path / "data") as running:
        yield running


class Client:
    """Blocking HTTP on one keep-alive connection, for Hypothesis's synchronous test body (run
    in a thread while the server's event loop serves)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        text = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
        try:
            return response.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return response.status, text

    def status(self) -> dict[str, Any]:
        code, body = self.request("GET", "/api/v1/status")
        assert code == 200, body
        result: dict[str, Any] = body
        return result


def check_body(
    server: Running, client: Client, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    """Post `body`, then a canary event; assert what must hold whatever the body was. The
    answer to the body and the canary's auditID."""
    before = client.status()
    code, answer = client.request("POST", "/api/v1/logstream/fuzz", body, headers)
    assert code < 500, (code, answer)
    after = client.status()
    if code != 200:
        kept = (
            before["streams"]["fuzz"]["eventsReceived"],
            after["streams"]["fuzz"]["eventsReceived"],
        )
        assert kept[0] == kept[1], f"refused with {code} but events were kept: {kept}"
    assert not server.loop.done(), "the engine's background task stopped"

    canary = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "auditID": f"canary-{next(canary_ids)}",
        "stage": "ResponseComplete",
        "verb": "watch",
        "user": {"username": CANARY_USER},
        "objectRef": {"resource": "pods", "namespace": "default"},
    }
    matches = after["alerts"]["default/canary"].get("matches", 0)
    kept, answer = client.request("POST", "/api/v1/logstream/fuzz", orjson.dumps(canary))
    assert (kept, answer.get("stored")) == (200, 1), (kept, answer)
    assert client.status()["alerts"]["default/canary"]["matches"] == matches + 1
    return code, canary["auditID"]


# -- strategies ---------------------------------------------------------------------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([-(2**63), 2**63 - 1, 2**64 - 1, 0, -1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1.7976931348623157e308, -5e-324, 1e308])
    | st.text(max_size=12)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def deep(draw: st.DrawFn, max_depth: int = 200) -> Any:
    """A value nested up to `max_depth` levels in arrays and objects."""
    value = draw(values)
    for wrap in draw(st.lists(st.booleans(), max_size=max_depth)):
        value = [value] if wrap else {"k": value}
    return value


def either(typed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A well-known field's value: of its type mostly, of any other type or shape sometimes."""
    return typed | values


texts = st.text(max_size=16).filter(lambda text: text != CANARY_USER)
events = st.fixed_dictionaries(
    {"auditID": either(st.uuids().map(str))},
    optional={
        "kind": either(st.just("Event")),
        "apiVersion": either(st.just("audit.k8s.io/v1")),
        "level": either(st.sampled_from(["Metadata", "Request", "RequestResponse"])),
        "stage": either(st.sampled_from(["ResponseComplete", "ResponseStarted", "Panic"])),
        "requestURI": either(texts),
        "verb": either(st.sampled_from(["get", "list", "create", "delete"])),
        "user": either(
            st.fixed_dictionaries(
                {},
                optional={
                    "username": either(texts),
                    "uid": either(texts),
                    "groups": either(st.lists(texts, max_size=3)),
                    "extra": values,
                },
            )
        ),
        "impersonatedUser": values,
        "sourceIPs": either(st.lists(st.ip_addresses().map(str), max_size=2)),
        "userAgent": either(texts),
        "objectRef": either(
            st.fixed_dictionaries(
                {},
                optional={
                    key: either(texts)
                    for key in ("resource", "namespace", "name", "apiGroup", "subresource")
                },
            )
        ),
        "responseStatus": either(
            st.fixed_dictionaries({}, optional={"code": either(st.integers(100, 599))})
        ),
        "requestObject": values | deep(),
        "responseObject": values,
        "requestReceivedTimestamp": either(st.datetimes().map(lambda t: t.isoformat() + "Z")),
        "stageTimestamp": either(st.datetimes().map(lambda t: t.isoformat() + "Z")),
        "annotations": either(st.dictionaries(texts, texts, max_size=3)),
    },
)


def dumps(event: Any, duplicate_keys: bool) -> bytes:
    text = orjson.dumps(event)
    if duplicate_keys and text.startswith(b"{") and text != b"{}":
        text = b'{"verb":"dup","auditID":"dup",' + text[1:]
    return text


SHAPES: dict[str, Callable[[list[Any], bool], bytes]] = {
    "single": lambda items, dup: dumps(items[0], dup),
    "pretty": lambda items, dup: orjson.dumps(items[0], option=orjson.OPT_INDENT_2),
    "array": lambda items, dup: b"[" + b",".join(dumps(e, dup) for e in items) + b"]",
    "EventList": lambda items, dup: (
        b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":['
        + b",".join(dumps(e, dup) for e in items)
        + b"]}"
    ),
    "NDJSON": lambda items, dup: b"\n".join(dumps(e, dup) for e in items) + b"\n",
    "Vector envelopes": lambda items, dup: orjson.dumps(
        [{"message": dumps(e, dup).decode(), "source_type": "file"} for e in items]
    ),
    "AKS records": lambda items, dup: orjson.dumps(
        {"records": [{"properties": {"log": dumps(e, dup).decode()}} for e in items]}
    ),
}
ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda body: body,
    "gzip": gzip.compress,
    "zstd": zstandard.ZstdCompressor().compress,
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A body of any shape and encoding, sometimes damaged, and its headers."""
    items = draw(st.lists(events | values, min_size=1, max_size=4))
    body = SHAPES[draw(st.sampled_from(sorted(SHAPES)))](items, draw(st.booleans()))
    damage = draw(st.sampled_from(["none", "none", "invalid UTF-8", "truncated", "bytes"]))
    if damage == "invalid UTF-8":
        body = body.replace(b'"', b'"\xff\xfe', 1)
    elif damage == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif damage == "bytes":
        body = draw(st.binary(max_size=64))
    encoding = draw(st.sampled_from(sorted(ENCODINGS)))
    headers = {"Content-Type": "application/json"}
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
        if draw(st.integers(0, 9)) != 0:  # sometimes the header on a plain body
            body = ENCODINGS[encoding](body)
    return body, headers


async def test_no_body_breaks_the_receiver(server: Running) -> None:
    answered: dict[int, int] = {}
    canaries: list[str] = []

    @settings(
        max_examples=150,
        deadline=5000,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(requests())
    def fuzz(request: tuple[bytes, dict[str, str]]) -> None:
        code, canary = check_body(server, client, *request)
        answered[code] = answered.get(code, 0) + 1
        canaries.append(canary)

    client = Client(server.url)
    await asyncio.to_thread(fuzz)
    assert {200, 400} <= set(answered), f"bodies were all kept or all refused: {answered}"
    await server.close()
    kept = [event.get("auditID") for event in stored(server.data, "fuzz")]
    assert set(canaries) - {k for k in kept if isinstance(k, str)} == set()


# -- bodies that once stopped the engine or lost events (kept as regressions) ---------------

ONCE_BROKE = {
    # An event matching an alert with 1e999 and an integer over 64 bits: saving alert state fails.
    "1e999 and a 100-bit integer, one-line array": (
        b'[{"auditID":"huge-1","verb":"get","stage":"ResponseComplete",'
        b'"requestObject":{"n":1e999,"big":123456789012345678901234567890}}]'
    ),
    "a 70-bit integer on the general path (NDJSON)": (
        b'{"auditID":"huge-2","verb":"get","requestObject":{"big":1180591620717411303425}}\n'
        b'{"auditID":"huge-3","verb":"list"}\n'
    ),
    "nesting 300 levels deep, NDJSON": (
        b'{"auditID":"deep-1","verb":"get","requestObject":'
        + b"[" * 300
        + b"]" * 300
        + b'}\n{"auditID":"deep-2","verb":"list"}\n'
    ),
    "nesting 1000 levels deep, one-line array": (
        b'[{"auditID":"deep-3","verb":"get","requestObject":' + b"[" * 1000 + b"]" * 1000 + b"}]"
    ),
}


@pytest.mark.parametrize("body", ONCE_BROKE.values(), ids=ONCE_BROKE.keys())
async def test_known_hostile_bodies(body: bytes, server: Running) -> None:
    """The same checks, a state save later (about every 1.7 s), and the events kept as sent."""
    client = Client(server.url)
    code, _ = await asyncio.to_thread(check_body, server, client, body, {})
    started = time.monotonic()
    while time.monotonic() - started < 3:
        assert not server.loop.done(), "the engine's background task stopped"
        await asyncio.sleep(0.1)
    await asyncio.to_thread(check_body, server, client, b'{"auditID":"later"}', {})
    await server.close()
    kept = {event["auditID"]: event for event in stored(server.data, "fuzz")}
    if code == 200:  # kept, and kept as sent (Python's json reads what orjson refuses)
        for line in body.splitlines():
            sent = json.loads(line)
            for event in sent if isinstance(sent, list) else [sent]:
                assert json.loads(orjson.dumps(kept[event["auditID"]])) == event
