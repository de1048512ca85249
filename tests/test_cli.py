"""The `auditwatch` command line as users run it: output, exit codes, and against a live server."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from click.testing import CliRunner, Result
from tests.e2e_support import (
    Running,
    basic_auth,
    canonical,
    post,
    read_lines,
    running_receiver,
    synthetic_events,
)

from auditwatch.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
STORY = EXAMPLES / "standalone" / "seed-story.log"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines()]


# -- test-rule ------------------------------------------------------------------------------


def test_test_rule_prints_the_matching_events_as_json_lines(samples: Path) -> None:
    log = samples / "secret-recon-then-exec.log"
    result = run("test-rule", 'objectRef.resource = "secrets" and responseStatus.code = 403', log)
    assert result.exit_code == 0, result.output
    expected = [
        e
        for e in read_lines(log)
        if e.get("objectRef", {}).get("resource") == "secrets"
        and e.get("responseStatus", {}).get("code") == 403
    ]
    assert expected
    assert json_lines(result.stdout) == expected


def test_test_rule_count_over_several_files(samples: Path) -> None:
    logs = [samples / "impersonation-and-403s.log", samples / "secret-recon-then-exec.log"]
    result = run("test-rule", "--count", "responseStatus.code = 403", *logs)
    assert result.exit_code == 0, result.output
    expected = sum(
        1 for log in logs for e in read_lines(log) if e.get("responseStatus", {}).get("code") == 403
    )
    assert result.stdout == f"{expected}\n"


def test_test_rule_column_rule_from_json(samples: Path) -> None:
    log = samples / "impersonation-and-403s.log"
    config = orjson.dumps({"column": "verb", "operator": "=", "value": "list"}).decode()
    result = run("test-rule", "--type", "column", config, log)
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout) == [e for e in read_lines(log) if e["verb"] == "list"]


def test_test_rule_bad_rule_exits_2_with_a_caret_under_the_problem(samples: Path) -> None:
    rule = 'verb = "get" and objectRef.resource "secrets"'
    result = run("test-rule", rule, samples / "pod-exec.log")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    shown = lines.index(rule)
    assert lines[shown + 1].index("^") == rule.index('"secrets"')
    assert "column 37" in result.stderr
    assert result.stdout == ""


def test_test_rule_undecodable_file_exits_1_naming_it(tmp_path: Path) -> None:
    log = tmp_path / "notes.log"
    log.write_text("this is not an audit log\n")
    result = run("test-rule", 'verb = "get"', log)
    assert result.exit_code == 1
    assert str(log) in result.stderr


def test_test_rule_in_a_real_process(samples: Path) -> None:
    log = samples / "impersonation-and-403s.log"
    completed = subprocess.run(
        [sys.executable, "-m", "auditwatch", "test-rule", "--count", 'verb = "list"', str(log)],
        env={"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    expected = sum(1 for e in read_lines(log) if e["verb"] == "list")
    assert completed.stdout == f"{expected}\n".encode()


# -- lint and convert -----------------------------------------------------------------------


def test_lint_accepts_the_examples() -> None:
    result = run("lint", EXAMPLES / "standalone", EXAMPLES / "detections")
    files = [*(EXAMPLES / "standalone").glob("*.y*ml"), *(EXAMPLES / "detections").rglob("*.y*ml")]
    resources = sum(
        1 for file in files for doc in yaml.safe_load_all(file.read_text()) if doc is not None
    )
    summary = f"{len(files)} file(s), {resources} resource(s): ok\n"
    assert (result.exit_code, result.output) == (0, summary)


def test_lint_reads_what_kubectl_kustomize_prints(tmp_path: Path) -> None:
    """kubectl kustomize prints a column rule's `operator: =` unquoted (YAML 1.1's value tag);
    kubectl reads it as the string "=", and so must lint."""
    alert = yaml.safe_load((EXAMPLES / "standalone" / "secret-read-alert.yaml").read_text())
    alert["spec"]["rule"] = {
        "type": "column",
        "config": {"column": "responseStatus_code", "operator": "=", "value": 403, "repeats": 5},
    }
    text = yaml.safe_dump(alert, sort_keys=False)
    assert "operator: '='" in text
    path = tmp_path / "kustomized.yaml"
    path.write_text(text.replace("operator: '='", "operator: ="))
    result = run("lint", path)
    assert (result.exit_code, result.output) == (0, "1 file(s), 1 resource(s): ok\n")


def test_lint_reports_a_bad_rule_by_file_and_resource(tmp_path: Path) -> None:
    alert = yaml.safe_load((EXAMPLES / "standalone" / "secret-read-alert.yaml").read_text())
    alert["spec"]["rule"]["config"] = 'verb = "get" and'
    path = tmp_path / "alert.yaml"
    path.write_text(yaml.safe_dump(alert))
    result = run("lint", tmp_path)
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith(f"{path}: AuditAlert/secret-read: ")
    assert "column" in line


PARSEABLE_ALERTS = {
    "version": "v1",
    "alerts": [
        {
            "name": "Secret read",
            "message": "secret {objectRef_name} read by {user_username}",
            "rule": {
                "type": "composite",
                "config": '(verb =% "get" or verb =% "list") and objectRef_resource = "secrets"',
            },
            "targets": [
                {
                    "type": "webhook",
                    "endpoint": "https://hooks.example.com/audit",
                    "headers": {"Authorization": "Bearer abc"},
                    "skip_tls_check": False,
                    "repeat": {"interval": "3m 20s", "times": 5},
                }
            ],
        },
        {
            "name": "many 403s",
            "message": "denied",
            "rule": {
                "type": "column",
                "config": {"column": "responseStatus_code", "operator": "=", "value": 403},
            },
            "targets": [{"type": "slack", "endpoint": "https://hooks.slack.com/services/T/B/x"}],
        },
    ],
}


def test_convert_output_lints_clean(tmp_path: Path) -> None:
    source = tmp_path / "alerts.json"
    source.write_bytes(orjson.dumps(PARSEABLE_ALERTS))
    result = run("convert", source, "--stream", "auditdemo", "--namespace", "security")
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.stdout))
    alerts = [d for d in documents if d["kind"] == "AuditAlert"]
    assert [a["spec"]["stream"] for a in alerts] == ["auditdemo", "auditdemo"]
    assert alerts[0]["spec"]["rule"]["config"] == PARSEABLE_ALERTS["alerts"][0]["rule"]["config"]  # type: ignore[index]
    assert "Bearer abc" not in yaml.safe_dump(alerts), "credentials go to a Secret"
    converted = tmp_path / "converted.yaml"
    converted.write_text(result.stdout)
    linted = run("lint", converted)
    summary = f"1 file(s), {len(documents)} resource(s): ok\n"
    assert (linted.exit_code, linted.output) == (0, summary)


def test_convert_refuses_what_is_not_a_parseable_document(tmp_path: Path) -> None:
    source = tmp_path / "alerts.json"
    source.write_text('{"alerts": 5}')
    result = run("convert", source, "--stream", "auditdemo")
    assert result.exit_code == 2
    assert str(source) in result.stderr


# -- against a running server ---------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    """The standalone example, its alert without targets (nothing to notify here)."""
    resources = tmp_path / "resources"
    shutil.copytree(EXAMPLES / "standalone", resources)
    path = resources / "secret-read-alert.yaml"
    alert = yaml.safe_load(path.read_text())
    alert["spec"]["targets"] = []
    path.write_text(yaml.safe_dump(alert))
    async with running_receiver(resources, tmp_path / "data") as running:
        yield running


async def invoke(*args: str | Path) -> Result:
    """The CLI runs its own event loop: give it a thread beside the test's."""
    return await asyncio.to_thread(run, *args)


CELL = re.compile(r"\S+(?: \S+)*")
"""A table cell: words separated by single spaces (columns are at least two apart)."""


def cells(line: str) -> list[str]:
    return CELL.findall(line)


def starts(line: str) -> list[int]:
    return [match.start() for match in CELL.finditer(line)]


def unauthorized_reads(events: list[dict[str, Any]]) -> int:
    return sum(
        1
        for e in events
        if e["verb"] in ("get", "list")
        and e["objectRef"]["resource"] == "secrets"
        and not e["user"]["username"].endswith(":authorized-user")
    )


async def test_replay_then_status(server: Running) -> None:
    result = await invoke(
        "replay", STORY, "--to", server.url, "--stream", "auditdemo", "--user", "admin:admin"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "sent 10 events in 1 batches (0 retries)\n"
    assert "10/10" in result.stderr

    status = await invoke("status", "--server", server.url)
    assert status.exit_code == 0, status.output
    header, *rows = status.stdout.splitlines()
    assert cells(header) == ["NAMESPACE", "NAME", "STREAM", "STATE", "MATCHES", "LAST MATCH", "AGE"]
    [row] = rows
    matches = str(unauthorized_reads(read_lines(STORY)))
    assert cells(row)[:5] == ["default", "secret-read", "auditdemo", "Firing", matches]
    assert all(re.fullmatch(r"\d+s", age) for age in cells(row)[5:])
    assert starts(row) == starts(header), "columns are aligned"

    streams = await invoke("status", "--server", server.url, "--streams")
    assert streams.stdout.splitlines()[1].split()[:3] == ["auditdemo", "True", "10"]


async def test_replay_gzip_is_accepted(server: Running) -> None:
    result = await invoke(
        "replay",
        STORY,
        "--to",
        server.url,
        "--stream",
        "auditdemo",
        "--user",
        "admin:admin",
        "--gzip",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "sent 10 events in 1 batches (0 retries)\n"


async def test_replay_refused_exits_1(server: Running) -> None:
    result = await invoke("replay", STORY, "--to", server.url, "--stream", "auditdemo")
    assert result.exit_code == 1
    assert "401" in result.stderr


async def test_status_without_a_server_exits_1(tmp_path: Path) -> None:
    result = await invoke("status", "--server", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "127.0.0.1:9" in result.stderr


async def test_query_by_rule_and_time(server: Running) -> None:
    story = read_lines(STORY)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    recent = synthetic_events("now", 3, stageTimestamp=now)
    for events in (story, recent):
        answer = await post_events(server, events)
        assert answer == 200
    await server.close()
    data = server.data

    lists = run("query", "--data", data, "--stream", "auditdemo", "--rule", 'verb = "list"')
    assert lists.exit_code == 0, lists.output
    assert json_lines(lists.stdout) == [e for e in story if e["verb"] == "list"]

    since = "2025-11-26T12:00:05Z"
    late = run("query", "--data", data, "--stream", "auditdemo", "--since", since)
    expected = [e for e in story if e["stageTimestamp"] >= "2025-11-26T12:00:05"] + recent
    assert json_lines(late.stdout) == expected

    last_hour = run("query", "--data", data, "--stream", "auditdemo", "--since", "1h")
    assert canonical(json_lines(last_hour.stdout)) == canonical(recent)

    bad = run("query", "--data", data, "--stream", "auditdemo", "--since", "last tuesday")
    assert bad.exit_code == 2
    assert "last tuesday" in bad.stderr


async def post_events(server: Running, events: list[dict[str, Any]]) -> int:
    async with aiohttp.ClientSession() as session:
        answer = await post(
            session,
            server.url + "/api/v1/logstream/auditdemo",
            events,
            basic_auth("admin", "admin"),
        )
    return answer.status


def test_serve_on_a_port_in_use_exits_1_with_a_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve",
            "--resources",
            EXAMPLES / "standalone",
            "--data",
            tmp_path / "data",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
    assert result.exit_code == 1
    assert not isinstance(result.exception, OSError), "a traceback, not a message"
    assert str(port) in result.stderr


def test_help_says_what_query_since_and_the_operator_namespace_are() -> None:
    """Issue #11 items 5 and 9: `query --since` bounds the event time, and `run --help` says
    where the operator's namespace comes from."""
    query_help = " ".join(run("query", "--help").output.split())
    assert "event time" in query_help and "not the time auditwatch received them" in query_help
    run_help = " ".join(run("run", "--help").output.split())
    assert "operator's namespace" in run_help and "kubeconfig's current context" in run_help


def test_tune_replays_an_alert_over_stored_events_and_suggests_the_exception(
    tmp_path: Path,
) -> None:
    """The seed story, stored; the seed alert without its exception reports both readers. The
    exception `tune` prints for the authorized one, added to the alert, leaves only the
    unauthorized reads, the rest counted as excepted."""
    from auditwatch.normalise import normalise
    from auditwatch.store import Store

    store = Store(tmp_path / "data")
    store.append("auditdemo", normalise(read_lines(STORY), received_at=datetime.now(UTC)))
    store.close()
    resources = tmp_path / "resources"
    resources.mkdir()
    shutil.copy(EXAMPLES / "standalone" / "auditdemo-stream.yaml", resources)
    alert = yaml.safe_load((EXAMPLES / "standalone" / "secret-read-alert.yaml").read_text())
    del alert["spec"]["exceptions"]
    (resources / "alert.yaml").write_text(yaml.safe_dump(alert))
    tune = ("tune", resources, "--alert", "secret-read", "--data", tmp_path / "data")

    before = run(*tune, "--since", "2025-11-26T00:00:00Z")
    assert before.exit_code == 0, before.output
    assert "6 matching event(s), 0 excepted, 6 reported, 1 firing(s)" in before.output
    authorized = "system:serviceaccount:default:authorized-user"
    assert re.search(rf"^{re.escape(authorized)} +3 +default$", before.output, re.M)
    suggestion = before.output.split(f"# silences {authorized} (3 event(s)):\n")[1]
    exception = yaml.safe_load(suggestion.split("\n\n")[0])
    assert exception == {
        "spec": {
            "exceptions": {
                "tuned-default-authorized-user": {
                    "fields": ["user.username", "objectRef.namespace"],
                    "comps": ["=", "in"],
                    "values": [[authorized, ["default"]]],
                }
            }
        }
    }

    alert["spec"]["exceptions"] = exception["spec"]["exceptions"]
    (resources / "alert.yaml").write_text(yaml.safe_dump(alert))
    after = run(*tune, "--since", "2025-11-26T00:00:00Z")
    assert after.exit_code == 0, after.output
    assert "6 matching event(s), 3 excepted, 3 reported, 1 firing(s)" in after.output
    assert authorized not in after.output

    missing = run("tune", resources, "--alert", "nope", "--data", tmp_path / "data")
    assert missing.exit_code == 2
    assert "AlertNotFound: no AuditAlert named 'nope'" in missing.output
