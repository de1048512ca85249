"""Validation against the CRD schemas, defaulting, and durations: what a user sees when a
resource is wrong."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from auditwatch.config import schema


def stream(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": "auditdemo"},
        "spec": spec,
    }


def alert(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": "secret-read", "namespace": "team-a"},
        "spec": {
            "stream": "auditdemo",
            "message": "secret {objectRef_name} was read by {user_username}",
            "rule": {"type": "composite", "config": 'verb = "get"'},
        }
        | spec,
    }


WEBHOOK = {"type": "webhook", "endpoint": "https://example.invalid/hook"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", timedelta(seconds=10)),
        ("3m 20s", timedelta(seconds=200)),
        ("1h30m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("24h", timedelta(hours=24)),
        ("500ms", timedelta(milliseconds=500)),
        ("2 minutes", timedelta(minutes=2)),
        ("1w 1d", timedelta(days=8)),
        ("0s", timedelta()),
    ],
)
def test_parse_duration_reads_parseable_and_go_spellings(text: str, expected: timedelta) -> None:
    assert schema.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "s", "1.5h", "-1s", "10x", "10s\n", "ten seconds"])
def test_parse_duration_rejects_with_an_example_of_what_works(text: str) -> None:
    with pytest.raises(schema.DurationError, match=r"is not a duration.*e\.g\. 10s, 3m 20s"):
        schema.parse_duration(text)


def test_absurdly_long_durations_are_an_error_not_a_crash() -> None:
    with pytest.raises(schema.DurationError, match="too long"):
        schema.parse_duration("99999999999999w")


def test_valid_resources_have_no_problems() -> None:
    assert schema.validate(stream()) == []
    assert schema.validate(stream(retention="7d", limits={"maxBodyBytes": 2048})) == []
    full = alert(
        targets=[
            WEBHOOK | {"headers": {"X-Team": "sec"}, "repeat": {"interval": "10s", "times": 3}},
            {"type": "slack", "endpointSecretRef": {"name": "slack", "key": "url"}},
        ],
        resolveAfter="30s",
        severity="high",
        labels={"team": "sec"},
    )
    assert schema.validate(full) == []


def test_column_rules_keep_parseables_object_config() -> None:
    column = {"column": "responseStatus_code", "operator": ">=", "value": 400, "repeats": 3}
    assert schema.validate(alert(rule={"type": "column", "config": column})) == []


def test_every_problem_is_reported_with_its_path() -> None:
    resource = alert(
        targets=[WEBHOOK | {"skipTLSCheck": True, "repeat": {"interval": "often", "times": 0}}],
        severity="urgent",
    )
    del resource["spec"]["message"]
    assert schema.validate(resource) == [
        "spec.message: required field is missing",
        "spec.severity: must be one of info, low, medium, high, critical (got 'urgent')",
        "spec.targets[0].repeat.interval: 'often' is not a duration like 10s, 3m 20s, 1h30m or 7d",
        "spec.targets[0].repeat.times: must be at least 1 (got 0)",
        "spec.targets[0].skipTLSCheck: unknown field",
    ]


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ({}, "spec.auth: set one of basic, bearer, clientCertificate, oidc"),
        (
            {"basic": {"secretRef": {"name": "a"}}, "bearer": {"secretRef": {"name": "b"}}},
            "spec.auth: set only one of basic, bearer, clientCertificate, oidc (got basic, bearer)",
        ),
    ],
)
def test_stream_auth_is_basic_bearer_client_certificate_or_oidc(
    auth: dict[str, Any], problem: str
) -> None:
    assert schema.validate(stream(auth=auth)) == [problem]


def test_a_target_has_an_inline_endpoint_or_one_from_a_secret_not_both() -> None:
    both = WEBHOOK | {"endpointSecretRef": {"name": "hook", "key": "url"}}
    assert schema.validate(alert(targets=[both])) == [
        "spec.targets[0]: set only one of endpoint, endpointSecretRef"
        " (got endpoint, endpointSecretRef)"
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"apiVersion": "auditwatch.dev/v1"}, "apiVersion: must be auditwatch.dev/v1alpha1"),
        ({"metadata": {}}, "metadata.name: required field is missing"),
        ({"metadata": {"name": "Secret_Read"}}, "metadata.name: 'Secret_Read' is not a lowercase"),
        ({"metadata": {"name": "a", "namespace": "A b"}}, "metadata.namespace: 'A b' is not"),
        ({"spec": "everything"}, "spec: must be a mapping (got 'everything')"),
    ],
)
def test_envelope_problems(change: dict[str, Any], problem: str) -> None:
    problems = schema.validate(alert() | change)
    assert any(line.startswith(problem) for line in problems), problems


def test_documents_that_are_not_auditwatch_resources() -> None:
    assert schema.validate(["a", "list"]) == ["resource: must be a mapping (got list)"]
    assert schema.validate({"kind": "AuditAlerts"}) == [
        "kind: unknown kind 'AuditAlerts' (expected AuditStream or AuditAlert)"
    ]


def test_status_written_by_the_operator_is_valid() -> None:
    resource = alert()
    resource["status"] = {
        "state": "Firing",
        "matches": 3,
        "lastMatchTime": "2025-11-26T12:00:04Z",
        "lastMatch": {"user": "u", "verb": "get", "resource": "secrets", "auditID": "x"},
        "targets": [{"name": "webhook-0", "sent": 1, "failed": 0}],
        "observedGeneration": 2,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Listening",
                "message": "",
                "lastTransitionTime": "2025-11-26T12:00:00Z",
            }
        ],
    }
    assert schema.validate(resource) == []
    resource["status"]["state"] = "Paused"
    assert schema.validate(resource) == [
        "status.state: must be one of Listening, Firing, Resolved, Invalid (got 'Paused')"
    ]


def test_apply_defaults_fills_what_the_apiserver_would() -> None:
    resource = alert(targets=[WEBHOOK, WEBHOOK | {"repeat": {"times": 1}}])
    original = copy.deepcopy(resource)
    defaulted = schema.apply_defaults(resource)
    assert resource == original, "the input is not modified"
    spec = defaulted["spec"]
    assert spec["resolveAfter"] == "5m"
    assert spec["targets"][0]["repeat"] == {"interval": "200s", "times": 5}
    assert spec["targets"][0]["skipTlsCheck"] is False
    assert spec["targets"][0]["timeout"] == "10s"
    assert spec["targets"][1]["repeat"] == {"times": 1, "interval": "200s"}
    assert "severity" not in spec and "labels" not in spec


def test_apply_defaults_on_a_stream_without_spec() -> None:
    resource = stream()
    del resource["spec"]
    assert schema.apply_defaults(resource)["spec"] == {
        "allowedAlerts": {"namespaces": {"from": "All"}, "clusterWide": {"from": "Same"}},
        "limits": {"maxBodyBytes": 10 * 1024 * 1024, "maxEventBytes": 1024 * 1024},
    }
