"""`auditwatch demo`: the seed scenario end to end, on this machine, in about ten seconds.

It runs the real thing, not a simulation: the standalone server on a loopback port with the
bundled resources (examples/standalone), a local webhook that records what it is sent, and the
bundled audit log replayed the way the apiserver sends it. Then it checks that exactly the
unauthorized reads of `mysecret` fired, and that the alert resolved once they stopped.
The demo shortens the alert's repeat interval and quiet period so the story fits in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from auditwatch.config.build import build_alert
from auditwatch.credentials import basic_authorization
from auditwatch.decode import decode_file
from auditwatch.normalise import normalise
from auditwatch.replay import replay
from auditwatch.rules.ast import Expr, Not, conjunction
from auditwatch.rules.evaluate import compile_rule
from auditwatch.rules.parse import parse_expression
from auditwatch.serve import serve
from auditwatch.status_table import alerts_table, fetch_status

STORY_LOG = "seed-story.log"
ALERT_FILE = "secret-read-alert.yaml"
NAIVE_RULE = (
    '(verb =% "list" or verb =% "get") and '
    '(objectRef_resource = "secrets" and user_username !% "authorized-user")'
)
"""The seed's rule as Parseable users write it: it never fires for `unauthorized-user`."""

DEMO_REPEAT_INTERVAL = "2s"
DEMO_RESOLVE_AFTER = "4s"
WAIT_SECONDS = 20.0


def bundled_resources() -> Path:
    """The examples/standalone folder, from a checkout or the installed package."""
    return Path(str(importlib.resources.files("auditwatch") / "data" / "demo"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class WebhookSink:
    """A local webhook target that keeps every JSON body it receives."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"

    async def hook(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.arrived.set()
        return web.json_response({"ok": True})

    async def wait_for(self, kind: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not any(body.get("kind") == kind for body in self.received):
            self.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)
        return True

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def prepare_resources(source: Path, target: Path, webhook_url: str) -> None:
    """Copy the bundled resources, pointing the alert at the sink with demo-sized timings."""
    shutil.copytree(source, target)
    alert_path = target / ALERT_FILE
    alert = yaml.safe_load(alert_path.read_text())
    alert["spec"]["resolveAfter"] = DEMO_RESOLVE_AFTER
    for target_spec in alert["spec"]["targets"]:
        target_spec["endpoint"] = webhook_url
        target_spec["repeat"]["interval"] = DEMO_REPEAT_INTERVAL
    alert_path.write_text(yaml.safe_dump(alert, sort_keys=False))


def _no_secret(namespace: str | None, name: str, key: str) -> str:
    return "http://127.0.0.1/"


def rule_hits(
    events: list[dict[str, Any]], rule_text: str, unless: Expr | None = None
) -> list[bool]:
    """Which events the rule matches and `unless` (the alert's exceptions) does not except,
    evaluated as the server does."""
    condition = parse_expression(rule_text)
    if unless is not None:
        condition = conjunction([condition, Not(unless)])
    mask = compile_rule(condition).evaluate(normalise(events, received_at=datetime.now(UTC)))
    return [bool(hit) for hit in mask.to_pylist()]


def story_lines(events: list[dict[str, Any]], hits: list[bool]) -> list[str]:
    """One line per event of the story, marked where the rule matches."""
    lines = []
    for event, hit in zip(events, hits, strict=True):
        ref = event.get("objectRef", {})
        target = "/".join(p for p in (ref.get("resource"), ref.get("name")) if p)
        user = event.get("user", {}).get("username", "?")
        lines.append(
            f"  {'ALERT' if hit else '     '}  {user:<50} {event.get('verb', ''):<7} {target}"
        )
    return lines


async def run_demo(port: int = 0, echo: Callable[[str], None] = print) -> int:
    """Run the story; 0 when exactly the unauthorized reads fired and the alert resolved."""
    resources = bundled_resources()
    events = decode_file(resources / STORY_LOG)
    alert = yaml.safe_load((resources / ALERT_FILE).read_text())
    rule_text = " ".join(alert["spec"]["rule"]["config"].split())
    exceptions = alert["spec"].get("exceptions", {})
    hits = rule_hits(events, rule_text, build_alert(alert, _no_secret).exceptions)
    echo(f"The story: {len(events)} audit events (bundled {STORY_LOG}).")
    echo(f"The alert's rule: {rule_text}")
    for name, exception in exceptions.items():
        echo(f"Its exception {name}: {exception['fields']} = {exception['values']}")
    echo("\n".join(story_lines(events, hits)))
    echo(
        f'(Parseable\'s example rule `... user_username !% "authorized-user"` matches '
        f"{sum(rule_hits(events, NAIVE_RULE))} of them: the unauthorized account's name "
        "contains that text.)\n"
    )

    sink = WebhookSink()
    await sink.start()
    stop = asyncio.Event()
    ready = asyncio.Event()
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="auditwatch-demo-") as scratch:
        folder = Path(scratch)
        prepare_resources(resources, folder / "resources", sink.url)
        server = asyncio.create_task(
            serve(
                folder / "resources",
                folder / "data",
                host="127.0.0.1",
                port=port,
                stop=stop,
                ready=ready,
            )
        )
        try:
            await asyncio.wait_for(ready.wait(), 10)
            echo(f"Server on {url}; replaying the story as the apiserver's webhook would ...")
            await replay(
                events, url, stream="auditdemo", authorization=basic_authorization("admin", "admin")
            )
            fired = await sink.wait_for("firing", WAIT_SECONDS)
            status_firing = await fetch_status(url)
            echo(alerts_table(status_firing, datetime.now(UTC)) + "\n")
            echo(f"Waiting for the alert to resolve ({DEMO_RESOLVE_AFTER} without a match) ...")
            resolved = await sink.wait_for("resolved", WAIT_SECONDS)
            status_final = await fetch_status(url)
        finally:
            stop.set()
            await server
            await sink.stop()

    echo("Notifications the webhook received:")
    for body in sink.received:
        echo(f"  {body['kind']:<9} count={body['count']:<3} {body['message']}")
    echo("\n" + alerts_table(status_final, datetime.now(UTC)))
    matched_users = {
        event.get("user", {}).get("username")
        for event, hit in zip(events, hits, strict=True)
        if hit
    }
    final = status_final["alerts"].get("default/secret-read", {})
    ok = (
        fired
        and resolved
        and matched_users == {"system:serviceaccount:default:unauthorized-user"}
        and final.get("matches") == 3
        and final.get("state") == "Resolved"
    )
    echo("\nResult: " + ("as expected." if ok else "NOT as expected (see above)."))
    return 0 if ok else 1
