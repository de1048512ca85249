"""`auditwatch run` end to end: the real kopf operator, the real receiver, a webhook sink.

The operator runs in-process against the fake apiserver (tests/kubefake, with the real CRDs
loaded) and logs in through kopf's default login, from KUBECONFIG, as it would on a laptop. The
same lifecycle runs against a real cluster when AUDITWATCH_REAL_CLUSTER=1 and KUBECONFIG are set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes.config.kube_config
import pytest
import yaml
from aiohttp import web
from tests.kubefake import KubeFake, fast_settings

from auditwatch.kube.api import GROUP, PLURALS, VERSION, ApiError, KubeApi, load_configuration
from auditwatch.kube.leader import RECEIVER_ANNOTATION
from auditwatch.kube.operator import OperatorOptions, Running, run_operator
from auditwatch.receive import FORWARDED_HEADER
from auditwatch.rules.parse import parse_expression
from auditwatch.rules.reference import matches
from auditwatch.store import query

REPO = Path(__file__).resolve().parent.parent
FIRST_RULE = 'objectRef.resource = "secrets" or objectRef.resource = "events"'
SECOND_RULE = 'verb = "create" and objectRef.subresource = "exec"'
BROKEN_RULE = 'verb = "create" and'
WAIT = 15.0


# -- the cluster, through its HTTP API (the fake or a real one) ---------------------------------


@dataclass
class Cluster:
    api: KubeApi
    namespace: str
    """Where the AuditAlerts and their Secrets live."""
    operator_namespace: str
    """Where the stream's Secret, the Lease and the streams' Events live."""

    def path(self, kind: str, name: str | None = None, namespace: str | None = None) -> str:
        if kind == "Secret":
            base = f"/api/v1/namespaces/{namespace}/secrets"
        elif kind == "AuditStream":
            base = f"/apis/{GROUP}/{VERSION}/{PLURALS[kind]}"
        else:
            base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURALS[kind]}"
        return f"{base}/{name}" if name else base

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        namespace = body["metadata"].get("namespace")
        created: dict[str, Any] = await self.api.request(
            "POST", self.path(body["kind"], namespace=namespace), body
        )
        return created

    async def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = await self.api.request("GET", self.path(kind, name, namespace))
        return obj

    async def patch(
        self, kind: str, name: str, patch: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        path = self.path(kind, name, namespace)
        patched: dict[str, Any] = await self.api.request(
            "PATCH", path, patch, "application/merge-patch+json"
        )
        return patched

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        with contextlib.suppress(ApiError):
            await self.api.request("DELETE", self.path(kind, name, namespace))

    async def events(self, name: str, namespace: str) -> list[dict[str, Any]]:
        listed = await self.api.request("GET", f"/api/v1/namespaces/{namespace}/events")
        return [e for e in listed["items"] if e["involvedObject"].get("name") == name]

    async def wait_for(
        self,
        kind: str,
        name: str,
        condition: Callable[[dict[str, Any]], bool],
        namespace: str | None = None,
    ) -> dict[str, Any]:
        """The object once `condition` holds for it (polled; fails after WAIT seconds)."""
        obj: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                while True:
                    obj = await self.get(kind, name, namespace)
                    if condition(obj):
                        return obj
                    await asyncio.sleep(0.1)
        raise AssertionError(f"{kind} {name} never satisfied the condition; last: {obj}")

    async def wait_for_event(self, name: str, namespace: str, reason: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                found = [e for e in await self.events(name, namespace) if e["reason"] == reason]
                if found:
                    return found[-1]
                await asyncio.sleep(0.1)


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    for condition in obj.get("status", {}).get("conditions", []):
        if condition["type"] == "Ready":
            return dict(condition)
    return {}


def current(obj: dict[str, Any]) -> bool:
    """kstatus: the status describes the latest spec."""
    return bool(obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"])


def secret(name: str, namespace: str, **values: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": values,
    }


def alert_body(name: str, namespace: str, stream: str, rule: str, hook: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AuditAlert",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "stream": stream,
            "message": "{verb} {objectRef_resource} by {user_username}",
            "rule": {"type": "composite", "config": rule},
            "resolveAfter": "1h",
            "targets": [
                {
                    "type": "webhook",
                    "name": "sink",
                    "endpoint": hook,
                    "headersFrom": [
                        {
                            "name": "Authorization",
                            "secretRef": {"name": f"{name}-hook", "key": "token"},
                        }
                    ],
                    "repeat": {"interval": "1s", "times": 1000},
                }
            ],
        },
    }


CLUSTER_WIDE_FOR_ALL = {"clusterWide": {"from": "All"}}
"""A grant for streams whose alerts watch other namespaces' events (the samples' own)."""


def stream_body(
    name: str, operator_namespace: str, allowed: dict[str, Any] | None = None
) -> dict[str, Any]:
    secret_ref = {"name": f"{name}-ingest", "namespace": operator_namespace}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AuditStream",
        "metadata": {"name": name},
        "spec": {
            "auth": {"basic": {"secretRef": secret_ref}},
            "allowedAlerts": CLUSTER_WIDE_FOR_ALL if allowed is None else allowed,
        },
    }


# -- the world around the operator ---------------------------------------------------------------


@dataclass
class Sink:
    """A webhook receiver that records what was delivered."""

    url: str
    received: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    def authorizations(self) -> list[str | None]:
        return [headers.get("Authorization") for headers, _ in self.received]


@contextlib.asynccontextmanager
async def webhook_sink() -> AsyncIterator[Sink]:
    sink = Sink("")

    async def hook(request: web.Request) -> web.Response:
        sink.received.append((dict(request.headers), await request.json()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield sink
    finally:
        await runner.cleanup()


def sample_events(samples: Path, round_: int) -> list[dict[str, Any]]:
    """secret-recon-then-exec.log, with auditIDs made new for each round (stored once each)."""
    events = [json.loads(line) for line in (samples / "secret-recon-then-exec.log").open()]
    for event in events:
        event["auditID"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{event['auditID']}/{round_}"))
    return events


def count(rule: str, events: list[dict[str, Any]]) -> int:
    expression = parse_expression(rule)
    return sum(matches(expression, event) for event in events)


def canonical(events: Any) -> list[str]:
    """Events as sorted canonical JSON: compares two collections as multisets."""
    return sorted(json.dumps(event, sort_keys=True) for event in events)


@contextlib.asynccontextmanager
async def operator(
    data: Path, options: OperatorOptions, namespaces: list[str] | None = None
) -> AsyncIterator[tuple[Running, str, asyncio.Task[None]]]:
    """run_operator in a task; yields its parts and the receiver's URL once kopf runs."""
    stop = asyncio.Event()
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_operator(
            data,
            host="127.0.0.1",
            port=0,
            namespaces=namespaces or [],
            options=options,
            stop=stop,
            started=started,
        )
    )
    try:
        waits: set[asyncio.Future[Any]] = {task, started}
        await asyncio.wait(waits, timeout=WAIT, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()
        running = started.result()
        port = running.runner.addresses[0][1]
        yield running, f"http://127.0.0.1:{port}", task
    finally:
        stop.set()
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def post(
    http: aiohttp.ClientSession,
    url: str,
    stream: str,
    events: list[dict[str, Any]],
    auth: tuple[str, str] | None,
) -> tuple[int, Any]:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    path = f"{url}/api/v1/logstream/{stream}"
    async with http.post(path, json=events, headers=headers) as response:
        return response.status, await response.json()


async def until(check: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.1)


# -- the lifecycle ---------------------------------------------------------------------------------


async def lifecycle(
    cluster: Cluster, samples: Path, data: Path, options: OperatorOptions, fake: KubeFake | None
) -> None:
    ns, opns = cluster.namespace, cluster.operator_namespace
    suffix = uuid.uuid4().hex[:6]
    stream, name, late = f"auditdemo-{suffix}", f"recon-{suffix}", f"late-{suffix}"
    first = sample_events(samples, 1)
    second = sample_events(samples, 2)
    async with webhook_sink() as sink, aiohttp.ClientSession() as http:
        await cluster.create(secret(f"{stream}-ingest", opns, username="apiserver", password="one"))
        await cluster.create(secret(f"{name}-hook", ns, token="Bearer one"))
        await cluster.create(stream_body(stream, opns))
        await cluster.create(alert_body(name, ns, stream, FIRST_RULE, sink.url))
        try:
            async with operator(data, options) as (running, url, _task):
                assert running.handlers is not None
                auth = ("apiserver", "one")

                # Created resources are listening; the stream says where to post.
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: ready(o).get("status") == "True", ns
                )
                assert obj["status"]["state"] == "Listening" and current(obj)
                streamed = await cluster.wait_for(
                    "AuditStream", stream, lambda o: ready(o).get("status") == "True"
                )
                assert streamed["status"]["ingestPath"] == f"/api/v1/logstream/{stream}"
                async with http.get(f"{url}/api/v1/readiness") as response:
                    assert response.status == 200

                # Events in -> Firing with the right count, a webhook with the Secret's header.
                assert (await post(http, url, stream, first, None))[0] == 401
                status, answer = await post(http, url, stream, first, auth)
                assert (status, answer["stored"]) == (200, len(first))
                expected = count(FIRST_RULE, first)
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: o.get("status", {}).get("matches") == expected, ns
                )
                assert obj["status"]["state"] == "Firing" and current(obj)
                assert ready(obj)["status"] == "True"
                assert obj["status"]["lastMatch"]["user"] == "mayor-malware"
                firing = await cluster.wait_for_event(name, ns, "Firing")
                assert firing["type"] == "Normal" and str(expected) in firing["message"]
                await until(lambda: bool(sink.received), "a webhook delivery")
                assert sink.authorizations()[0] == "Bearer one"
                await cluster.wait_for(
                    "AuditStream",
                    stream,
                    lambda o: o.get("status", {}).get("eventsReceived") == len(first),
                )

                # The rule edited: the new rule counts from now on, nothing restarted.
                edited = await cluster.patch(
                    "AuditAlert", name, {"spec": {"rule": {"config": SECOND_RULE}}}, ns
                )
                assert edited["metadata"]["generation"] == 2
                await cluster.wait_for("AuditAlert", name, current, ns)
                assert (await post(http, url, stream, second, auth))[0] == 200
                expected = count(SECOND_RULE, second)  # a new rule starts from scratch
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: o.get("status", {}).get("matches") == expected, ns
                )
                assert obj["status"]["observedGeneration"] == 2

                # Secrets rotated: the new header on the next notice, the new ingest password.
                await cluster.patch(
                    "Secret", f"{name}-hook", {"stringData": {"token": "Bearer two"}}, ns
                )
                rounds = iter(range(10, 100))

                async def rotated_header() -> bool:
                    # A repeat goes out when more matching events came in since the last notice.
                    fresh = sample_events(samples, next(rounds))
                    assert (await post(http, url, stream, fresh, auth))[0] == 200
                    await asyncio.sleep(0.3)
                    return "Bearer two" in sink.authorizations()

                await until(rotated_header, "the rotated header")
                await cluster.patch(
                    "Secret", f"{stream}-ingest", {"stringData": {"password": "two"}}, opns
                )
                new_auth = ("apiserver", "two")

                async def rotated() -> bool:
                    return (await post(http, url, stream, second, new_auth))[0] == 200

                await until(rotated, "the rotated ingest password")
                assert (await post(http, url, stream, second, auth))[0] == 403

                # An invalid rule: Invalid, Ready=False, a Warning with the position; then fixed.
                await cluster.patch(
                    "AuditAlert", name, {"spec": {"rule": {"config": BROKEN_RULE}}}, ns
                )
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: o.get("status", {}).get("state") == "Invalid", ns
                )
                condition = ready(obj)
                assert (condition["status"], condition["reason"]) == ("False", "InvalidRule")
                assert re.search(r"column \d+", condition["message"]), condition
                assert current(obj)
                warning = await cluster.wait_for_event(name, ns, "InvalidRule")
                assert warning["type"] == "Warning"
                assert warning["message"] == condition["message"]
                await cluster.patch(
                    "AuditAlert", name, {"spec": {"rule": {"config": SECOND_RULE}}}, ns
                )
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: ready(o).get("status") == "True", ns
                )
                assert obj["status"]["state"] in ("Firing", "Listening") and current(obj)
                assert (await cluster.wait_for_event(name, ns, "Valid"))["type"] == "Normal"

                # Missing Secret and missing stream: Invalid until they appear, no restart.
                await cluster.create(alert_body(late, ns, f"{stream}-later", FIRST_RULE, sink.url))
                obj = await cluster.wait_for(
                    "AuditAlert", late, lambda o: ready(o).get("reason") == "SecretNotFound", ns
                )
                assert obj["status"]["state"] == "Invalid"
                await cluster.create(secret(f"{late}-hook", ns, token="Bearer late"))
                await cluster.wait_for(
                    "AuditAlert", late, lambda o: ready(o).get("reason") == "StreamNotFound", ns
                )
                await cluster.create(
                    secret(f"{stream}-later-ingest", opns, username="a", password="b")
                )
                await cluster.create(stream_body(f"{stream}-later", opns))
                obj = await cluster.wait_for(
                    "AuditAlert", late, lambda o: ready(o).get("status") == "True", ns
                )
                assert obj["status"]["state"] == "Listening"

                # Deleted: the alert stops matching at once.
                await cluster.delete("AuditAlert", name, ns)

                async def forgotten() -> bool:
                    async with http.get(f"{url}/api/v1/status") as response:
                        return f"{ns}/{name}" not in (await response.json())["alerts"]

                await until(forgotten, "the deleted alert gone from the engine")
                delivered = len(sink.received)
                assert (await post(http, url, stream, sample_events(samples, 3), new_auth))[
                    0
                ] == 200
                await asyncio.sleep(1.5)  # a repeat or a new firing would arrive by now
                assert len(sink.received) == delivered

                # Each create handler ran exactly once per object.
                calls = running.handlers.calls
                assert calls[("create", "AuditAlert", f"{ns}/{name}")] == 1
                assert calls[("create", "AuditAlert", f"{ns}/{late}")] == 1
                assert calls[("create", "AuditStream", f"{stream}-later")] == 1
                assert calls[("delete", "AuditAlert", f"{ns}/{name}")] == 1
        finally:
            await cluster.delete("AuditAlert", name, ns)
            await cluster.delete("AuditAlert", late, ns)
            await cluster.delete("AuditStream", stream)
            await cluster.delete("AuditStream", f"{stream}-later")
            for secret_name, namespace in (
                (f"{stream}-ingest", opns),
                (f"{stream}-later-ingest", opns),
                (f"{name}-hook", ns),
                (f"{late}-hook", ns),
            ):
                await cluster.delete("Secret", secret_name, namespace)

    if fake is not None:
        check_request_log(fake, ns, name)


def check_request_log(fake: KubeFake, namespace: str, name: str) -> None:
    """Status only through /status, rate-limited; Events posted for the alert; Secrets read
    by name only (never a list or watch of a Secret collection)."""
    secret_reads = fake.requests_matching("GET", re.compile(r"/secrets"))
    assert secret_reads
    assert all(
        re.fullmatch(r"/api/v1/namespaces/[^/]+/secrets/[^/]+", r.path) for r in secret_reads
    )
    alert_path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/auditalerts/{name}"
    status_patches = fake.requests_matching("PATCH", f"{alert_path}/status")
    assert status_patches and all(set(r.json) == {"status"} for r in status_patches)
    for request in fake.requests_matching("PATCH", alert_path):
        assert "status" not in (request.json or {}), "status written through the main endpoint"
    # Two firings, repeats every second, yet only a patch per visible change.
    assert len(status_patches) < 25, [r.json for r in status_patches]
    posted = [
        r.json
        for r in fake.requests_matching("POST", f"/api/v1/namespaces/{namespace}/events")
        if r.json["involvedObject"]["name"] == name
    ]
    reasons = [event["reason"] for event in posted]
    assert reasons.count("Firing") == 2 and reasons.count("InvalidRule") == 1, reasons
    assert all(e["metadata"]["generateName"] and e["involvedObject"]["uid"] for e in posted)


@pytest.fixture
async def fake_cluster(
    kube_fake: KubeFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    """The fake apiserver with the real CRDs, reachable through KUBECONFIG."""
    for path in sorted((REPO / "crds").glob("audit*.yaml")):
        kube_fake.store.add_crd(yaml.safe_load(path.read_text()))
    kubeconfig = kube_fake.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # kopf's default login reads the kubernetes package's default, fixed at its import.
    monkeypatch.setattr(
        kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with KubeApi(load_configuration()) as api:
        yield Cluster(api, namespace="team", operator_namespace="auditwatch")


def fast_options(**overrides: Any) -> OperatorOptions:
    settings = fast_settings()
    settings.process.ultimate_exiting_timeout = None  # kopf must never SIGKILL the test run
    options = OperatorOptions(
        namespace="auditwatch",
        status_interval=0.3,
        secret_refresh=0.3,
        lease_duration=3.0,
        lease_renew_deadline=2.0,
        lease_retry_period=0.2,
        kopf_settings=settings,
    )
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


async def test_operator_lifecycle_against_the_fake_api(
    fake_cluster: Cluster, kube_fake: KubeFake, samples: Path, tmp_path: Path
) -> None:
    await lifecycle(fake_cluster, samples, tmp_path / "data", fast_options(), kube_fake)


def lease(holder: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "auditwatch", "namespace": "auditwatch"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3, "leaseTransitions": 0},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_one_replica_leads_the_other_forwards_ingest_to_it_then_takes_over(
    fake_cluster: Cluster, kube_fake: KubeFake, samples: Path, tmp_path: Path
) -> None:
    await fake_cluster.create(stream_body("auditdemo", "auditwatch"))
    await fake_cluster.create(secret("auditdemo-ingest", "auditwatch", username="u", password="p"))
    await fake_cluster.create(secret("recon-hook", "team", token="Bearer one"))
    auth = ("u", "p")
    follower_url = f"http://127.0.0.1:{free_port()}"
    follower_stop = asyncio.Event()

    def leased() -> tuple[str | None, str | None]:
        """The Lease's holder and the receiver it advertises."""
        lease = kube_fake.store.get("leases", "auditwatch", "auditwatch")
        annotations = lease["metadata"].get("annotations") or {}
        return lease["spec"].get("holderIdentity"), annotations.get(RECEIVER_ANNOTATION)

    # No kept-alive connections: the leader's kopf, stopping, cancels the server side of any
    # connection opened while it ran, the follower's included (one process plays two pods here).
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        webhook_sink() as sink,
    ):
        await fake_cluster.create(alert_body("recon", "team", "auditdemo", FIRST_RULE, sink.url))

        async def readiness(url: str) -> tuple[int, str]:
            async with http.get(f"{url}/api/v1/readiness") as response:
                return response.status, (await response.json())["reason"]

        async def listening() -> bool:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                return bool(await readiness(follower_url))
            return False

        # The follower starts first but finds the Lease held (kopf, when it stops, cancels the
        # tasks created after it started: in one process the follower must predate the leader).
        kube_fake.store.create("leases", lease("leader"), "auditwatch")
        follower = asyncio.create_task(
            run_operator(
                tmp_path / "follower",
                host="127.0.0.1",
                port=int(follower_url.rsplit(":", 1)[1]),
                namespaces=[],
                options=fast_options(identity="follower"),
                stop=follower_stop,
            )
        )
        await until(listening, "the follower's receiver listening")
        # A holder that advertises no receiver: nowhere to forward, so not ready, and 503.
        status, reason = await readiness(follower_url)
        assert status == 503 and "standby" in reason
        status, answer = await post(http, follower_url, "auditdemo", [], auth)
        assert status == 503 and "standby" in answer["error"]

        leader_data = tmp_path / "leader"
        first = sample_events(samples, 1)
        async with operator(leader_data, fast_options(identity="leader")) as (_, url, _t):
            assert leased() == ("leader", url)

            async def forwarding() -> bool:
                return await readiness(follower_url) == (200, f"forwarding to the leader at {url}")

            await until(forwarding, "the follower ready to forward")

            # A batch posted to the follower: the leader's answer, stored and counted there.
            status, answer = await post(http, follower_url, "auditdemo", first, auth)
            assert (status, answer["stored"]) == (200, len(first))
            expected = count(FIRST_RULE, first)
            obj = await fake_cluster.wait_for(
                "AuditAlert",
                "recon",
                lambda o: o.get("status", {}).get("matches") == expected,
                "team",
            )
            assert obj["status"]["state"] == "Firing"

            # The leader's refusals, as the leader words them.
            async with http.post(
                f"{follower_url}/api/v1/logstream/auditdemo",
                data=b"{not json",
                headers={"Authorization": "Basic " + base64.b64encode(b"u:p").decode()},
            ) as response:
                assert response.status == 400 and response.content_type == "application/json"
                assert (await response.json())["error"]
            assert (await post(http, follower_url, "auditdemo", first, ("u", "wrong")))[0] == 403

            # Forwarded once only: a request forwarded already is refused, not passed on.
            async with http.post(
                f"{follower_url}/api/v1/logstream/auditdemo",
                json=sample_events(samples, 9),
                headers={FORWARDED_HEADER: "1"},
            ) as response:
                assert response.status == 503 and response.headers["Retry-After"]

            async with http.get(f"{follower_url}/api/v1/status") as response:
                problems = (await response.json())["problems"]
            assert problems == [f"follower: see the leader at {url}"]
            async with http.get(f"{follower_url}/metrics") as response:
                metrics = await response.text()
            assert 'auditwatch_requests_forwarded_total{code="200"} 1.0' in metrics
            assert not (tmp_path / "follower").exists()  # a follower keeps its hands off storage
        # Stopped, the leader flushed what the follower forwarded into its own store.
        assert canonical(query(leader_data, "auditdemo")) == canonical(first)

        # The leader released the Lease on its way out: the follower takes over at once.
        await kube_fake.store.wait_for(lambda: leased() == ("follower", follower_url), timeout=WAIT)

        async def serving() -> bool:
            return (await readiness(follower_url)) == (200, "ok")

        await until(serving, "the new leader ready")
        second = sample_events(samples, 2)
        status, answer = await post(http, follower_url, "auditdemo", second, auth)
        assert (status, answer["stored"]) == (200, len(second))
    follower_stop.set()
    async with asyncio.timeout(WAIT):
        await follower
    assert leased() == (None, None)  # released again on the way out
    assert canonical(query(tmp_path / "follower", "auditdemo")) == canonical(second)


@pytest.mark.skipif(
    os.environ.get("AUDITWATCH_REAL_CLUSTER") != "1" or not os.environ.get("KUBECONFIG"),
    reason="needs a real cluster: set AUDITWATCH_REAL_CLUSTER=1 and KUBECONFIG "
    "(with the CRDs from crds/ installed)",
)
async def test_operator_lifecycle_against_a_real_cluster(samples: Path, tmp_path: Path) -> None:
    namespace = os.environ.get("AUDITWATCH_TEST_NAMESPACE", "default")
    options = fast_options(namespace=namespace, kopf_settings=None, status_interval=1.0)
    options.lease_name = f"auditwatch-test-{uuid.uuid4().hex[:6]}"
    async with KubeApi(load_configuration()) as api:
        await lifecycle(
            Cluster(api, namespace, namespace), samples, tmp_path / "data", options, None
        )


def secret_reads_in(namespace: str, prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{prefix}/{index}")),
            "stage": "ResponseComplete",
            "verb": "get",
            "user": {"username": "someone"},
            "objectRef": {"resource": "secrets", "namespace": namespace, "name": "token"},
            "responseStatus": {"code": 200},
        }
        for index in range(count)
    ]


async def test_a_tenant_sees_its_own_namespace_until_a_namespace_label_grants_the_cluster(
    fake_cluster: Cluster, kube_fake: KubeFake, tmp_path: Path
) -> None:
    """The stream admits alerts from namespaces labelled `tenant`, and shows the whole cluster
    to those labelled cluster-wide; the operator follows namespace labels as they change."""
    allowed = {
        "namespaces": {
            "from": "Selector",
            "selector": {"matchExpressions": [{"key": "tenant", "operator": "Exists"}]},
        },
        "clusterWide": {
            "from": "Selector",
            "selector": {"matchLabels": {"auditwatch.dev/cluster-wide": "true"}},
        },
    }
    kube_fake.store.create("namespaces", {"metadata": {"name": "team", "labels": {"tenant": "a"}}})
    kube_fake.store.create("namespaces", {"metadata": {"name": "stranger"}})
    await fake_cluster.create(secret("shared-ingest", "auditwatch", username="u", password="p"))
    await fake_cluster.create(stream_body("shared", "auditwatch", allowed))
    rule = 'objectRef.resource = "secrets"'
    async with webhook_sink() as sink, aiohttp.ClientSession() as http:
        await fake_cluster.create(secret("reads-hook", "team", token="Bearer t"))
        await fake_cluster.create(alert_body("reads", "team", "shared", rule, sink.url))
        await fake_cluster.create(secret("reads-hook", "stranger", token="Bearer s"))
        await fake_cluster.create(alert_body("reads", "stranger", "shared", rule, sink.url))
        async with operator(tmp_path / "data", fast_options()) as (_running, url, _task):
            refused = await fake_cluster.wait_for(
                "AuditAlert",
                "reads",
                lambda o: o.get("status", {}).get("state") == "Invalid",
                "stranger",
            )
            assert ready(refused)["reason"] == "StreamNotGranted"
            assert "'stranger'" in ready(refused)["message"]
            warning = await fake_cluster.wait_for_event("reads", "stranger", "StreamNotGranted")
            assert warning["type"] == "Warning"
            await fake_cluster.wait_for(
                "AuditAlert", "reads", lambda o: ready(o).get("status") == "True", "team"
            )

            ours, theirs = (
                secret_reads_in("team", "ours", 2),
                secret_reads_in("kube-system", "x", 3),
            )
            assert (await post(http, url, "shared", ours + theirs, ("u", "p")))[0] == 200
            obj = await fake_cluster.wait_for(
                "AuditAlert", "reads", lambda o: o.get("status", {}).get("matches") == 2, "team"
            )
            assert obj["status"]["lastMatch"]["namespace"] == "team"

            # The platform team labels the namespace: from now on it sees the whole stream.
            kube_fake.store.patch(
                "namespaces",
                "team",
                {"metadata": {"labels": {"auditwatch.dev/cluster-wide": "true"}}},
            )

            async def sees_the_cluster() -> bool:
                more = secret_reads_in("kube-system", f"more-{uuid.uuid4()}", 1)
                assert (await post(http, url, "shared", more, ("u", "p")))[0] == 200
                obj = await fake_cluster.get("AuditAlert", "reads", "team")
                return bool(obj["status"]["lastMatch"]["namespace"] == "kube-system")

            await until(sees_the_cluster, "the label's grant")
            assert (await fake_cluster.get("AuditAlert", "reads", "team"))["status"]["matches"] > 2


async def test_a_stream_deleted_and_recreated_keeps_its_alerts_and_last_match_is_exact(
    fake_cluster: Cluster, samples: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #11 items 3 and 4: the stream's Secret and then the stream itself deleted and
    re-created: the alert is Invalid meanwhile with its counts, last match and targets, and back
    Firing with them, without a second Firing Event; lastMatch shows exactly the last match."""
    caplog.set_level(logging.INFO, logger="kopf.objects")
    cluster, ns, opns = fake_cluster, fake_cluster.namespace, fake_cluster.operator_namespace
    stream, name = "kube-audit", "secret-read"
    ingest_secret = secret(f"{stream}-ingest", opns, username="apiserver", password="one")
    events = sample_events(samples, 1)
    rule = 'objectRef.resource = "secrets"'
    async with webhook_sink() as sink, aiohttp.ClientSession() as http:
        await cluster.create(ingest_secret)
        await cluster.create(secret(f"{name}-hook", ns, token="Bearer one"))
        await cluster.create(stream_body(stream, opns))
        await cluster.create(alert_body(name, ns, stream, rule, sink.url))
        async with operator(tmp_path / "data", fast_options()) as (_running, url, _task):
            auth = ("apiserver", "one")
            assert (await post(http, url, stream, events, auth))[0] == 200
            expected = count(rule, events)
            firing = await cluster.wait_for(  # the first notice delivered: targets settled
                "AuditAlert",
                name,
                lambda o: [t.get("sent") for t in o.get("status", {}).get("targets", [])] == [1],
                ns,
            )
            assert (firing["status"]["state"], firing["status"]["matches"]) == ("Firing", expected)

            async def gone_and_back(kind: str, body: dict[str, Any], namespace: str | None) -> None:
                await cluster.delete(kind, body["metadata"]["name"], namespace)
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: o["status"]["state"] == "Invalid", ns
                )
                for field_name in ("matches", "lastMatch", "lastMatchTime", "targets"):
                    assert obj["status"][field_name] == firing["status"][field_name], field_name
                assert "state Firing" in ready(obj)["message"]
                await cluster.create(body)
                obj = await cluster.wait_for(
                    "AuditAlert", name, lambda o: o["status"]["state"] != "Invalid", ns
                )
                assert (obj["status"]["state"], obj["status"]["matches"]) == ("Firing", expected)

            await gone_and_back("Secret", ingest_secret, opns)
            await gone_and_back("AuditStream", stream_body(stream, opns), None)
            await cluster.wait_for_event(name, ns, "Valid")
            reasons = [e["reason"] for e in await cluster.events(name, ns)]
            assert reasons.count("Firing") == 1, reasons

            # A match without namespace and name (a cluster-wide list): none shown.
            listing = dict(events[0], auditID=str(uuid.uuid4()), verb="list")
            listing["objectRef"] = {"resource": "secrets", "apiVersion": "v1"}
            assert (await post(http, url, stream, [listing], auth))[0] == 200
            obj = await cluster.wait_for(
                "AuditAlert", name, lambda o: o["status"]["matches"] == expected + 1, ns
            )
            assert firing["status"]["lastMatch"].get("namespace")
            last = obj["status"]["lastMatch"]
            assert last["verb"] == "list" and "namespace" not in last and "name" not in last
    # Item 9: kopf's line per watch event of the deleted handler is not logged.
    messages = [record.getMessage() for record in caplog.records]
    assert any(m == "Handler 'create' succeeded." for m in messages)
    assert "Handler 'deleted' succeeded." not in messages


async def test_a_leader_that_loses_the_lease_steps_down_and_leads_again_with_its_state(
    fake_cluster: Cluster, kube_fake: KubeFake, samples: Path, tmp_path: Path
) -> None:
    """Issue #11 item 6: losing the Lease no longer ends the process: the replica steps down
    (state saved, storage flushed, receiver up), and leads again once the Lease is free, with
    the alert where it was."""
    opns, ns = fake_cluster.operator_namespace, fake_cluster.namespace
    await fake_cluster.create(secret("auditdemo-ingest", opns, username="u", password="p"))
    await fake_cluster.create(secret("recon-hook", ns, token="Bearer one"))
    await fake_cluster.create(stream_body("auditdemo", opns))
    events = sample_events(samples, 1)
    expected = count(FIRST_RULE, events)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        webhook_sink() as sink,
    ):
        await fake_cluster.create(alert_body("recon", ns, "auditdemo", FIRST_RULE, sink.url))
        async with operator(tmp_path / "data", fast_options(identity="me")) as (_r, url, task):
            assert (await post(http, url, "auditdemo", events, ("u", "p")))[0] == 200
            await fake_cluster.wait_for(
                "AuditAlert", "recon", lambda o: o.get("status", {}).get("state") == "Firing", ns
            )

            def take_lease(holder: str | None) -> None:
                lease = kube_fake.store.get("leases", "auditwatch", opns)
                lease["spec"]["holderIdentity"] = holder
                lease["metadata"]["annotations"] = {}
                kube_fake.store.replace("leases", "auditwatch", lease, opns)

            take_lease("other")

            async def standby() -> bool:
                async with http.get(f"{url}/api/v1/readiness") as response:
                    return "standby" in (await response.json())["reason"]

            await until(standby, "the replica on standby")
            assert not task.done(), "stepping down must not end the process"

            take_lease(None)  # the other replica released it

            async def leading() -> bool:
                async with http.get(f"{url}/api/v1/readiness") as response:
                    return response.status == 200 and (await response.json())["reason"] == "ok"

            await until(leading, "the replica leading again")
            async with http.get(f"{url}/api/v1/status") as response:
                status = (await response.json())["alerts"][f"{ns}/recon"]
            assert (status["state"], status["matches"]) == ("Firing", expected)
            assert len(sink.received) == 1, "leading again is no new firing"


async def test_a_stream_that_only_counts_is_not_patched_every_interval(
    fake_cluster: Cluster, kube_fake: KubeFake, samples: Path, tmp_path: Path
) -> None:
    """Issue #10 item 3: events arriving all the time (the operator's own API calls, on an
    idle cluster) change only the stream's counts: patched at once, then at most every
    counts_interval (30 s), not every status interval."""
    opns = fake_cluster.operator_namespace
    await fake_cluster.create(secret("busy-ingest", opns, username="u", password="p"))
    await fake_cluster.create(stream_body("busy", opns))
    path = f"/apis/{GROUP}/{VERSION}/auditstreams/busy/status"
    async with (
        aiohttp.ClientSession() as http,
        operator(tmp_path / "data", fast_options()) as (_r, url, _t),
    ):
        await fake_cluster.wait_for("AuditStream", "busy", lambda o: ready(o).get("status"))
        first = sample_events(samples, 1)
        assert (await post(http, url, "busy", first, ("u", "p")))[0] == 200
        await fake_cluster.wait_for(
            "AuditStream", "busy", lambda o: o["status"].get("eventsReceived") == len(first)
        )
        before = len(kube_fake.requests_matching("PATCH", path))
        for round_ in range(2, 12):  # 3 s of steady arrivals: ten status intervals
            assert (await post(http, url, "busy", sample_events(samples, round_), ("u", "p")))[
                0
            ] == 200
            await asyncio.sleep(0.3)
        assert len(kube_fake.requests_matching("PATCH", path)) - before <= 1
