"""The engine without HTTP: configuration changes, alert state, restarts, broken rules.

Real storage in tmp_path and real notifications to a local webhook sink.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from tests.e2e_support import (
    WebhookSink,
    alert_doc,
    canonical,
    eventually,
    post,
    read_lines,
    running_receiver,
    stored,
    stream_doc,
    synthetic_events,
    wait_until,
    write_yaml,
)

import auditwatch.engine as engine_module
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


def alert_in_namespace(namespace: str, name: str, rule: str, endpoint: str) -> AlertSpec:
    document = alert_doc(name, "audit", rule, endpoint, interval="1h", message="{requestObject}")
    document["metadata"]["namespace"] = namespace
    return build_alert(document, no_secrets)


async def test_a_tenants_alert_sees_only_events_about_its_own_namespace(
    tmp_path: Path, sink: WebhookSink
) -> None:
    """The default grant: a namespaced alert gets nothing of other namespaces, nor of
    cluster-scoped requests, even through its message template; the home namespace (`default`
    in standalone mode) sees everything."""
    engine = Engine(tmp_path / "data")
    tenant = alert_in_namespace("team-a", "secrets", SECRET_READS, sink.url)
    platform = alert_in_namespace("default", "secrets", SECRET_READS, sink.url)
    engine.apply(streams("audit"), alerts(tenant, platform))

    def reads(prefix: str, count: int, namespace: str | None) -> list[dict[str, Any]]:
        ref = {"resource": "secrets", "name": "token"}
        if namespace is not None:
            ref["namespace"] = namespace
        body = {"data": {"token": f"from-{prefix}"}}
        return synthetic_events(prefix, count, objectRef=ref, requestObject=body)

    ours = reads("ours", 2, "team-a")
    theirs = reads("theirs", 3, "kube-system")
    cluster_wide = reads("all", 1, None)  # `kubectl get secrets -A`: no namespace
    await ingest(engine, ours + theirs + cluster_wide)
    await settle(engine)

    tenant_status = alert_status(engine, tenant.key)
    assert tenant_status["matches"] == 2
    assert tenant_status["lastMatch"]["auditID"] == ours[-1]["auditID"]
    assert alert_status(engine, platform.key)["matches"] == 6
    by_alert = {body["namespace"]: body for body in sink.bodies("firing")}
    assert "from-ours" in by_alert["team-a"]["message"]
    assert "from-theirs" not in json.dumps(by_alert["team-a"])
    assert "from-all" not in json.dumps(by_alert["team-a"])

    # Later events about kube-system only: the tenant's alert sees nothing at all of them.
    await ingest(engine, reads("later", 4, "kube-system"))
    assert alert_status(engine, tenant.key)["matches"] == 2
    assert alert_status(engine, platform.key)["matches"] == 10
    await engine.close()


HOSTILE_NUMBERS = (
    b'"requestObject":{"n":1e999,"big":123456789012345678901234567890,'
    b'"wide":1180591620717411303424,"neg":-1e999}'
)


def hostile_event(audit_id: str) -> bytes:
    """A secret read whose requestObject holds numbers no double or 64-bit integer holds."""
    return (
        b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","auditID":"' + audit_id.encode() + b'",'
        b'"stage":"ResponseComplete","verb":"get","requestURI":"/api/v1/secrets/s",'
        b'"user":{"username":"mallory"},"objectRef":{"resource":"secrets","name":"s"},'
        + HOSTILE_NUMBERS
        + b"}"
    )


async def test_numbers_beyond_64_bits_and_doubles_are_kept_whole_and_the_engine_goes_on(
    tmp_path: Path, sink: WebhookSink
) -> None:
    """Once such an event matched, saving alert state killed the background loop: the alert
    never resolved and nothing was flushed. Now every path keeps the event byte for byte."""
    resources, data = tmp_path / "resources", tmp_path / "data"
    write_yaml(resources / "stream.yaml", stream_doc("audit"))
    write_yaml(
        resources / "alert.yaml",
        alert_doc("secret-read", "audit", SECRET_READS, sink.url, resolve_after="1s"),
    )
    bodies = {
        "one-line": b"[" + hostile_event("fast") + b"]",
        "ndjson": hostile_event("nd-1") + b"\n" + hostile_event("nd-2") + b"\n",
        "pretty": b"[\n  " + hostile_event("pretty") + b"\n]",
        "envelope": orjson.dumps({"message": hostile_event("vector").decode()}),
    }
    async with running_receiver(resources, data) as running, aiohttp.ClientSession() as session:
        for shape, body in bodies.items():
            answer = await post(session, running.url + "/api/v1/logstream/audit", body)
            assert answer.status == 200, (shape, answer.body)
        state = data / engine_module.STATE_FILE
        await wait_until(lambda: state.exists() and b"1e999" in state.read_bytes(), 5, "save")
        await wait_until(
            lambda: alert_status(running.engine, "default/secret-read")["state"] == "Resolved",
            10,
            "the alert resolving",
        )
        assert not running.loop.done()
        metrics = await (await session.get(running.url + "/metrics")).text()
        assert "auditwatch_background_failures_total{" not in metrics
    kept = {event["auditID"]: orjson.dumps(event) for event in stored(data, "audit")}
    assert sorted(kept) == ["fast", "nd-1", "nd-2", "pretty", "vector"]
    for text in kept.values():
        assert HOSTILE_NUMBERS in text
    assert (
        b"1e999" in state.read_bytes() and b"123456789012345678901234567890" in state.read_bytes()
    )
    restarted = Engine(data)  # the saved state reads back with its numbers exact
    assert b"1180591620717411303424" in orjson.dumps(restarted._saved)
    restarted.store.close()


def nested_event(audit_id: str, depth: int) -> bytes:
    """An event whose own object and `requestObject` arrays make `depth` levels of nesting."""
    arrays = depth - 1
    return (
        b'{"auditID":"' + audit_id.encode() + b'","verb":"get","stage":"ResponseComplete",'
        b'"requestObject":' + b"[" * (arrays - 1) + b"]" * (arrays - 1) + b"}"
    )


async def test_nesting_beyond_the_limit_is_a_400_on_every_path_and_the_limit_is_kept(
    tmp_path: Path,
) -> None:
    resources, data = tmp_path / "resources", tmp_path / "data"
    write_yaml(resources / "stream.yaml", stream_doc("audit"))
    valid = b'{"auditID":"valid","verb":"get","stage":"ResponseComplete"}'

    def shapes(event: bytes) -> dict[str, bytes]:
        return {
            "one-line": b"[" + valid + b"," + event + b"]",
            "ndjson": valid + b"\n" + event + b"\n",
            "pretty": b"[\n" + valid + b",\n" + event + b"\n]",
            "envelope": valid + b"\n" + orjson.dumps({"message": event.decode()}),
        }

    async with running_receiver(resources, data) as running, aiohttp.ClientSession() as session:
        url = running.url + "/api/v1/logstream/audit"
        for depth in (256, 1000):
            for shape, body in shapes(nested_event(f"deep-{depth}", depth)).items():
                answer = await post(session, url, body)
                assert answer.status == 400, (depth, shape, answer.status, answer.body)
                assert "deeper than 254 levels" in answer.body["error"], (depth, shape)
        for shape, body in shapes(nested_event("at-limit", 254)).items():
            answer = await post(session, url, body)
            assert answer.status == 200, (shape, answer.body)
    assert sorted(event["auditID"] for event in stored(data, "audit")) == ["at-limit", "valid"]


async def test_a_failing_background_duty_is_counted_retried_and_stops_nothing_else(
    tmp_path: Path, sink: WebhookSink
) -> None:
    resources, data = tmp_path / "resources", tmp_path / "data"
    write_yaml(resources / "stream.yaml", stream_doc("audit"))
    write_yaml(
        resources / "alert.yaml",
        alert_doc("secret-read", "audit", SECRET_READS, sink.url, resolve_after="1s"),
    )
    blocker = (data / engine_module.STATE_FILE).with_suffix(".tmp")
    blocker.mkdir(parents=True)  # the state file's temporary name taken: every save fails
    async with running_receiver(resources, data) as running, aiohttp.ClientSession() as session:
        running.engine.store.flush_interval = timedelta(0)
        events = synthetic_events("read", 3, objectRef={"resource": "secrets"})
        assert (await post(session, running.url + "/api/v1/logstream/audit", events)).status == 200

        async def failures_counted() -> bool:
            text = await (await session.get(running.url + "/metrics")).text()
            return 'auditwatch_background_failures_total{duty="state_save"}' in text

        await eventually(failures_counted, 5, "failed saves in /metrics")
        await wait_until(
            lambda: alert_status(running.engine, "default/secret-read")["state"] == "Resolved",
            10,
            "the alert resolving",
        )
        # Segments wait for a save (their matches must be saved before they leave staging),
        # and stay readable meanwhile.
        assert not any((data / "audit").rglob("*.parquet"))
        assert len(stored(data, "audit")) == 3
        blocker.rmdir()
        await wait_until(lambda: any((data / "audit").rglob("*.parquet")), 5, "a flush")
        state = data / engine_module.STATE_FILE
        await wait_until(
            lambda: b"Resolved" in state.read_bytes() if state.exists() else False, 5, "a save"
        )
        assert not running.loop.done()


async def test_readiness_and_stream_ready_follow_a_disk_that_refuses_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on every write below the data directory: 503 to senders, readiness 503, the
    stream Ready=False; all of it back to normal once the disk takes writes again."""
    resources, data = tmp_path / "resources", tmp_path / "data"
    write_yaml(resources / "stream.yaml", stream_doc("audit"))
    real_write = os.write
    full = False

    def write(fd: int, payload: Any) -> int:
        if full and os.readlink(f"/proc/self/fd/{fd}").startswith(str(data)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, payload)

    monkeypatch.setattr(os, "write", write)
    async with running_receiver(resources, data) as running, aiohttp.ClientSession() as session:
        url = running.url

        async def readiness() -> int:
            async with session.get(url + "/api/v1/readiness") as response:
                return response.status

        async def stream_ready() -> dict[str, Any]:
            status = await (await session.get(url + "/api/v1/status")).json()
            [condition] = status["streams"]["audit"]["conditions"]
            return dict(condition)

        assert await readiness() == 200
        full = True
        answer = await post(session, url + "/api/v1/logstream/audit", synthetic_events("a", 3))
        assert answer.status == 503
        assert await readiness() == 503
        condition = await stream_ready()
        assert (condition["status"], condition["reason"]) == ("False", "StorageFailing")
        assert "No space left on device" in condition["message"]
        await asyncio.sleep(1.5)  # probes meanwhile fail too: still not ready
        assert await readiness() == 503

        full = False

        async def ready_again() -> bool:
            return await readiness() == 200

        await eventually(ready_again, 5, "readiness back to 200")
        assert (await stream_ready())["status"] == "True"
        answer = await post(session, url + "/api/v1/logstream/audit", synthetic_events("b", 3))
        assert answer.status == 200
    assert sorted(event["auditID"] for event in stored(data, "audit")) == ["b-0", "b-1", "b-2"]


async def test_an_alert_whose_stream_goes_away_keeps_its_state_and_counts_until_it_is_back(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    """A stream deleted and re-created (or applied after its alerts, as GitOps tools may do):
    Invalid meanwhile, with its counts, last match and deliveries shown, and back where it was
    -- also across a restart while the stream is missing."""
    data = tmp_path / "data"
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1h", resolve_after="1h")
    engine = Engine(data)
    engine.apply(streams("audit"), alerts(spec))
    await ingest(engine, recon)
    await settle(engine)
    reads = len(secret_reads(recon))
    firing = alert_status(engine, spec.key)
    assert (firing["state"], firing["matches"]) == ("Firing", reads)

    engine.apply({}, alerts(spec))
    invalid = alert_status(engine, spec.key)
    assert (invalid["state"], invalid["matches"]) == ("Invalid", reads)
    assert invalid["lastMatch"] == firing["lastMatch"]
    assert invalid["lastMatchTime"] == firing["lastMatchTime"]
    assert invalid["targets"] == firing["targets"] and invalid["targets"][0]["sent"] == 1
    [ready] = invalid["conditions"]
    assert ready["reason"] == "StreamNotFound" and "state Firing" in ready["message"]
    await engine.close()

    restarted = Engine(data)
    restarted.apply({}, alerts(spec))
    status = alert_status(restarted, spec.key)
    assert (status["state"], status["matches"]) == ("Invalid", reads)
    restarted.apply(streams("audit"), alerts(spec))
    status = alert_status(restarted, spec.key)
    assert (status["state"], status["matches"]) == ("Firing", reads)
    await settle(restarted)
    assert len(sink.bodies("firing")) == 1, "back from Invalid is no new firing"
    await restarted.close()


async def test_a_firing_alert_sends_nothing_while_invalid_and_resolves_once_back(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1h", resolve_after="1s")
    engine = Engine(tmp_path / "data")
    engine.apply(streams("audit"), alerts(spec))
    stop = asyncio.Event()
    loop = asyncio.create_task(engine.run(stop))
    await ingest(engine, recon)
    await sink.wait_for("firing", 1)
    engine.apply({}, alerts(spec))
    await asyncio.sleep(1.5)  # past resolveAfter: a live alert would have resolved by now
    assert sink.bodies("resolved") == []
    assert alert_status(engine, spec.key)["state"] == "Invalid"
    engine.apply(streams("audit"), alerts(spec))
    resolved = await sink.wait_for("resolved", 2)
    assert resolved.body["total"] == len(secret_reads(recon))
    assert alert_status(engine, spec.key)["state"] == "Resolved"
    stop.set()
    await loop
    await engine.close()


async def test_a_deleted_alert_loses_its_kept_state(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    """Only deleting the alert itself drops its state: created again, it starts afresh."""
    spec = alert("secret-read", "audit", SECRET_READS, sink.url, interval="1h", resolve_after="1h")
    engine = Engine(tmp_path / "data")
    engine.apply(streams("audit"), alerts(spec))
    await ingest(engine, recon)
    await settle(engine)
    engine.apply({}, alerts(spec))
    engine.apply({}, {})
    engine.apply(streams("audit"), alerts(spec))
    status = alert_status(engine, spec.key)
    assert (status["state"], status["matches"], status["targets"]) == ("Listening", 0, [])
    await engine.close()


def grouped_alert(endpoint: str, **threshold: Any) -> AlertSpec:
    """Refusals per user: `threshold` over the default of 3 within a minute."""
    document = alert_doc("refusals", "audit", "responseStatus.code = 403", endpoint)
    document["spec"]["threshold"] = {"count": 3, "window": "1m", "groupBy": ["user.username"]}
    document["spec"]["threshold"] |= threshold
    return build_alert(document, no_secrets)


def refusals(user: str, *seconds: int) -> list[dict[str, Any]]:
    """403s by `user` at these seconds of event time."""
    return [
        synthetic_events(f"{user}-{at}", 1, user={"username": user}, responseStatus={"code": 403})[
            0
        ]
        | {"stageTimestamp": f"2026-03-01T10:{at // 60:02}:{at % 60:02}.000000Z"}
        for at in seconds
    ]


async def test_a_grouped_threshold_fires_per_user_and_survives_a_restart(
    tmp_path: Path, sink: WebhookSink
) -> None:
    data = tmp_path / "data"
    spec = grouped_alert(sink.url)
    first = Engine(data)
    first.apply(streams("audit"), alerts(spec))
    # One request with refusals of three users: only eve has three within a minute.
    await ingest(first, refusals("eve", 0, 20, 50) + refusals("bob", 0, 70) + refusals("ann", 5))
    await settle(first)
    [firing] = sink.bodies("firing")
    assert firing["group"] == {"user.username": "eve"}
    assert firing["count"] == firing["total"] == 3 and firing["event"]["user"] == "eve"
    status = alert_status(first, spec.key)
    assert status["state"] == "Firing" and status["matches"] == 6
    assert status["groups"]["firing"] == 1 and status["groups"]["pending"] == 2
    await first.close()

    second = Engine(data)
    second.apply(streams("audit"), alerts(spec))
    assert alert_status(second, spec.key)["groups"] == status["groups"]
    # bob's refusal at 70 s was kept across the restart: two more make three in a minute.
    await ingest(second, refusals("bob", 80, 100))
    await settle(second)
    assert [body["group"] for body in sink.bodies("firing")] == [
        {"user.username": "eve"},
        {"user.username": "bob"},
    ]
    assert alert_status(second, spec.key)["matches"] == 8
    await second.close()


async def test_groups_dropped_at_the_cap_are_counted_in_metrics(
    tmp_path: Path, sink: WebhookSink
) -> None:
    engine = Engine(tmp_path / "data")
    spec = grouped_alert(sink.url, maxGroups=2)
    engine.apply(streams("audit"), alerts(spec))
    await ingest(engine, [event for user in "abcde" for event in refusals(user, 0)])
    assert alert_status(engine, spec.key)["groups"]["evicted"] == 3
    exposition = engine.metrics.exposition().decode()
    assert 'auditwatch_alert_groups_evicted_total{alert="default/refusals"} 3.0' in exposition
    await engine.close()


async def test_repeats_counts_matches_within_resolve_after_not_in_a_row(
    tmp_path: Path, sink: WebhookSink
) -> None:
    """As documented: events that do not match in between do not reset the count (Parseable's
    "in a row" would never fire on an interleaved audit stream)."""
    document = alert_doc("denied", "audit", "", sink.url, resolve_after="1h")
    document["spec"]["rule"] = {
        "type": "column",
        "config": {"column": "responseStatus_code", "value": 403, "repeats": 3},
    }
    spec = build_alert(document, no_secrets)
    engine = Engine(tmp_path / "data")
    engine.apply(streams("audit"), alerts(spec))
    for n in range(2):
        await ingest(engine, synthetic_events(f"denied-{n}", 1, responseStatus={"code": 403}))
        await ingest(engine, synthetic_events(f"allowed-{n}", 5))
    assert alert_status(engine, spec.key)["state"] == "Listening"
    await ingest(engine, synthetic_events("denied-2", 1, responseStatus={"code": 403}))
    await settle(engine)
    assert alert_status(engine, spec.key)["state"] == "Firing"
    assert [body["count"] for body in sink.bodies("firing")] == [3]
    await engine.close()


async def test_excepted_events_are_counted_not_reported_and_only_for_their_own_alert(
    tmp_path: Path, sink: WebhookSink, recon: list[dict[str, Any]]
) -> None:
    """An alert whose exceptions cover every match stays Listening and shows how many it
    excepted (status and /metrics); another alert on the same events is not affected: a
    tenant's exceptions silence its own alerts only."""
    engine = Engine(tmp_path / "data")
    reads = secret_reads(recon)
    readers = sorted({e["user"]["username"] for e in reads})
    tuned_doc = alert_doc("tuned", "audit", SECRET_READS, sink.url)
    tuned_doc["spec"]["exceptions"] = {
        "known-readers": {"fields": ["user.username"], "values": [[name] for name in readers]}
    }
    tuned = build_alert(tuned_doc, no_secrets)
    platform = alert("platform", "audit", SECRET_READS, sink.url, interval="1h")
    engine.apply(streams("audit"), alerts(tuned, platform))

    await ingest(engine, recon)
    await settle(engine)

    status = alert_status(engine, tuned.key)
    assert (status["state"], status["matches"], status["excepted"]) == (
        "Listening",
        0,
        len(reads),
    )
    assert alert_status(engine, platform.key)["matches"] == len(reads)
    assert [body["alert"] for body in sink.bodies("firing")] == [platform.name]
    metrics = engine.metrics.exposition().decode()
    assert f'auditwatch_rule_excepted_total{{alert="{tuned.key}"}} {float(len(reads))}' in metrics


async def test_a_grouped_threshold_counts_only_what_its_exceptions_leave(
    tmp_path: Path, sink: WebhookSink
) -> None:
    """A scanner's refusals are excepted: they never make its group fire, and the count of
    them is in the status across a restart, as an ungrouped alert's is."""
    data = tmp_path / "data"
    document = alert_doc("refusals", "audit", "responseStatus.code = 403", sink.url)
    document["spec"]["threshold"] = {"count": 3, "window": "1m", "groupBy": ["user.username"]}
    document["spec"]["exceptions"] = {"scanner": {"fields": ["user.username"], "values": [["kb"]]}}
    spec = build_alert(document, no_secrets)
    first = Engine(data)
    first.apply(streams("audit"), alerts(spec))
    await ingest(first, refusals("kb", 0, 10, 20, 30) + refusals("eve", 0, 20, 50))
    await settle(first)
    assert [body["group"] for body in sink.bodies("firing")] == [{"user.username": "eve"}]
    status = alert_status(first, spec.key)
    assert (status["matches"], status["excepted"], status["groups"]["pending"]) == (3, 4, 0)
    await first.close()

    second = Engine(data)
    second.apply(streams("audit"), alerts(spec))
    assert alert_status(second, spec.key)["excepted"] == 4
    await second.close()
