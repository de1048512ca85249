"""`replay` sends what the apiserver's webhook backend sends, and retries as it does."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from tests.e2e_support import WebhookSink, read_lines, synthetic_events

from auditwatch.credentials import bearer_authorization
from auditwatch.replay import ReplayError, replay


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookSink]:
    async with WebhookSink() as sink:
        yield sink


def base_url(sink: WebhookSink) -> str:
    return sink.url.removesuffix("/hook")


async def test_event_lists_of_400_without_kind_on_items(receiver: WebhookSink) -> None:
    events = synthetic_events("r", 1000)
    progress: list[int] = []
    result = await replay(events, base_url(receiver), stream="audit", on_batch=progress.append)

    assert (result.events, result.batches, result.retries) == (1000, 3, 0)
    assert progress == [400, 400, 200]
    bodies = [delivery.body for delivery in receiver.received]
    assert [len(body["items"]) for body in bodies] == [400, 400, 200]
    for body in bodies:
        assert (body["kind"], body["apiVersion"]) == ("EventList", "audit.k8s.io/v1")
        assert all("kind" not in item and "apiVersion" not in item for item in body["items"])
    sent = [item for body in bodies for item in body["items"]]
    expected = [{k: v for k, v in e.items() if k not in ("kind", "apiVersion")} for e in events]
    assert sent == expected
    for delivery in receiver.received:
        assert delivery.headers["X-P-Stream"] == "audit"
        assert delivery.headers["Content-Type"] == "application/json"


async def test_real_sample_gzip_and_bearer_token(receiver: WebhookSink, samples: Path) -> None:
    events = read_lines(samples / "impersonation-and-403s.log")
    result = await replay(
        events,
        base_url(receiver),
        stream="audit",
        compress=True,
        authorization=bearer_authorization("tok"),
        batch_size=10,
    )
    assert result.batches == 4
    for delivery in receiver.received:
        assert delivery.headers["Content-Encoding"] == "gzip"
        assert delivery.headers["Authorization"] == "Bearer tok"
    items = [
        item for d in receiver.received for item in orjson.loads(gzip.decompress(d.raw))["items"]
    ]
    assert [item["auditID"] for item in items] == [event["auditID"] for event in events]
    assert items[0]["user"] == events[0]["user"]


async def test_retries_a_503_then_succeeds(receiver: WebhookSink) -> None:
    receiver.answers = [503, 503]
    events = synthetic_events("retry", 5)
    result = await replay(events, base_url(receiver), stream="audit", backoff=0.01)
    assert (result.events, result.batches, result.retries) == (5, 1, 2)
    assert len(receiver.received) == 3
    assert receiver.received[0].raw == receiver.received[2].raw, "the same batch again"


async def test_gives_up_at_once_on_a_400(receiver: WebhookSink) -> None:
    receiver.answers = [400]
    with pytest.raises(ReplayError, match="400"):
        await replay(synthetic_events("bad", 5), base_url(receiver), stream="audit", backoff=0.01)
    assert len(receiver.received) == 1


async def test_gives_up_after_the_attempts(receiver: WebhookSink) -> None:
    receiver.answers = [503] * 3
    with pytest.raises(ReplayError, match="3 attempts"):
        await replay(
            synthetic_events("down", 5), base_url(receiver), stream="a", attempts=3, backoff=0.01
        )
    assert len(receiver.received) == 3
