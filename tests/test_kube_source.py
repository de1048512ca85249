"""The Kubernetes configuration source, without kopf: resource dicts and Secrets -> engine."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from auditwatch.engine import Engine
from auditwatch.kube.api import ApiError, operator_namespace
from auditwatch.kube.source import KubeConfig, KubeSource

OPERATOR_NAMESPACE = "auditwatch"


def stream(name: str = "auditdemo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
        "spec": spec,
    }


def alert(name: str = "reads", rule: str = 'verb = "get"', **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "stream": "auditdemo",
            "message": "{verb} by {user_username}",
            "rule": {"type": "composite", "config": rule},
            **spec,
        },
    }


def secret(namespace: str, name: str, **values: str) -> dict[str, Any]:
    data = {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": namespace, "name": name},
        "data": data,
    }


HOOK_FROM_SECRET = [
    {
        "type": "webhook",
        "name": "hook",
        "endpoint": "http://127.0.0.1:9/hook",
        "headersFrom": [{"name": "Authorization", "secretRef": {"name": "hook", "key": "token"}}],
    }
]


class FakeApi:
    """Secrets as the API has them, and every fetch made."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.fetched: list[tuple[str, str]] = []
        self.reachable = True

    async def fetch(self, namespace: str, name: str) -> dict[str, Any] | None:
        if not self.reachable:
            raise ApiError(0, f"GET {namespace}/{name}: connection refused")
        self.fetched.append((namespace, name))
        return self.secrets.get((namespace, name))


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
async def engine(tmp_path: Path) -> Engine:
    return Engine(tmp_path / "data")


class Applied:
    """The engine's apply, recording every configuration handed to it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.configs: list[KubeConfig] = []

    def __call__(self, config: KubeConfig) -> None:
        self.configs.append(config)
        self.engine.apply(
            config.streams,
            config.alerts,
            config.invalid_alerts,
            config.problems,
            config.namespace_labels,
            config.created,
        )

    def alert_status(self, key: str = "team/reads") -> dict[str, Any]:
        status: dict[str, Any] = self.engine.status()["alerts"][key]
        return status


@pytest.fixture
def applied(engine: Engine) -> Applied:
    return Applied(engine)


@pytest.fixture
def source(api: FakeApi, applied: Applied) -> KubeSource:
    return KubeSource(OPERATOR_NAMESPACE, api.fetch, applied)


async def test_initial_listing_applies_streams_and_alerts_once(
    source: KubeSource, applied: Applied
) -> None:
    await source.load([stream(), alert()])
    assert len(applied.configs) == 1
    assert list(applied.configs[0].streams) == ["auditdemo"]
    assert applied.alert_status()["state"] == "Listening"
    ready, _ = applied.engine.readiness()
    assert ready


async def test_resuming_an_unchanged_resource_rebuilds_nothing(
    source: KubeSource, applied: Applied
) -> None:
    await source.load([stream(), alert()])
    resumed = alert()
    resumed["metadata"]["resourceVersion"] = "99"  # kopf's own annotation writes bump it
    resumed["status"] = {"state": "Listening"}
    await source.upsert(resumed)
    assert len(applied.configs) == 1


async def test_an_edited_rule_replaces_the_old_one(source: KubeSource, applied: Applied) -> None:
    await source.load([stream(), alert()])
    edited = alert(rule='verb = "list"')
    edited["metadata"]["generation"] = 2
    await source.upsert(edited)
    spec = applied.configs[-1].alerts["team/reads"]
    assert spec.rule_text == 'verb = "list"' and spec.generation == 2
    assert applied.alert_status()["observedGeneration"] == 2


async def test_an_invalid_rule_makes_only_that_alert_invalid_with_the_position(
    source: KubeSource, applied: Applied
) -> None:
    await source.load([stream(), alert(), alert("broken", rule='verb = "get" and')])
    status = applied.alert_status("team/broken")
    assert status["state"] == "Invalid"
    [ready] = status["conditions"]
    assert ready["status"] == "False" and ready["reason"] == "InvalidRule"
    assert "column" in ready["message"]
    assert applied.alert_status()["state"] == "Listening"

    await source.upsert(alert("broken", rule='verb = "get"'))
    assert applied.alert_status("team/broken")["state"] == "Listening"


async def test_an_alert_on_a_missing_stream_recovers_when_the_stream_appears(
    source: KubeSource, applied: Applied
) -> None:
    await source.load([alert()])
    [ready] = applied.alert_status()["conditions"]
    assert (applied.alert_status()["state"], ready["reason"]) == ("Invalid", "StreamNotFound")
    await source.upsert(stream())
    assert applied.alert_status()["state"] == "Listening"


async def test_a_missing_secret_is_read_by_name_and_followed_until_it_exists(
    source: KubeSource, applied: Applied, api: FakeApi
) -> None:
    await source.load([stream(), alert(targets=HOOK_FROM_SECRET)])
    [ready] = applied.alert_status()["conditions"]
    assert ready["reason"] == "SecretNotFound" and "'team/hook'" in ready["message"]
    assert api.fetched == [("team", "hook")]

    api.secrets[("team", "unrelated")] = secret("team", "unrelated", token="x")
    assert await source.reread_secrets() == 0
    assert api.fetched == [("team", "hook")] * 2  # only the referenced Secret, by name
    assert len(applied.configs) == 1  # nothing changed: no rebuild

    api.secrets[("team", "hook")] = secret("team", "hook", token="Bearer one\n")
    assert await source.reread_secrets() == 1
    assert applied.alert_status()["state"] == "Listening"
    [target] = applied.configs[-1].alerts["team/reads"].targets
    assert target.headers == {"Authorization": "Bearer one"}

    api.secrets[("team", "hook")] = secret("team", "hook", token="Bearer two")
    await source.reread_secrets()
    [target] = applied.configs[-1].alerts["team/reads"].targets
    assert target.headers == {"Authorization": "Bearer two"}

    del api.secrets[("team", "hook")]
    await source.reread_secrets()
    assert applied.alert_status()["state"] == "Invalid"
    assert set(api.fetched) == {("team", "hook")}


async def test_a_failed_read_keeps_the_secret_as_it_was(
    source: KubeSource, applied: Applied, api: FakeApi
) -> None:
    """The apiserver away for a moment is no deletion: the alert keeps its target."""
    api.secrets[("team", "hook")] = secret("team", "hook", token="Bearer one")
    await source.load([stream(), alert(targets=HOOK_FROM_SECRET)])
    assert applied.alert_status()["state"] == "Listening"
    api.reachable = False
    assert await source.reread_secrets() == 0
    assert applied.alert_status()["state"] == "Listening"
    assert len(applied.configs) == 1


async def test_stream_credentials_come_from_the_operator_namespace(
    source: KubeSource, applied: Applied, api: FakeApi
) -> None:
    api.secrets[(OPERATOR_NAMESPACE, "ingest")] = secret(
        OPERATOR_NAMESPACE, "ingest", username="apiserver", password="s3cret"
    )
    basic = stream(auth={"basic": {"secretRef": {"name": "ingest"}}})
    await source.load([basic, alert()])
    auth = applied.configs[-1].streams["auditdemo"].auth
    assert auth is not None and (auth.username, auth.password) == ("apiserver", "s3cret")

    del api.secrets[(OPERATOR_NAMESPACE, "ingest")]
    await source.reread_secrets()
    config = applied.configs[-1]
    assert config.invalid_streams["auditdemo"].reason == "SecretNotFound"
    assert config.problems and "SecretNotFound" in config.problems[0]
    assert applied.alert_status()["state"] == "Invalid"  # its stream cannot receive


async def test_a_deleted_alert_is_gone_with_the_next_apply(
    source: KubeSource, applied: Applied
) -> None:
    await source.load([stream(), alert(), alert("other")])
    await source.delete(alert())
    assert set(applied.configs[-1].alerts) == {"team/other"}
    assert "team/reads" not in applied.engine.status()["alerts"]


async def test_a_resource_being_deleted_counts_as_gone(
    source: KubeSource, applied: Applied
) -> None:
    await source.load([stream(), alert()])
    deleting = alert()
    deleting["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    await source.upsert(deleting)
    assert applied.configs[-1].alerts == {}


async def test_a_spec_the_schema_rejects_is_invalid_spec(
    source: KubeSource, applied: Applied
) -> None:
    bad = alert()
    bad["spec"]["severity"] = "apocalyptic"
    await source.load([stream(), bad])
    [ready] = applied.alert_status()["conditions"]
    assert ready["reason"] == "InvalidSpec" and "severity" in ready["message"]


async def test_a_stream_secret_message_names_the_namespace_and_tells_secret_from_key(
    source: KubeSource, applied: Applied, api: FakeApi
) -> None:
    """Issue #11 item 5: the operator's namespace named, and a missing Secret told apart from
    a missing key."""
    basic = stream(auth={"basic": {"secretRef": {"name": "ingest"}}})
    await source.load([basic])
    error = applied.configs[-1].invalid_streams["auditdemo"]
    assert error.reason == "SecretNotFound"
    assert f"Secret '{OPERATOR_NAMESPACE}/ingest' does not exist" in error.message
    assert "operator's namespace" in error.message

    api.secrets[(OPERATOR_NAMESPACE, "ingest")] = secret(OPERATOR_NAMESPACE, "ingest", username="u")
    await source.reread_secrets()
    error = applied.configs[-1].invalid_streams["auditdemo"]
    assert f"Secret '{OPERATOR_NAMESPACE}/ingest' exists but has no key 'password'" in (
        error.message
    )


def test_the_operator_namespace_comes_from_namespace_then_the_kubeconfig_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #11 item 5: run from a laptop without $AUDITWATCH_NAMESPACE, the operator's
    namespace is the first --namespace, else the kubeconfig context's, not `default`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ops"}}],
        "current-context": "x",
    }
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("AUDITWATCH_NAMESPACE", raising=False)
    assert operator_namespace([])[0] == "ops"
    assert operator_namespace(["auditwatch", "team-a"])[0] == "auditwatch"
    monkeypatch.setenv("AUDITWATCH_NAMESPACE", "set")
    assert operator_namespace(["auditwatch"]) == ("set", "$AUDITWATCH_NAMESPACE")


async def test_status_age_is_the_resource_age_not_the_process_uptime(
    source: KubeSource, applied: Applied
) -> None:
    """Issue #11 item 9: `auditwatch status` AGE comes from metadata.creationTimestamp."""
    old = alert()
    old["metadata"]["creationTimestamp"] = "2024-03-01T12:00:00Z"
    await source.load([stream(), old])
    assert applied.alert_status()["since"] == "2024-03-01T12:00:00Z"
    assert applied.engine.status()["streams"]["auditdemo"]["since"] != "2024-03-01T12:00:00Z"
