"""The standalone resources directory: real files in tmp_path, as `auditwatch serve` reads them."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from auditwatch.config.files import ConfigSet, DirectorySource, ResourceError, load_directory
from auditwatch.rules.reference import matches

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "standalone"

STREAM = """\
apiVersion: auditwatch.dev/v1alpha1
kind: AuditStream
metadata:
  name: auditdemo
spec:
  auth:
    basic:
      secretRef: {name: ingest}
"""
SECRET = f"""\
apiVersion: v1
kind: Secret
metadata:
  name: ingest
data:
  username: {base64.b64encode(b"admin").decode()}
  password: {base64.b64encode(b"from-data").decode()}
stringData:
  password: from-stringData
"""


def alert_yaml(name: str = "secret-read", message: str = "read by {user_username}") -> str:
    return f"""\
apiVersion: auditwatch.dev/v1alpha1
kind: AuditAlert
metadata:
  name: {name}
spec:
  stream: auditdemo
  message: "{message}"
  rule:
    type: composite
    config: 'verb = "get" and objectRef_resource = "secrets"'
  targets:
    - type: webhook
      endpoint: http://127.0.0.1:9099/hook
"""


def write(path: Path, text: str) -> None:
    """Write as editors and `kubectl cp` do: a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_streams_alerts_and_secrets_from_multi_document_files(tmp_path: Path) -> None:
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    write(tmp_path / "alerts" / "secret-read.yml", alert_yaml())
    config = load_directory(tmp_path)
    assert config.errors == [] and config.invalid_alerts == {}
    auth = config.streams["auditdemo"].auth
    assert auth is not None and (auth.username, auth.password) == ("admin", "from-stringData")
    assert list(config.alerts) == ["default/secret-read"]
    assert config.alerts["default/secret-read"].message == "read by {user_username}"


def test_hidden_entries_are_skipped_so_configmap_mounts_count_once(tmp_path: Path) -> None:
    """A mounted ConfigMap holds `..data/` and `..2025_11_26.../` copies of every file."""
    write(tmp_path / "..2025_11_26_12_00_00.1" / "stream.yaml", STREAM + "---\n" + SECRET)
    (tmp_path / "..data").symlink_to(tmp_path / "..2025_11_26_12_00_00.1")
    (tmp_path / "stream.yaml").symlink_to(tmp_path / "..data" / "stream.yaml")
    write(tmp_path / "notes.txt", "not yaml: [")
    config = load_directory(tmp_path)
    assert config.errors == []
    assert list(config.streams) == ["auditdemo"]


def test_alert_of_an_unknown_stream_is_invalid(tmp_path: Path) -> None:
    write(tmp_path / "alert.yaml", alert_yaml())
    config = load_directory(tmp_path)
    assert config.alerts == {}
    invalid = config.invalid_alerts["default/secret-read"]
    assert (invalid.reason, invalid.stream) == ("StreamNotFound", "auditdemo")
    [problem] = config.errors
    assert (problem.reason, problem.resource) == ("StreamNotFound", "AuditAlert/secret-read")


def test_alert_of_an_unusable_stream_is_invalid_too(tmp_path: Path) -> None:
    write(tmp_path / "stream.yaml", STREAM)  # its Secret is missing
    write(tmp_path / "alert.yaml", alert_yaml())
    config = load_directory(tmp_path)
    assert [error.reason for error in config.errors] == ["SecretNotFound", "StreamNotFound"]
    assert config.invalid_alerts["default/secret-read"].reason == "StreamNotFound"


def test_bad_rule_makes_only_that_alert_invalid(tmp_path: Path) -> None:
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    broken = alert_yaml("broken").replace('verb = "get"', 'verb = "get" or or')
    write(tmp_path / "alerts.yaml", f"{alert_yaml()}---\n{broken}")
    config = load_directory(tmp_path)
    assert list(config.alerts) == ["default/secret-read"]
    assert config.invalid_alerts["default/broken"].reason == "InvalidRule"
    [problem] = config.errors
    assert problem.reason == "InvalidRule"
    assert str(problem).startswith(
        f"{tmp_path / 'alerts.yaml'}: AuditAlert/broken: spec.rule.config"
    )


def test_broken_yaml_without_a_previous_version_is_reported_with_its_line(tmp_path: Path) -> None:
    write(tmp_path / "stream.yaml", "apiVersion: v1\nkind: [AuditStream\n")
    config = load_directory(tmp_path)
    [error] = config.errors
    assert (error.reason, error.resource) == ("InvalidYAML", "")
    assert "line 3, column 1" in error.message
    assert config.streams == {}


def test_duplicate_keys_are_errors_and_timestamps_stay_text(tmp_path: Path) -> None:
    status = "status:\n  state: Firing\n  lastMatchTime: 2025-11-26T12:00:04Z\n"
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    write(tmp_path / "ok.yaml", alert_yaml() + status)
    write(tmp_path / "twice.yaml", alert_yaml("twice") + "  stream: other\n")
    config = load_directory(tmp_path)
    assert list(config.alerts) == ["default/secret-read"]
    [error] = config.errors
    assert error.file.name == "twice.yaml"
    assert error.message == "line 14, column 3: duplicate key 'stream'"


def test_the_same_resource_twice_first_file_wins(tmp_path: Path) -> None:
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    write(tmp_path / "a.yaml", alert_yaml(message="first"))
    write(tmp_path / "b.yaml", alert_yaml(message="second"))
    config = load_directory(tmp_path)
    assert config.alerts["default/secret-read"].message == "first"
    [error] = config.errors
    assert (error.file.name, error.reason) == ("b.yaml", "Duplicate")


def test_kinds(tmp_path: Path) -> None:
    kustomization = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    typo = "apiVersion: auditwatch.dev/v1alpha1\nkind: AuditAlerts\nmetadata: {name: x}\n"
    write(tmp_path / "kustomization.yaml", kustomization)
    write(tmp_path / "values.yaml", "replicaCount: 2\n")
    write(tmp_path / "typo.yaml", f"{typo}---\njust a string\n---\nkind: AuditStream\n")
    errors = load_directory(tmp_path).errors
    assert [(error.resource, error.reason) for error in errors] == [
        ("AuditAlerts/x", "UnknownKind"),
        ("document 2", "InvalidSpec"),
        ("AuditStream (document 3)", "InvalidSpec"),
    ]
    assert "unknown kind 'AuditAlerts'" in errors[0].message


def test_malformed_secrets(tmp_path: Path) -> None:
    write(
        tmp_path / "secrets.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: [a, b]\n"
        "---\napiVersion: v1\nkind: Secret\nstringData: {a: b}\n",
    )
    assert [(error.resource, error.message) for error in load_directory(tmp_path).errors] == [
        ("Secret/s", "data and stringData must be mappings of keys to values"),
        ("Secret (document 2)", "metadata.name: required field is missing"),
    ]


def test_secret_data_that_is_not_base64(tmp_path: Path) -> None:
    write(
        tmp_path / "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: '%%'}\n",
    )
    [error] = load_directory(tmp_path).errors
    assert (error.reason, error.message) == ("InvalidSecret", "data.a: not base64 of UTF-8 text")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a directory"):
        load_directory(tmp_path / "nope")


def test_reload_keeps_the_last_good_version_of_a_broken_file(tmp_path: Path) -> None:
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    write(tmp_path / "alert.yaml", alert_yaml(message="v1"))
    source = DirectorySource(tmp_path)
    assert source.reload().alerts["default/secret-read"].message == "v1"

    write(tmp_path / "alert.yaml", alert_yaml(message="v2")[:-30] + "  bad: [\n")
    broken = source.reload()
    assert broken.alerts["default/secret-read"].message == "v1"
    [error] = broken.errors
    assert error.reason == "InvalidYAML" and "stay in force" in error.message

    write(tmp_path / "alert.yaml", alert_yaml(message="v3"))
    assert source.reload().alerts["default/secret-read"].message == "v3"
    (tmp_path / "alert.yaml").unlink()
    assert source.reload().alerts == {}


def test_an_invalid_resource_is_not_kept_from_before(tmp_path: Path) -> None:
    """Only unparseable files keep their past; a valid file with a bad rule means Invalid."""
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    write(tmp_path / "alert.yaml", alert_yaml())
    source = DirectorySource(tmp_path)
    source.reload()
    write(tmp_path / "alert.yaml", alert_yaml().replace('"get"', '"get'))
    config = source.reload()
    assert config.alerts == {}
    assert config.invalid_alerts["default/secret-read"].reason == "InvalidRule"


async def next_config(
    configs: AsyncIterator[ConfigSet], condition: Callable[[ConfigSet], bool]
) -> ConfigSet:
    """The first ConfigSet the watch yields that satisfies `condition` (fails after 10 s)."""
    async with asyncio.timeout(10):
        async for config in configs:
            if condition(config):
                return config
    raise AssertionError("the watch ended")


def message_of(config: ConfigSet) -> str | None:
    alert = config.alerts.get("default/secret-read")
    return None if alert is None else alert.message


async def test_watch_follows_added_changed_broken_fixed_and_deleted_files(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path)
    configs = source.watch(debounce_ms=50, poll_interval_ms=300)
    try:
        first = await next_config(configs, lambda config: True)
        assert (first.streams, first.alerts) == ({}, {})

        write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
        write(tmp_path / "alerts" / "alert.yaml", alert_yaml(message="added"))
        await next_config(configs, lambda config: message_of(config) == "added")

        write(tmp_path / "alerts" / "alert.yaml", alert_yaml(message="changed"))
        await next_config(configs, lambda config: message_of(config) == "changed")

        write(tmp_path / "alerts" / "alert.yaml", "kind: [\n")
        broken = await next_config(configs, lambda config: bool(config.errors))
        assert message_of(broken) == "changed"
        assert [error.reason for error in broken.errors] == ["InvalidYAML"]

        write(tmp_path / "alerts" / "alert.yaml", alert_yaml(message="fixed"))
        fixed = await next_config(configs, lambda config: message_of(config) == "fixed")
        assert fixed.errors == []

        (tmp_path / "alerts" / "alert.yaml").unlink()
        deleted = await next_config(configs, lambda config: not config.alerts)
        assert list(deleted.streams) == ["auditdemo"]
    finally:
        await configs.aclose()


def test_standalone_examples_validate_and_build() -> None:
    config = load_directory(EXAMPLES)
    assert config.errors == []
    auth = config.streams["auditdemo"].auth
    assert auth is not None and auth.username is not None and auth.password is not None
    alert = config.alerts["default/secret-read"]
    assert alert.stream == "auditdemo"
    [target] = alert.targets
    assert (target.endpoint, target.repeat.times) == ("http://127.0.0.1:9099/hook", 5)


def test_the_example_alert_catches_exactly_the_unauthorized_secret_reads() -> None:
    alert = load_directory(EXAMPLES).alerts["default/secret-read"]
    events = [json.loads(line) for line in (EXAMPLES / "seed-story.log").read_text().splitlines()]
    assert alert.unless is not None, "who may read is an exception, not rule text"
    caught = [
        event
        for event in events
        if matches(alert.rule.condition, event) and not matches(alert.unless, event)
    ]
    assert caught, "the story has unauthorized reads"
    for event in events:
        unauthorized_read = (
            event["verb"] in ("get", "list")
            and event["objectRef"]["resource"] == "secrets"
            and event["user"]["username"] != "system:serviceaccount:default:authorized-user"
        )
        assert (event in caught) == unauthorized_read, event["auditID"]
    assert {event["user"]["username"] for event in caught} == {
        "system:serviceaccount:default:unauthorized-user"
    }


def test_resource_error_reads_as_file_resource_problem(tmp_path: Path) -> None:
    error = ResourceError(tmp_path / "a.yaml", "AuditAlert/x", "InvalidRule", "spec.rule.config: x")
    assert str(error) == f"{tmp_path / 'a.yaml'}: AuditAlert/x: spec.rule.config: x"
    whole_file = ResourceError(tmp_path / "a.yaml", "", "InvalidYAML", "line 1, column 2: bad")
    assert str(whole_file) == f"{tmp_path / 'a.yaml'}: line 1, column 2: bad"


def test_namespace_documents_label_namespaces_for_a_streams_grant(tmp_path: Path) -> None:
    """Standalone mode applies the same grant: alerts outside it are Invalid, the others see
    their own namespace or, where a Namespace document's labels say so, the whole stream."""
    granting = STREAM.replace(
        "spec:\n",
        "spec:\n"
        "  allowedAlerts:\n"
        "    namespaces: {from: Selector, selector: {matchLabels: {tenant: 'yes'}}}\n"
        "    clusterWide:\n"
        "      from: Selector\n"
        "      selector: {matchExpressions: [{key: tier, operator: In, values: [platform]}]}\n",
    )
    namespaces = "".join(
        f"---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {labels}\n"
        for name, labels in (
            ("team-a", "{tenant: 'yes'}"),
            ("sec", "{tenant: 'yes', tier: platform}"),
            ("other", "{}"),
        )
    )
    write(tmp_path / "stream.yaml", f"{granting}---\n{SECRET}{namespaces}")
    for namespace in ("team-a", "sec", "other"):
        document = alert_yaml().replace("metadata:\n", f"metadata:\n  namespace: {namespace}\n")
        write(tmp_path / f"{namespace}.yaml", document)
    config = load_directory(tmp_path)
    assert config.alerts["team-a/secret-read"].scope == "team-a"
    assert config.alerts["sec/secret-read"].scope is None
    assert config.invalid_alerts["other/secret-read"].reason == "StreamNotGranted"
    [error] = config.errors
    assert "namespace 'other'" in str(error)


def test_reload_reads_again_only_what_changed(tmp_path: Path) -> None:
    """Thousands of alert files are polled every few seconds: unchanged ones are neither read
    nor assembled again, and a change to one of them is still picked up."""
    write(tmp_path / "stream.yaml", f"{STREAM}---\n{SECRET}")
    write(tmp_path / "alert.yaml", alert_yaml(message="v1"))
    settled = time.time() - 60
    for path in tmp_path.iterdir():
        os.utime(path, (settled, settled))
    source = DirectorySource(tmp_path)
    first = source.reload()
    assert source.reload() is first

    write(tmp_path / "alert.yaml", alert_yaml(message="v2"))
    assert source.reload().alerts["default/secret-read"].message == "v2"
