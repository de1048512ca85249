"""The engine without HTTP: configuration changes, alert state, restarts, broken rules.

Real storage in tmp_path and real notifications to a local webhook sink.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.e2e_support import (
    WebhookSink,
    alert_doc,
    canonical,
    read_lines,
    stored,
    stream_doc,
    synthetic_events,
)

from auditwatch.config.build import build_alert, build_stream
from auditwatch.config.model import AlertSpec, StreamSpec
from auditwatch.engine import Engine
from auditwatch.normalise import normalise
from auditwatch.rules import evaluate

SECRET_READS = 'objectRef.resource = "secrets" and (verb = "get" or verb = "list")'


async def ingest(engine: Engine, events: list[dict[str, Any]]) -> dict[str, int]:
    """What the receiver does with a decoded body: normalise it, then hand it to the engine."""
    stream = engine.stream("audit")
    assert stream is not None
    return await engine.ingest(stream, normalise(events, received_at=engine.clock()))


def no_secrets(namespace: str | None, name: str, key: str) -> str | None:
    return None


def streams(*names: str) -> dict[str, StreamSpec]:
    return {name: build_stream(stream_doc(name), no_secrets) for name in names}


def alert(name: str, stream: str, rule: str, endpoint: str | None, **options: Any) -> AlertSpec:
    return build_alert(alert_doc(name, stream, rule, endpoint, **options), no_secrets)


def alerts(*specs: AlertSpec) -> dict[str, AlertSpec]:
    return {spec.key: spec for spec in specs}


@pytest.fixture
async def sink() -> AsyncIterator[WebhookSink]:
    async with WebhookSink() as webhook:
        yield webhook


@pytest.fixture
def recon(samples: Path) -> list[dict[str, Any]]:
    """The minikube attack: secret reads (denied and not), role enumeration, an exec."""
    return read_lines(samples / "secret-recon-then-exec.log")


def secret_reads(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("objectRef", {}).get("resource") == "secrets" and e.get("verb") in ("get", "list")
    ]


def alert_status(engine: Engine, key: str) -> dict[str, Any]:
    status: dict[str, Any] = engine.status()["alerts"][key]
    return status


async def settle(engine: Engine) -> None:
    """Let notification deliveries started by an ingest finish."""
    for _ in range(200):
        if not engine._deliveries:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("deliveries did not finish")


async def test_ingest_stores_and_fires_the_alert(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    engine = Engine(tmp_path / "data")
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1h")
    engine.apply(streams("audit"), alerts(spec))
    reads = secret_reads(recon)
    assert reads, "the sample has secret reads"

    counts = await ingest(engine, recon)
    await settle(engine)

    assert counts == {"received": len(recon), "stored": len(recon), "duplicates": 0}
    [firing] = sink.bodies("firing")
    assert firing["count"] == firing["total"] == len(reads)
    assert firing["event"]["auditID"] == reads[-1]["auditID"]
    status = alert_status(engine, spec.key)
    assert status["state"] == "Firing"
    assert status["matches"] == len(reads)
    await engine.close()
    assert canonical(stored(tmp_path / "data", "audit")) == canonical(recon)


async def test_config_change_keeps_state_unless_the_rule_changes(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    engine = Engine(tmp_path / "data")
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1h")
    engine.apply(streams("audit"), alerts(spec))
    await ingest(engine, recon)
    reads = len(secret_reads(recon))

    # A new message (same stream, same rule): still firing, count continues, no new "firing".
    reworded = alert(
        "secret-read", "audit", SECRET_READS, sink.url, interval="1h", message="read {verb}"
    )
    engine.apply(streams("audit"), alerts(reworded))
    more = synthetic_events("more", 2, objectRef={"resource": "secrets", "name": "token"})
    await ingest(engine, more)
    await settle(engine)
    status = alert_status(engine, spec.key)
    assert (status["state"], status["matches"]) == ("Firing", reads + 2)
    assert len(sink.bodies("firing")) == 1

    # A new rule: matches of the old one say nothing about it.
    changed = alert("secret-read", "audit", 'verb = "create"', sink.url, interval="1h")
    engine.apply(streams("audit"), alerts(changed))
    status = alert_status(engine, spec.key)
    assert status["state"] == "Listening"
    assert status["matches"] == 0
    creates = [e for e in recon if e.get("verb") == "create"]
    fresh = [e | {"auditID": "again-" + str(e["auditID"])} for e in creates]
    await ingest(engine, fresh)
    await settle(engine)
    assert alert_status(engine, spec.key)["matches"] == len(creates) > 0
    assert len(sink.bodies("firing")) == 2
    await engine.close()


async def test_deleted_alert_stops_matching_at_once(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    engine = Engine(tmp_path / "data")
    spec = alert("secret-read", "audit", SECRET_READS, sink.url)
    engine.apply(streams("audit"), alerts(spec))
    engine.apply(streams("audit"), {})
    await ingest(engine, recon)
    await settle(engine)
    assert engine.status()["alerts"] == {}
    assert sink.received == []
    assert b'alert="default/secret-read"' not in engine.metrics.exposition()
    await engine.close()


async def test_alert_on_an_unknown_stream_is_invalid(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "data")
    spec = alert("orphan", "nowhere", SECRET_READS, None)
    engine.apply(streams("audit"), alerts(spec))
    status = alert_status(engine, spec.key)
    assert status["state"] == "Invalid"
    assert status["stream"] == "nowhere"
    [ready] = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "StreamNotFound")
    assert "nowhere" in ready["message"]
    await engine.close()


async def fired_and_closed(data: Path, sink: WebhookSink, recon: list[dict[str, Any]]) -> AlertSpec:
    """An engine on `data` whose secret-read alert fired on `recon`, then shut down."""
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1h", resolve_after="1h")
    first = Engine(data)
    first.apply(streams("audit"), alerts(spec))
    await ingest(first, recon)
    await settle(first)
    await first.close()
    return spec


async def test_state_survives_a_restart(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    data = tmp_path / "data"
    spec = await fired_and_closed(data, sink, recon)
    reads = len(secret_reads(recon))

    second = Engine(data)
    second.apply(streams("audit"), alerts(spec))
    status = alert_status(second, spec.key)
    assert (status["state"], status["matches"]) == ("Firing", reads)
    # A batch the apiserver re-sends after the restart is still recognised.
    again = await ingest(second, recon)
    assert again["stored"] == 0
    more = synthetic_events("later", 1, objectRef={"resource": "secrets", "name": "x"})
    await ingest(second, more)
    await settle(second)
    assert alert_status(second, spec.key)["matches"] == reads + 1
    assert len(sink.bodies("firing")) == 1, "a restored firing alert is not new"
    await second.close()
    assert canonical(stored(data, "audit")) == canonical(recon + more)


async def test_a_failing_rule_does_not_fail_ingest(
    tmp_path: Path,
    sink: WebhookSink,
    recon: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken_rule = 'requestObject.boom = "x"'
    test_path = evaluate._PathTest.__call__

    def test_or_explode(self: evaluate._PathTest, ctx: Any, row: int) -> bool:
        if "boom" in self.path:
            raise RuntimeError("rule bug")
        return test_path(self, ctx, row)

    monkeypatch.setattr(evaluate._PathTest, "__call__", test_or_explode)
    engine = Engine(tmp_path / "data")
    broken = alert("broken", "audit", broken_rule, sink.url)
    working = alert("secret-read", "audit", SECRET_READS, sink.url)
    engine.apply(streams("audit"), alerts(broken, working))

    counts = await ingest(engine, recon)
    await settle(engine)
    assert counts["stored"] == len(recon)
    assert alert_status(engine, working.key)["matches"] == len(secret_reads(recon))
    assert alert_status(engine, broken.key)["matches"] == 0
    assert [b["alert"] for b in sink.bodies()] == ["secret-read"]
    await engine.close()
    assert canonical(stored(tmp_path / "data", "audit")) == canonical(recon)


async def test_repeat_and_resolve_are_driven_by_run(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    engine = Engine(tmp_path / "data")
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1s", resolve_after="2s")
    engine.apply(streams("audit"), alerts(spec))
    stop = asyncio.Event()
    loop = asyncio.create_task(engine.run(stop))
    await ingest(engine, recon)
    more = synthetic_events("more", 1, objectRef={"resource": "secrets"}, verb="list")
    await ingest(engine, more)
    repeat = await sink.wait_for("repeat", 3)
    assert (repeat.body["count"], repeat.body["event"]["auditID"]) == (1, "more-0")
    resolved = await sink.wait_for("resolved", 4)
    assert resolved.at - repeat.at < 2.5
    assert alert_status(engine, spec.key)["state"] == "Resolved"
    stop.set()
    await loop
    await engine.close()


async def test_alert_deleted_while_stopped_starts_afresh_when_created_again(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    data = tmp_path / "data"
    spec = await fired_and_closed(data, sink, recon)

    without = Engine(data)
    without.apply(streams("audit"), {})
    await without.close()

    recreated = Engine(data)
    recreated.apply(streams("audit"), alerts(spec))
    status = alert_status(recreated, spec.key)
    await recreated.close()
    assert (status["state"], status["matches"]) == ("Listening", 0)


class Clock:
    """A settable clock for the engine."""

    def __init__(self) -> None:
        self.now = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_ready_transition_time_is_when_the_config_was_applied(tmp_path: Path) -> None:
    clock = Clock()
    engine = Engine(tmp_path / "data", clock=clock)
    engine.apply(streams("audit"), alerts(alert("a", "audit", SECRET_READS, None)))
    applied = clock.now
    clock.now += timedelta(hours=1)
    status = engine.status()
    await engine.close()
    expected = applied.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert status["alerts"]["default/a"]["conditions"][0]["lastTransitionTime"] == expected
    assert status["streams"]["audit"]["conditions"][0]["lastTransitionTime"] == expected


async def test_a_stream_condition_is_not_shared_with_an_alert(tmp_path: Path) -> None:
    clock = Clock()
    engine = Engine(tmp_path / "data", clock=clock)
    orphan = build_alert(
        alert_doc("audit", "nowhere", SECRET_READS, None)
        | {"metadata": {"name": "audit", "namespace": "stream"}},
        no_secrets,
    )
    engine.apply(streams("audit"), alerts(orphan))
    first = engine.status()["streams"]["audit"]["conditions"][0]["lastTransitionTime"]
    clock.now += timedelta(hours=1)
    later = engine.status()["streams"]["audit"]["conditions"][0]["lastTransitionTime"]
    await engine.close()
    assert later == first
