"""Delivering notices over HTTP: bodies, headers, retries, TLS, Slack's answers, Alertmanager."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from tests.e2e_support import free_port
from tests.sample_data import SAMPLES

from alertmanager_fixture import alertmanager
from auditwatch.alerts import AlertTracker, Notice
from auditwatch.config.model import AlertSpec, RepeatSpec, TargetSpec, ThresholdSpec
from auditwatch.groups import GroupedTracker
from auditwatch.notify import Notifier, RetryPolicy
from auditwatch.rules.ast import Compare, Field, Op, Rule
from auditwatch.rules.window import GroupedRows

__all__ = ["alertmanager"]  # the fixture is used by name below

EXEC_EVENT = json.loads((SAMPLES / "pod-exec.log").read_text().splitlines()[0])
T0 = datetime(2024, 10, 29, 12, 0, tzinfo=UTC)
FAST = RetryPolicy(attempts=3, initial=0.01, factor=2, max_delay=0.05)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """What a fake receiver got."""

    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def json(self, index: int = -1) -> Any:
        return json.loads(self.requests[index][2])

    def headers(self, index: int = -1) -> dict[str, str]:
        return self.requests[index][1]


@asynccontextmanager
async def serve(
    handler: Handler, context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, Seen]]:
    """A local HTTP(S) server that records every request and answers with `handler`."""
    seen = Seen()

    async def record(request: web.Request) -> web.StreamResponse:
        seen.requests.append((request.path, dict(request.headers), await request.read()))
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=context, access_log=None)  # the target's log is not ours
    try:
        yield str(server.make_url("")).rstrip("/"), seen
    finally:
        await server.close()


def answers(*statuses: int, body: str = "", headers: dict[str, str] | None = None) -> Handler:
    """A handler answering the given statuses in turn, then 200."""
    remaining = list(statuses)

    async def handle(request: web.Request) -> web.StreamResponse:
        status = remaining.pop(0) if remaining else 200
        return web.Response(status=status, text=body if status >= 300 else "ok", headers=headers)

    return handle


def make_target(endpoint: str, kind: str = "webhook", **options: Any) -> TargetSpec:
    options.setdefault("timeout", timedelta(seconds=2))
    return TargetSpec(
        type=kind,  # type: ignore[arg-type]
        endpoint=endpoint,
        name=options.pop("name", kind),
        repeat=RepeatSpec(interval=timedelta(seconds=10), times=3),
        **options,
    )


def make_spec(*targets: TargetSpec, **options: Any) -> AlertSpec:
    return AlertSpec(
        namespace="sec",
        name="pod-exec",
        stream="audit",
        rule=Rule(Compare(Field(("objectRef", "subresource")), Op.EQ, "exec")),
        rule_type="composite",
        rule_text='objectRef.subresource = "exec"',
        message="{user.username} exec'd into {objectRef.namespace}/{objectRef.name}",
        targets=targets,
        resolve_after=timedelta(seconds=60),
        **options,
    )


def fire(spec: AlertSpec) -> tuple[AlertTracker, list[Notice]]:
    tracker = AlertTracker(spec)
    return tracker, tracker.observe(1, EXEC_EVENT, T0)


def clock() -> datetime:
    return T0 + timedelta(seconds=5)


async def test_webhook_body_and_headers() -> None:
    async with serve(answers()) as (url, seen):
        target = make_target(f"{url}/hook", headers={"X-Team": "sec", "Authorization": "Bearer t"})
        spec = make_spec(target, severity="high")
        _, notices = fire(spec)
        async with Notifier(retry=FAST, clock=clock) as notifier:
            assert await notifier.deliver(spec, notices[0])
            status = notifier.status(spec.key)["webhook"]
    path, headers, _ = seen.requests[0]
    assert path == "/hook"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Team"] == "sec" and headers["Authorization"] == "Bearer t"
    body = seen.json()
    ref = EXEC_EVENT["objectRef"]
    assert body == {
        "alert": "pod-exec",
        "namespace": "sec",
        "stream": "audit",
        "severity": "high",
        "state": "firing",
        "kind": "firing",
        "message": f"{EXEC_EVENT['user']['username']} exec'd into {ref['namespace']}/{ref['name']}",
        "count": 1,
        "total": 1,
        "sequence": 1,
        "event": {
            "auditID": EXEC_EVENT["auditID"],
            "user": EXEC_EVENT["user"]["username"],
            "verb": EXEC_EVENT["verb"],
            "resource": ref["resource"],
            "subresource": "exec",
            "namespace": ref["namespace"],
            "name": ref["name"],
            "code": EXEC_EVENT["responseStatus"]["code"],
            "stageTimestamp": EXEC_EVENT["stageTimestamp"],
            "sourceIPs": EXEC_EVENT["sourceIPs"],
        },
        "firedAt": "2024-10-29T12:00:00Z",
        "resolvedAt": None,
        "sentAt": "2024-10-29T12:00:05Z",
    }
    assert status["sent"] == 1 and status["failed"] == 0
    assert status["lastSuccess"] == clock().isoformat() and status["lastError"] is None


async def test_resolved_webhook_says_so() -> None:
    async with serve(answers()) as (url, seen):
        spec = make_spec(make_target(url))
        tracker, _ = fire(spec)
        resolved = tracker.tick(T0 + timedelta(minutes=5))
        async with Notifier(retry=FAST) as notifier:
            await notifier.deliver_all(spec, resolved)
    body = seen.json()
    assert (body["state"], body["kind"]) == ("resolved", "resolved")
    assert body["resolvedAt"] == "2024-10-29T12:01:00Z"


async def test_retries_server_errors_then_succeeds() -> None:
    async with serve(answers(500, 503, body="overloaded")) as (url, seen):
        spec = make_spec(make_target(url))
        _, notices = fire(spec)
        async with Notifier(retry=FAST) as notifier:
            assert await notifier.deliver(spec, notices[0])
            record = notifier.record(spec.key, "webhook")
    assert len(seen.requests) == 3
    assert {**seen.json(0), "sentAt": None} == {**seen.json(2), "sentAt": None}
    assert (record.sent, record.failed, record.retries) == (1, 0, 2)
    assert record.last_error is not None and "HTTP 503" in record.last_error


async def test_gives_up_after_the_attempts() -> None:
    async with serve(answers(500, 500, 500, 500, body="boom")) as (url, seen):
        spec = make_spec(make_target(url))
        _, notices = fire(spec)
        async with Notifier(retry=FAST) as notifier:
            assert not await notifier.deliver(spec, notices[0])
            status = notifier.status(spec.key)["webhook"]
    assert len(seen.requests) == FAST.attempts
    assert status["sent"] == 0 and status["failed"] == 1
    assert status["lastError"] == "HTTP 500 Internal Server Error from target"  # not "boom"


async def test_client_error_is_not_retried_and_is_recorded() -> None:
    async with serve(answers(400, body='{"error":"bad field"}')) as (url, seen):
        spec = make_spec(make_target(url))
        _, notices = fire(spec)
        async with Notifier(retry=FAST) as notifier:
            assert not await notifier.deliver(spec, notices[0])
            record = notifier.record(spec.key, "webhook")
    assert len(seen.requests) == 1
    assert record.failed == 1 and record.retries == 0
    assert record.last_error == "HTTP 400 Bad Request from target"  # not the target's body
    assert record.last_error_time is not None


async def test_429_honours_retry_after() -> None:
    slow_backoff = RetryPolicy(attempts=2, initial=30, max_delay=60)
    async with serve(answers(429, headers={"Retry-After": "0"})) as (url, seen):
        spec = make_spec(make_target(url))
        _, notices = fire(spec)
        async with Notifier(retry=slow_backoff) as notifier:
            started = time.monotonic()
            assert await notifier.deliver(spec, notices[0])
    assert time.monotonic() - started < 5  # waited Retry-After (0 s), not the 30 s backoff
    assert len(seen.requests) == 2


async def test_timeout_is_retried_then_recorded() -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="too late")

    async with serve(stall) as (url, seen):
        spec = make_spec(make_target(url, timeout=timedelta(seconds=0.2)))
        _, notices = fire(spec)
        async with Notifier(retry=replace(FAST, attempts=2)) as notifier:
            assert not await notifier.deliver(spec, notices[0])
            record = notifier.record(spec.key, "webhook")
    assert len(seen.requests) == 2
    assert record.last_error == "no answer within 0.2 s"


async def test_unreachable_target_is_retried_then_recorded() -> None:
    async with serve(answers()) as (url, _):
        pass  # the port is free again: nothing listens there now
    spec = make_spec(make_target(url))
    _, notices = fire(spec)
    async with Notifier(retry=FAST) as notifier:
        assert not await notifier.deliver(spec, notices[0])
        record = notifier.record(spec.key, "webhook")
    assert (record.failed, record.retries) == (1, FAST.attempts - 1)
    assert record.last_error == "connection refused"


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    yield context


async def test_self_signed_tls_fails_unless_skip_tls_check(tls_context: ssl.SSLContext) -> None:
    async with serve(answers(), tls_context) as (url, seen):
        assert url.startswith("https://")
        checked = make_spec(make_target(url, name="checked"))
        skipped = make_spec(make_target(url, name="skipped", skip_tls_check=True))
        async with Notifier(retry=replace(FAST, attempts=1)) as notifier:
            assert not await notifier.deliver(checked, fire(checked)[1][0])
            assert await notifier.deliver(skipped, fire(skipped)[1][0])
            error = notifier.record(checked.key, "checked").last_error
    assert error == "TLS certificate of the target not trusted"
    assert len(seen.requests) == 1


async def fake_slack(request: web.Request) -> web.StreamResponse:
    """Answers the way Slack's incoming webhooks do."""
    if request.path == "/services/T0/B0/archived":
        return web.Response(status=410, text="channel_is_archived")
    if request.path != "/services/T0/B0/secret":
        return web.Response(status=404, text="no_service")
    if request.content_type != "application/json":
        return web.Response(status=400, text="invalid_payload")
    try:
        payload = await request.json()
    except ValueError:
        return web.Response(status=400, text="invalid_payload")
    if not isinstance(payload, dict) or not str(payload.get("text") or "").strip():
        return web.Response(status=400, text="no_text")
    return web.Response(text="ok")


async def test_slack_message_is_accepted_by_slack_rules() -> None:
    async with serve(fake_slack) as (url, seen):
        spec = make_spec(make_target(f"{url}/services/T0/B0/secret", "slack"))
        tracker, notices = fire(spec)
        async with Notifier(retry=FAST) as notifier:
            assert await notifier.deliver(spec, notices[0])
            await notifier.deliver_all(spec, tracker.tick(T0 + timedelta(minutes=2)))
            assert notifier.status(spec.key)["slack"]["sent"] == 2
    firing, resolved = (seen.json(0)["text"], seen.json(1)["text"])
    assert "[FIRING]" in firing and "sec/pod-exec" in firing
    assert notices[0].message in firing and EXEC_EVENT["auditID"] in firing
    assert "[RESOLVED]" in resolved


async def test_slack_error_answer_is_recorded_without_retry() -> None:
    async with serve(fake_slack) as (url, seen):
        spec = make_spec(make_target(f"{url}/services/T0/B0/archived", "slack"))
        _, notices = fire(spec)
        async with Notifier(retry=FAST) as notifier:
            assert not await notifier.deliver(spec, notices[0])
            error = notifier.record(spec.key, "slack").last_error
    assert len(seen.requests) == 1
    assert error == "HTTP 410 Gone from target"  # Slack's "channel_is_archived" is its body


async def test_alertmanager_labels_stay_identical_and_resolve_ends_the_alert() -> None:
    async with serve(answers()) as (url, seen):
        target = make_target(f"{url}/", "alertmanager", username="am", password="pw")
        spec = make_spec(target, severity="critical", labels={"team": "sec", "alertname": "x"})
        tracker = AlertTracker(spec, refresh_interval=timedelta(seconds=30))
        async with Notifier(retry=FAST, clock=clock, generator_url="http://aw/status") as notifier:
            await notifier.deliver_all(spec, tracker.observe(1, EXEC_EVENT, T0))
            await notifier.deliver_all(spec, tracker.tick(T0 + timedelta(seconds=30)))
            await notifier.deliver_all(spec, tracker.tick(T0 + timedelta(seconds=90)))
    assert [path for path, _, _ in seen.requests] == ["/api/v2/alerts"] * 3
    assert seen.headers(0)["Authorization"] == "Basic " + base64.b64encode(b"am:pw").decode()
    firing, refresh, resolve = (seen.json(i)[0] for i in range(3))
    expected_labels = {
        "alertname": "pod-exec",
        "namespace": "sec",
        "stream": "audit",
        "severity": "critical",
        "source": "auditwatch",
        "team": "sec",
    }
    assert firing["labels"] == refresh["labels"] == resolve["labels"] == expected_labels
    assert firing["startsAt"] == resolve["startsAt"] == "2024-10-29T12:00:00Z"
    assert firing["endsAt"] > clock().isoformat()  # in the future: still active
    assert resolve["endsAt"] == "2024-10-29T12:01:00Z"  # the resolve time: in the past
    assert firing["annotations"]["summary"].endswith(EXEC_EVENT["objectRef"]["name"])
    assert firing["generatorURL"] == "http://aw/status"


async def alertmanager_alerts(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with session.get(
        f"{url}/api/v2/alerts", params={"filter": 'source="auditwatch"'}
    ) as response:
        assert response.status == 200
        alerts: list[dict[str, Any]] = await response.json()
        return alerts


async def test_real_alertmanager_shows_then_clears_the_alert(alertmanager: str) -> None:
    spec = make_spec(make_target(alertmanager, "alertmanager"), labels={"team": "sec"})
    tracker = AlertTracker(spec)
    started = datetime.now(UTC) - timedelta(minutes=2)
    async with Notifier(retry=FAST) as notifier, aiohttp.ClientSession() as session:
        await notifier.deliver_all(spec, tracker.observe(1, EXEC_EVENT, started))
        assert notifier.record(spec.key, "alertmanager").sent == 1
        active = await alertmanager_alerts(session, alertmanager)
        assert len(active) == 1
        assert active[0]["status"]["state"] == "active"
        assert active[0]["labels"] == {
            "alertname": "pod-exec",
            "namespace": "sec",
            "stream": "audit",
            "source": "auditwatch",
            "team": "sec",
        }
        assert active[0]["annotations"]["auditID"] == EXEC_EVENT["auditID"]

        # The quiet period is over by now: the resolve ends the alert a minute ago.
        resolved = tracker.tick(datetime.now(UTC))
        assert [notice.kind for notice in resolved] == ["resolved"]
        await notifier.deliver_all(spec, resolved)
        assert notifier.record(spec.key, "alertmanager").failed == 0
        assert await alertmanager_alerts(session, alertmanager) == []


def grouped_firing(
    spec: AlertSpec, users: list[str], at: datetime
) -> tuple[GroupedTracker, list[Notice]]:
    """`spec` with a threshold of one exec per user, fired by one exec of each of `users`."""
    grouped = replace(
        spec,
        threshold=ThresholdSpec(1, timedelta(minutes=1), ("user.username",), ("user_username",)),
    )
    events = [EXEC_EVENT | {"user": {"username": user}} for user in users]
    rows = GroupedRows(
        keys=[(user,) for user in users],
        counts=[1] * len(users),
        last_rows=list(range(len(users))),
        times=[[0]] * len(users),
    )
    tracker = GroupedTracker(grouped)
    return tracker, tracker.observe_groups(rows, events.__getitem__, at)


async def test_every_target_names_the_group_of_a_grouped_threshold() -> None:
    async with serve(answers()) as (url, seen):
        spec = make_spec(make_target(f"{url}/hook"), make_target(f"{url}/chat", "slack"))
        tracker, notices = grouped_firing(spec, ["alice"], T0)
        async with Notifier(retry=FAST) as notifier:
            await notifier.deliver_all(tracker.spec, notices)
    hook = next(json.loads(body) for path, _, body in seen.requests if path == "/hook")
    chat = next(json.loads(body) for path, _, body in seen.requests if path == "/chat")
    assert hook["group"] == {"user.username": "alice"}
    assert hook["event"]["user"] == "alice"
    assert chat["text"].startswith("[FIRING] sec/pod-exec [user.username=alice] (stream audit)")


async def test_real_alertmanager_holds_one_alert_per_group(alertmanager: str) -> None:
    spec = make_spec(make_target(alertmanager, "alertmanager"))
    started = datetime.now(UTC) - timedelta(seconds=90)
    tracker, notices = grouped_firing(spec, ["alice", "bob"], started)
    async with Notifier(retry=FAST) as notifier, aiohttp.ClientSession() as session:
        await notifier.deliver_all(tracker.spec, notices)
        active = await alertmanager_alerts(session, alertmanager)
        assert sorted(alert["labels"]["user_username"] for alert in active) == ["alice", "bob"]
        assert all(alert["labels"]["alertname"] == "pod-exec" for alert in active)
        # alice is at it again 50 s later, bob is quiet: his group resolves on its own.
        alice = GroupedRows(keys=[("alice",)], counts=[1], last_rows=[0], times=[[1]])
        alice_again = EXEC_EVENT | {"user": {"username": "alice"}}
        await notifier.deliver_all(
            tracker.spec,
            tracker.observe_groups(alice, lambda row: alice_again, started + timedelta(seconds=50)),
        )
        resolved = tracker.tick(datetime.now(UTC))
        assert [(n.kind, dict(n.group)) for n in resolved] == [
            ("resolved", {"user.username": "bob"})
        ]
        await notifier.deliver_all(tracker.spec, resolved)
        active = await alertmanager_alerts(session, alertmanager)
        assert [alert["labels"]["user_username"] for alert in active] == ["alice"]


class StubResolver(AbstractResolver):
    """Name resolution from a table, so no test asks a real DNS server; unknown names fail."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.names[host]
        ]

    async def close(self) -> None:
        pass


TOKEN = "xoxT0KEN4f9c2e"
PASSWORD = "pa55w0rd7d2e"


async def echo_path(request: web.Request) -> web.StreamResponse:
    """A target that puts the URL it was called with into its error answer, as many do."""
    return web.Response(status=404, text=f"no_service: {request.url}")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("refused", "connection refused"),
        ("timeout", "no answer within 0.2 s"),
        ("unresolved", "host name not resolved"),
        ("answer", "HTTP 404 Not Found from target"),
    ],
)
async def test_failing_delivery_never_shows_the_url(
    failure: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Slack-style URL (token in its path) with `user:password@`: in neither status nor log."""
    caplog.set_level(logging.DEBUG)

    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response()

    async with serve(stall if failure == "timeout" else echo_path) as (url, seen):
        address = url.removeprefix("http://")
        if failure == "refused":
            address = f"127.0.0.1:{free_port()}"
        elif failure == "unresolved":
            address = f"{TOKEN.lower()}.hooks.test"
        endpoint = f"http://hook:{PASSWORD}@{address}/services/T0/B0/{TOKEN}"
        spec = make_spec(make_target(endpoint, "slack", timeout=timedelta(seconds=0.2)))
        async with Notifier(retry=replace(FAST, attempts=2), resolver=StubResolver({})) as notifier:
            assert not await notifier.deliver(spec, fire(spec)[1][0])
            status = notifier.status(spec.key)
    assert bool(seen.requests) == (failure in ("timeout", "answer"))
    assert status["slack"]["lastError"] == reason
    shown = json.dumps(status) + caplog.text
    assert "'slack' failed" in caplog.text  # the failure is logged, under the target's name
    assert TOKEN not in shown and TOKEN.lower() not in shown and PASSWORD not in shown
