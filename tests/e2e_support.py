"""Shared pieces of the end-to-end tests: a webhook sink, resource YAML, a receiver on a free port.

Everything here is real: the receiver is `serve.start_receiver` around a real `Engine` on a real
data directory, and the sink is an aiohttp server the notifier posts to over loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

from auditwatch.config.files import DirectorySource
from auditwatch.engine import Engine
from auditwatch.receive import ReceiverOptions
from auditwatch.serve import apply_config_set, start_receiver
from auditwatch.store import query

LOG_SAMPLES = (
    "impersonation-and-403s.log",
    "secret-recon-then-exec.log",
    "sekoia-mixed.log",
    "pod-exec.log",
    "privileged-pod.log",
)
"""The real samples written one event per line (no envelope)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The events of a one-event-per-line log, parsed independently of auditwatch.decode."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def canonical(events: Iterable[dict[str, Any]]) -> list[bytes]:
    """Events as sorted canonical JSON: compares two collections as multisets."""
    return sorted(orjson.dumps(event, option=orjson.OPT_SORT_KEYS) for event in events)


def stored(data: Path, stream: str) -> list[dict[str, Any]]:
    """What the store holds for `stream` (nothing when the stream never got an event)."""
    if not (data / stream).is_dir():
        return []
    return list(query(data, stream))


def synthetic_events(prefix: str, count: int, **fields: Any) -> list[dict[str, Any]]:
    """Audit events with unique auditIDs `prefix-<n>`; `fields` override the defaults."""
    return [
        {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": f"{prefix}-{index}",
            "stage": "ResponseComplete",
            "requestURI": "/api/v1/namespaces/default/configmaps/app",
            "verb": "get",
            "user": {"username": "tester"},
            "objectRef": {"resource": "configmaps", "namespace": "default", "name": "app"},
            "responseStatus": {"code": 200},
        }
        | fields
        for index in range(count)
    ]


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# -- resources ------------------------------------------------------------------------------


def stream_doc(
    name: str,
    *,
    basic_secret: str | None = None,
    bearer_secret: str | None = None,
    max_body_bytes: int | None = None,
    max_event_bytes: int | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if basic_secret:
        spec["auth"] = {"basic": {"secretRef": {"name": basic_secret}}}
    if bearer_secret:
        spec["auth"] = {"bearer": {"secretRef": {"name": bearer_secret}}}
    limits = {"maxBodyBytes": max_body_bytes, "maxEventBytes": max_event_bytes}
    if any(limits.values()):
        spec["limits"] = {key: value for key, value in limits.items() if value}
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": name},
        "spec": spec,
    }


def secret_doc(name: str, **values: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "stringData": values,
    }


def alert_doc(
    name: str,
    stream: str,
    rule: str,
    endpoint: str | None,
    *,
    message: str = "{verb} {objectRef_resource} by {user_username}",
    interval: str = "1s",
    times: int = 5,
    resolve_after: str = "2s",
) -> dict[str, Any]:
    targets = []
    if endpoint is not None:
        targets = [
            {
                "type": "webhook",
                "endpoint": endpoint,
                "repeat": {"interval": interval, "times": times},
            }
        ]
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "stream": stream,
            "message": message,
            "rule": {"type": "composite", "config": rule},
            "targets": targets,
            "resolveAfter": resolve_after,
        },
    }


def write_yaml(path: Path, *documents: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))


# -- a webhook target -----------------------------------------------------------------------


@dataclass
class Delivery:
    at: float
    """time.monotonic() when the sink got it."""
    body: Any
    headers: dict[str, str]
    raw: bytes


@dataclass
class WebhookSink:
    """A local HTTP target keeping every request; `answers` are status codes to give first."""

    answers: list[int] = field(default_factory=list)
    received: list[Delivery] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> WebhookSink:
        # Raw bodies: a compressed request must reach the test as it was sent.
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.received.append(Delivery(time.monotonic(), body, dict(request.headers), raw))
        self._arrived.set()
        status = self.answers.pop(0) if self.answers else 200
        return web.json_response({"error": "scripted"} if status >= 300 else {}, status=status)

    def bodies(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Notification bodies received, of one `kind` (firing, repeat, resolved) if given."""
        return [
            d.body
            for d in self.received
            if isinstance(d.body, dict) and (kind is None or d.body.get("kind") == kind)
        ]

    async def wait_for(self, kind: str, timeout: float, after: int = 0) -> Delivery:
        """The first notification of `kind` among those from index `after` on."""
        deadline = time.monotonic() + timeout
        while True:
            for delivery in self.received[after:]:
                if isinstance(delivery.body, dict) and delivery.body.get("kind") == kind:
                    return delivery
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [d.body.get("kind") for d in self.received if isinstance(d.body, dict)]
                raise AssertionError(f"no {kind!r} notice within {timeout} s; got {kinds}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


# -- a running receiver ---------------------------------------------------------------------


@dataclass
class Running:
    engine: Engine
    source: DirectorySource
    url: str
    data: Path
    runner: web.AppRunner
    stop: asyncio.Event
    loop: asyncio.Task[None]

    async def close(self) -> None:
        """Stop receiving, stop the background loop, flush storage (idempotent)."""
        await self.runner.cleanup()
        self.stop.set()
        while not self.loop.done():
            # run() does not watch `stop` while it sleeps: wake it rather than wait for its tick.
            self.engine._wake()
            await asyncio.wait([self.loop], timeout=0.02)
        await self.loop
        await self.engine.close()


@contextlib.asynccontextmanager
async def running_receiver(
    resources: Path,
    data: Path,
    decode_workers: int = 0,
    options: ReceiverOptions | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[Running]:
    """Engine + receiver + background loop on a free loopback port; closed (flushed) on exit.

    `decode_workers` > 0 decodes bodies in worker processes, as `auditwatch serve` does.
    """
    source = DirectorySource(resources)
    engine = Engine(data)
    apply_config_set(engine, source.reload())
    runner = await start_receiver(engine, host, 0, decode_workers=decode_workers, options=options)
    port = runner.addresses[0][1]
    host = "127.0.0.1" if host == "0.0.0.0" else host
    stop = asyncio.Event()
    loop = asyncio.create_task(engine.run(stop))
    running = Running(engine, source, f"http://{host}:{port}", data, runner, stop, loop)
    try:
        yield running
    finally:
        await running.close()


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes | Any,
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST raw bytes (or a JSON value, serialised) and read the answer whatever its type."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(url, data=data, headers=headers or {}) as response:
        text = await response.read()
        try:
            parsed: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = text.decode(errors="replace")
        return Answer(response.status, parsed, dict(response.headers))


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, f"GET {url}: {response.status}"
        return orjson.loads(await response.read())


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.05
) -> None:
    """Poll `check` until it is true; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(step)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """`eventually` for a plain condition."""

    async def check() -> bool:
        return condition()

    await eventually(check, timeout, what)
