"""Standalone mode end to end: `serve()` on the bundled example resources, a local webhook.

The seed story fires, repeats and resolves on time; edits of the resources directory take effect
without a restart and without losing a single acknowledged event.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from tests.e2e_support import (
    WebhookSink,
    alert_doc,
    basic_auth,
    canonical,
    eventually,
    free_port,
    get_json,
    post,
    read_lines,
    running_receiver,
    stored,
    stream_doc,
    synthetic_events,
    wait_until,
    write_yaml,
)

from auditwatch.serve import serve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "standalone"
STORY = EXAMPLES / "seed-story.log"
ALERT_FILE = "secret-read-alert.yaml"
ALERT_KEY = "default/secret-read"
AUTHORIZED = "system:serviceaccount:default:authorized-user"
CREDENTIALS = basic_auth("admin", "admin")


@dataclass
class Standalone:
    url: str
    resources: Path
    data: Path
    session: aiohttp.ClientSession

    @property
    def ingest(self) -> str:
        return self.url + "/api/v1/logstream/auditdemo"

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await get_json(self.session, self.url + "/api/v1/status")
        return status

    async def post(self, events: list[dict[str, Any]] | bytes) -> Any:
        answer = await post(self.session, self.ingest, events, CREDENTIALS)
        assert answer.status == 200, answer.body
        return answer.body

    def edit_alert(self, change: Any) -> None:
        path = self.resources / ALERT_FILE
        alert = yaml.safe_load(path.read_text())
        change(alert)
        path.write_text(yaml.safe_dump(alert, sort_keys=False))


@pytest.fixture
async def sink() -> AsyncIterator[WebhookSink]:
    async with WebhookSink() as webhook:
        yield webhook


@pytest.fixture
async def standalone(tmp_path: Path, sink: WebhookSink) -> AsyncIterator[Standalone]:
    """`serve()` on a copy of examples/standalone: webhook to the sink, repeat 1s, resolve 2s."""
    resources = tmp_path / "resources"
    shutil.copytree(EXAMPLES, resources)
    path = resources / ALERT_FILE
    alert = yaml.safe_load(path.read_text())
    alert["spec"]["resolveAfter"] = "2s"
    [target] = alert["spec"]["targets"]
    target["endpoint"] = sink.url
    target["repeat"]["interval"] = "1s"
    path.write_text(yaml.safe_dump(alert, sort_keys=False))

    port = free_port()
    stop, ready = asyncio.Event(), asyncio.Event()
    data = tmp_path / "data"
    server = asyncio.create_task(
        serve(resources, data, host="127.0.0.1", port=port, stop=stop, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with aiohttp.ClientSession() as session:
            yield Standalone(f"http://127.0.0.1:{port}", resources, data, session)
    finally:
        stop.set()
        await server


def unauthorized_secret_reads(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the example alert is about, worked out from the story without auditwatch."""
    return [
        e
        for e in events
        if e["verb"] in ("get", "list")
        and e["objectRef"]["resource"] == "secrets"
        and e["user"]["username"] != AUTHORIZED
    ]


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_seed_story_fires_repeats_and_resolves(
    standalone: Standalone, sink: WebhookSink
) -> None:
    story = read_lines(STORY)
    reads = unauthorized_secret_reads(story)
    assert len(reads) == 3
    before = datetime.now(UTC)
    await standalone.post(STORY.read_bytes())

    firing = await sink.wait_for("firing", 5)
    body = firing.body
    last = reads[-1]
    assert body["alert"] == "secret-read"
    assert body["namespace"] == "default"
    assert body["stream"] == "auditdemo"
    assert body["severity"] == "high"
    assert (body["state"], body["kind"]) == ("firing", "firing")
    assert body["message"] == f"secret mysecret was read by {last['user']['username']}"
    assert (body["count"], body["total"]) == (3, 3)
    assert body["event"] == {
        "auditID": last["auditID"],
        "user": last["user"]["username"],
        "verb": last["verb"],
        "resource": "secrets",
        "subresource": None,
        "namespace": last["objectRef"]["namespace"],
        "name": last["objectRef"]["name"],
        "code": last["responseStatus"]["code"],
        "stageTimestamp": last["stageTimestamp"],
        "sourceIPs": last["sourceIPs"],
    }
    assert before <= moment(body["firedAt"]) <= datetime.now(UTC)
    assert body["resolvedAt"] is None

    # More of the same: one "repeat" an interval after the firing, for what came since.
    more = [
        last | {"auditID": f"{last['auditID']}-again-{n}", "verb": verb}
        for n, verb in enumerate(("list", "get"))
    ]
    await standalone.post(more)
    last_post = time.monotonic()
    repeat = await sink.wait_for("repeat", 5)
    assert 0.8 <= repeat.at - firing.at <= 2.5
    assert (repeat.body["count"], repeat.body["total"]) == (2, 5)
    assert repeat.body["event"]["auditID"] == more[-1]["auditID"]
    assert repeat.body["firedAt"] == body["firedAt"]

    # Quiet: resolved once resolveAfter (2s) has passed since the last match.
    resolved = await sink.wait_for("resolved", 6)
    assert 1.8 <= resolved.at - last_post <= 4.0
    assert (resolved.body["state"], resolved.body["total"]) == ("resolved", 5)
    assert moment(resolved.body["resolvedAt"]) > moment(body["firedAt"])
    assert [d.body["kind"] for d in sink.received] == ["firing", "repeat", "resolved"]
    status = (await standalone.status())["alerts"][ALERT_KEY]
    assert (status["state"], status["matches"]) == ("Resolved", 5)
    assert status["targets"][0]["sent"] == 3


async def test_rule_change_applies_without_restart_or_lost_events(
    standalone: Standalone, sink: WebhookSink
) -> None:
    answers: list[int] = []
    acknowledged: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def keep_posting() -> None:
        batch = 0
        while not done.is_set():
            events = synthetic_events(f"bg{batch}", 5)
            answer = await post(standalone.session, standalone.ingest, events, CREDENTIALS)
            answers.append(answer.status)
            if answer.status == 200:
                acknowledged.extend(events)
            batch += 1
            await asyncio.sleep(0.01)

    poster = asyncio.create_task(keep_posting())
    await wait_until(lambda: len(answers) >= 5, 5, "first posts")
    assert sink.received == [], "configmap reads do not match the example rule"

    def read_configmaps(alert: dict[str, Any]) -> None:
        alert["spec"]["rule"]["config"] = 'objectRef_resource = "configmaps"'

    standalone.edit_alert(read_configmaps)
    firing = await sink.wait_for("firing", 10)
    assert firing.body["event"]["resource"] == "configmaps"
    count = len(answers)
    await wait_until(lambda: len(answers) >= count + 5, 5, "posts after the change")
    done.set()
    await poster
    status = (await standalone.status())["alerts"][ALERT_KEY]
    assert status["state"] == "Firing"
    assert 0 < status["matches"] <= len(acknowledged)

    assert set(answers) == {200}
    assert canonical(stored(standalone.data, "auditdemo")) == canonical(acknowledged)


async def test_broken_yaml_keeps_the_old_config_and_alert_files_come_and_go(
    standalone: Standalone, sink: WebhookSink
) -> None:
    broken = standalone.resources / ALERT_FILE
    broken.write_text("apiVersion: auditwatch.dev/v1alpha1\nkind: AuditAlert\nspec: [oops\n")

    async def problem_listed() -> bool:
        problems = (await standalone.status())["problems"]
        return any(ALERT_FILE in problem for problem in problems)

    await eventually(problem_listed, 10, "the broken file in status problems")
    [problem] = (await standalone.status())["problems"]
    assert "line" in problem and "stay in force" in problem
    # The alert as it was is still in force: the story still fires it.
    assert ALERT_KEY in (await standalone.status())["alerts"]
    await standalone.post(STORY.read_bytes())
    firing = await sink.wait_for("firing", 5)
    assert firing.body["count"] == 3

    extra = standalone.resources / "extra" / "configmap-alert.yaml"
    write_yaml(extra, alert_doc("configmap-read", "auditdemo", 'verb = "get"', None))

    async def alert_listed(key: str, present: bool = True) -> bool:
        return (key in (await standalone.status())["alerts"]) == present

    await eventually(lambda: alert_listed("default/configmap-read"), 10, "the new alert")
    await standalone.post(synthetic_events("cm", 2))
    status = (await standalone.status())["alerts"]["default/configmap-read"]
    assert (status["state"], status["matches"]) == ("Firing", 2)

    extra.unlink()
    await eventually(
        lambda: alert_listed("default/configmap-read", present=False), 10, "the alert gone"
    )
    assert ALERT_KEY in (await standalone.status())["alerts"]


async def test_invalid_alert_status_names_its_stream(tmp_path: Path) -> None:
    resources = tmp_path / "resources"
    write_yaml(resources / "stream.yaml", stream_doc("audit"))
    write_yaml(resources / "alert.yaml", alert_doc("orphan", "nosuch", 'verb = "get"', None))
    async with running_receiver(resources, tmp_path / "data") as running:
        status = running.engine.status()["alerts"]["default/orphan"]
    assert status["state"] == "Invalid"
    assert status["conditions"][0]["reason"] == "StreamNotFound"
    assert status["stream"] == "nosuch"
