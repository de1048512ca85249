"""Where notifications may go: the egress policy, redirects, target answers and reserved headers.

Every connection here stays on loopback: "denied" addresses are loopback addresses the policy of
the test denies (127.0.0.2), and names resolve through a table (StubResolver), never real DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from tests.e2e_support import (
    eventually,
    free_port,
    get_json,
    post,
    secret_doc,
    stream_doc,
    synthetic_events,
    write_yaml,
)

from auditwatch.cli import main
from auditwatch.config.build import build_alert
from auditwatch.config.model import ConfigError
from auditwatch.notify import Notifier
from auditwatch.notify.egress import EgressPolicy
from auditwatch.serve import serve as serve_standalone
from test_notify import (
    FAST,
    PASSWORD,
    TOKEN,
    StubResolver,
    answers,
    echo_path,
    fire,
    make_spec,
    make_target,
    serve,
    tls_context,
)

__all__ = ["tls_context"]  # the fixture is used by name below

ONCE = replace(FAST, attempts=1)
MARKER = "TARGET-BODY-MARKER-51c7"


@asynccontextmanager
async def listener(host: str, port: int = 0) -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP listener on `host` that counts connections and answers each request 200."""
    connections: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(host)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length:")),
            0,
        )  # fmt: skip
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()
        await server.wait_closed()


def deny(*cidrs: str) -> EgressPolicy:
    return EgressPolicy.build(deny=cidrs)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_a_failed_delivery_and_is_not_followed(status: int) -> None:
    landed: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/landing":
            landed.append(request.method)
            return web.Response(text="ok")
        return web.Response(status=status, headers={"Location": "/landing"}, text=MARKER)

    async with serve(handle) as (url, seen):
        spec = make_spec(make_target(f"{url}/hook", headers={"Metadata-Flavor": "Google"}))
        async with Notifier(retry=FAST) as notifier:
            assert not await notifier.deliver(spec, fire(spec)[1][0])
            record = notifier.record(spec.key, "webhook")
    assert landed == []
    assert [path for path, _, _ in seen.requests] == ["/hook"]  # and never retried
    assert (record.failed, record.retries) == (1, 0)
    assert record.last_error is not None
    assert record.last_error.startswith(f"HTTP {status} ")
    assert record.last_error.endswith("from target (redirects are not followed)")


@pytest.mark.parametrize("host", ["127.0.0.2", "[::ffff:127.0.0.2]"])
async def test_denied_address_is_refused_before_connecting(host: str) -> None:
    """Also as an IPv4-mapped IPv6 address, which reaches the same IPv4 listener."""
    async with listener("127.0.0.2") as (port, connections):
        spec = make_spec(make_target(f"http://{host}:{port}/hook"))
        async with Notifier(retry=FAST, egress=deny("127.0.0.2/32")) as notifier:
            assert not await notifier.deliver(spec, fire(spec)[1][0])
            record = notifier.record(spec.key, "webhook")
        assert connections == []
        assert (record.failed, record.retries) == (1, 0)  # final: retrying cannot help
        assert record.last_error == "address 127.0.0.2 denied by egress policy"

        # The same target under the default policy: the listener does count connections.
        async with Notifier(retry=ONCE) as notifier:
            assert await notifier.deliver(spec, fire(spec)[1][0])
        assert connections == ["127.0.0.2"]


async def test_name_resolving_to_a_denied_address_is_refused() -> None:
    async with listener("127.0.0.2") as (port, connections):
        resolver = StubResolver({"hooks.internal.test": ["127.0.0.2"]})
        spec = make_spec(make_target(f"http://hooks.internal.test:{port}/hook"))
        async with Notifier(retry=FAST, egress=deny("127.0.0.2/32"), resolver=resolver) as notifier:
            assert not await notifier.deliver(spec, fire(spec)[1][0])
            record = notifier.record(spec.key, "webhook")
    assert resolver.asked == ["hooks.internal.test"]
    assert connections == []
    assert record.last_error == "address 127.0.0.2 denied by egress policy"


async def test_connection_goes_only_to_the_allowed_addresses_of_a_name() -> None:
    """A name with a denied and an allowed address: only the allowed one is ever connected."""
    async with listener("127.0.0.1") as (port, allowed), listener("127.0.0.2", port) as (_, denied):
        # The denied address first, as a rebinding DNS server would answer.
        resolver = StubResolver({"hooks.internal.test": ["127.0.0.2", "127.0.0.1"]})
        spec = make_spec(make_target(f"http://hooks.internal.test:{port}/hook"))
        async with Notifier(retry=ONCE, egress=deny("127.0.0.2/32"), resolver=resolver) as notifier:
            for _ in range(3):
                assert await notifier.deliver(spec, fire(spec)[1][0])
    assert denied == []
    assert allowed == ["127.0.0.1"] * 3


async def test_tls_names_the_host_of_the_url_not_the_checked_address(
    tls_context: ssl.SSLContext,
) -> None:
    """SNI (and so certificate checks) use the URL's name, though we connect to an address."""
    names: list[str | None] = []
    tls_context.sni_callback = lambda _socket, name, _context: names.append(name)  # type: ignore[assignment,func-returns-value]
    async with serve(answers(), tls_context) as (url, seen):
        port = url.rsplit(":", 1)[1]
        resolver = StubResolver({"hooks.internal.test": ["127.0.0.1"]})
        spec = make_spec(make_target(f"https://hooks.internal.test:{port}/", skip_tls_check=True))
        async with Notifier(retry=ONCE, resolver=resolver) as notifier:
            assert await notifier.deliver(spec, fire(spec)[1][0])
    tls_context.sni_callback = None
    assert names == ["hooks.internal.test"]
    assert seen.headers()["Host"] == f"hooks.internal.test:{port}"


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_answer_body_never_reaches_status_or_logs(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(answers(*[status] * 5, body=f"<secret>{MARKER}</secret>")) as (url, _):
        spec = make_spec(make_target(url))
        async with Notifier(retry=FAST) as notifier:
            assert not await notifier.deliver(spec, fire(spec)[1][0])
            shown = json.dumps(notifier.status(spec.key))
    assert f"HTTP {status} " in shown and "from target" in shown
    assert MARKER not in shown and MARKER not in caplog.text


def test_policy_most_specific_network_decides() -> None:
    policy = EgressPolicy.build(
        allow=["10.0.0.0/8", "169.254.10.1/32"], deny=["10.1.0.0/16"], pod_ip="10.2.3.4"
    )

    def allows(address: str) -> bool:
        return policy.allows(ipaddress.ip_address(address))

    assert allows("10.9.9.9") and not allows("10.1.2.3")  # deny /16 inside allow /8
    assert not allows("192.0.2.1")  # an allow list: nothing else
    assert not allows("169.254.169.254") and allows("169.254.10.1")  # one address opened
    assert not allows("10.2.3.4") and not allows("127.0.0.1")  # the operator's own pod
    assert not allows("::ffff:10.1.2.3") and not allows("fe80::1") and not allows("fd00:ec2::254")
    open_policy = EgressPolicy()  # the defaults: everything but link-local and metadata
    assert open_policy.allows(ipaddress.ip_address("127.0.0.1"))
    assert not open_policy.allows(ipaddress.ip_address("169.254.169.254"))
    with pytest.raises(ValueError, match=r"10\.1\.2\.3/8 has host bits set"):
        EgressPolicy.build(deny=["10.1.2.3/8"])


WEBHOOK = {"type": "webhook", "endpoint": "http://hooks.example.com/"}


def alert(*targets: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": "a", "namespace": "team-a"},
        "spec": {"stream": "audit", "message": "m", "targets": list(targets),
                 "rule": {"type": "composite", "config": "verb = \"create\""}},
    }  # fmt: skip


@pytest.mark.parametrize(
    "target",
    [
        WEBHOOK | {"headers": {"Host": "metadata.google.internal"}},
        WEBHOOK | {"headers": {"transfer-encoding": "chunked"}},
        WEBHOOK | {"headersFrom": [{"name": "Content-Length", "secretRef": {"name": "h", "key": "k"}}]},  # noqa: E501
        {"type": "alertmanager", "endpoint": "http://am", "headers": {"Connection": "upgrade"}},
    ],
)  # fmt: skip
def test_reserved_headers_make_the_alert_invalid(target: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        build_alert(alert(target), lambda namespace, name, key: "7")
    assert caught.value.reason == "InvalidSpec"
    assert caught.value.message.startswith("spec.targets[0].headers: ")
    assert caught.value.message.endswith("is set by auditwatch itself and cannot be overridden")


async def test_standalone_status_logs_and_metrics_never_show_target_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve` with a Secret-held Slack URL, a `user:password@` webhook and a denied address."""
    caplog.set_level(logging.DEBUG)
    async with serve(echo_path) as (url, seen):
        port = url.rsplit(":", 1)[1]
        slack = {"type": "slack", "endpointSecretRef": {"name": "slack", "key": "url"}}
        basic = {"type": "webhook", "endpoint": f"http://hook:{PASSWORD}@127.0.0.1:{port}/hook"}
        denied = {"type": "webhook", "endpoint": f"http://hook:{PASSWORD}@127.0.0.2:{port}/{TOKEN}"}
        resources = tmp_path / "resources"
        write_yaml(
            resources / "all.yaml",
            stream_doc("audit"),
            secret_doc("slack", url=f"{url}/services/T0/B0/{TOKEN}"),
            alert(slack, basic, denied) | {"metadata": {"name": "exec", "namespace": "default"}},
        )
        receiver = f"http://127.0.0.1:{free_port()}"
        stop, ready = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(
            serve_standalone(
                resources,
                tmp_path / "data",
                host="127.0.0.1",
                port=int(receiver.rsplit(":", 1)[1]),
                stop=stop,
                ready=ready,
                egress=deny("127.0.0.2/32"),
            )
        )
        try:
            await asyncio.wait_for(ready.wait(), 10)
            async with aiohttp.ClientSession() as session:
                answer = await post(
                    session,
                    f"{receiver}/api/v1/logstream/audit",
                    synthetic_events("x", 1, verb="create"),
                )
                assert answer.status == 200, answer.body

                async def all_failed() -> bool:
                    alert_status = (await get_json(session, f"{receiver}/api/v1/status"))["alerts"]
                    targets = alert_status["default/exec"]["targets"]
                    return len(targets) == 3 and all(t["failed"] == 1 for t in targets)

                await eventually(all_failed, 10, "three failed deliveries")
                async with session.get(f"{receiver}/api/v1/status") as response:
                    status = await response.text()
                async with session.get(f"{receiver}/metrics") as response:
                    metrics = await response.text()
        finally:
            stop.set()
            await server
    errors = {
        t["name"]: t["lastError"] for t in json.loads(status)["alerts"]["default/exec"]["targets"]
    }
    assert errors == {
        "slack-0": "HTTP 404 Not Found from target",
        "webhook-1": "HTTP 404 Not Found from target",
        "webhook-2": "address 127.0.0.2 denied by egress policy",
    }
    assert sorted(path for path, _, _ in seen.requests) == ["/hook", f"/services/T0/B0/{TOKEN}"]
    assert 'target="slack-0"' in metrics and 'target="webhook-2"' in metrics
    for shown in (status, metrics, caplog.text):
        assert TOKEN not in shown and PASSWORD not in shown


@pytest.mark.parametrize("command", ["serve", "run"])
def test_a_bad_network_stops_the_command_with_a_clear_message(command: str, tmp_path: Path) -> None:
    args = [command, "--data", str(tmp_path / "data")]
    args += ["--resources", str(tmp_path)] if command == "serve" else []
    result = CliRunner().invoke(main, args, env={"AUDITWATCH_EGRESS_DENY": "10.0.0.0/8,10.1.2.3/8"})
    assert result.exit_code == 2
    assert "egress policy: 10.1.2.3/8 has host bits set" in result.output
    assert not (tmp_path / "data").exists()  # refused before anything started
