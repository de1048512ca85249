"""`auditwatch convert`: Parseable alerts documents become AuditAlerts that mean the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from auditwatch.config import schema
from auditwatch.config.files import load_directory
from auditwatch.convert import ConvertError, convert, convert_alerts

SECRET_READ_RULE = (
    '(verb =% "list" or verb =% "get") and '
    '(objectRef_resource = "secrets" and user_username !% "authorized-user")'
)

PARSEABLE = {
    "version": "v1",
    "alerts": [
        {
            "name": "Unauthorized secret access",
            "message": "secret {objectRef_name} was read by {user_username}",
            "rule": {"type": "composite", "config": SECRET_READ_RULE},
            "targets": [
                {
                    "type": "webhook",
                    "endpoint": "https://hooks.example.invalid/audit",
                    "headers": {"Authorization": "Bearer s3cr3t", "X-Team": "security"},
                    "skip_tls_check": False,
                    "repeat": {"interval": "3m 20s", "times": 5},
                },
                {"type": "slack", "endpoint": "https://hooks.slack.com/services/T0/B0/XYZ"},
                {
                    "type": "alertmanager",
                    "endpoint": "https://alertmanager.example.invalid",
                    "skip_tls_check": True,
                    "username": "admin",
                    "password": "am-password",
                    "repeat": {"interval": "10s", "times": 3},
                },
            ],
        },
        {
            "name": "Forbidden burst",
            "message": "{user_username} was refused {verb} on {objectRef_resource}",
            "rule": {
                "type": "column",
                "config": {
                    "column": "responseStatus_code",
                    "operator": "=",
                    "value": 403,
                    "repeats": 5,
                },
            },
            "targets": [{"type": "webhook", "endpoint": "http://10.0.0.5:8080/alerts"}],
        },
    ],
}


def documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def test_output_is_valid_and_means_what_parseable_did(tmp_path: Path) -> None:
    """Converted alerts, their Secret and a stream load as a working configuration whose
    targets hold exactly the Parseable document's endpoints and credentials."""
    text = convert(PARSEABLE, stream="auditdemo", namespace="security")
    stream = {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": "auditdemo"},
    }
    (tmp_path / "alerts.yaml").write_text(text)
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    config = load_directory(tmp_path)
    assert config.errors == []
    first = config.alerts["security/unauthorized-secret-access"]
    assert first.rule_text == SECRET_READ_RULE
    webhook, slack, alertmanager = first.targets
    assert webhook.endpoint == "https://hooks.example.invalid/audit"
    assert webhook.headers == {"X-Team": "security", "Authorization": "Bearer s3cr3t"}
    assert webhook.repeat.interval.total_seconds() == 200
    assert slack.endpoint == "https://hooks.slack.com/services/T0/B0/XYZ"
    assert (alertmanager.username, alertmanager.password) == ("admin", "am-password")
    assert (alertmanager.skip_tls_check, alertmanager.repeat.times) == (True, 3)
    burst = config.alerts["security/forbidden-burst"]
    assert (burst.rule_type, burst.rule.repeats) == ("column", 5)


def test_credentials_move_to_a_secret_and_are_referenced() -> None:
    secret, alert, other = documents(convert(PARSEABLE, stream="auditdemo", namespace=None))
    assert (secret["kind"], secret["metadata"]) == (
        "Secret",
        {"name": "unauthorized-secret-access-credentials"},
    )
    assert set(secret["stringData"].values()) == {
        "Bearer s3cr3t",
        "https://hooks.slack.com/services/T0/B0/XYZ",
        "am-password",
    }
    alert_text = yaml.safe_dump(alert)
    for value in secret["stringData"].values():
        assert value not in alert_text
    webhook, slack, alertmanager = alert["spec"]["targets"]
    assert webhook["headers"] == {"X-Team": "security"}
    assert webhook["headersFrom"][0]["name"] == "Authorization"
    assert webhook["skipTlsCheck"] is False
    assert (
        "endpoint" not in slack and slack["endpointSecretRef"]["name"] == secret["metadata"]["name"]
    )
    assert alertmanager["username"] == "admin" and "passwordSecretRef" in alertmanager
    assert "password" not in alertmanager
    assert other["kind"] == "AuditAlert" and "namespace" not in other["metadata"]


def test_names_become_kubernetes_names_and_the_original_is_kept() -> None:
    doc = {
        "version": "v1",
        "alerts": [
            {"name": name, "message": "m", "rule": {"type": "composite", "config": 'verb = "get"'}}
            for name in ["Secret READ!!", "secret read", "", "ok-name"]
        ],
    }
    alerts = documents(convert(doc, stream="auditdemo", namespace=None))
    names = [alert["metadata"]["name"] for alert in alerts]
    assert names == ["secret-read", "secret-read-2", "alert-3", "ok-name"]
    assert alerts[0]["metadata"]["annotations"] == {
        "auditwatch.dev/parseable-name": "Secret READ!!"
    }
    assert "annotations" not in alerts[3]["metadata"]
    assert all(schema.validate(alert) == [] for alert in alerts)


def test_snake_case_ignore_case_is_carried_over_with_a_warning() -> None:
    config = {"column": "user_username", "operator": "=%", "value": "Admin", "ignore_case": True}
    doc = {
        "version": "v1",
        "alerts": [
            {"name": "admins", "message": "m", "rule": {"type": "column", "config": config}}
        ],
    }
    conversion = convert_alerts(doc, stream="auditdemo")
    [alert] = conversion.documents
    assert alert["spec"]["rule"]["config"]["ignoreCase"] is True
    assert "ignore_case" not in alert["spec"]["rule"]["config"]
    [warning] = conversion.warnings
    assert "Parseable ignored it" in warning and "case-insensitive" in warning
    assert f"# warning: {warning}\n" in conversion.yaml()


def test_things_that_cannot_be_carried_over_are_warned_about() -> None:
    doc = {
        "version": "v1",
        "alerts": [
            {
                "name": "a",
                "message": "m",
                "rule": {"type": "composite", "config": 'verb = "get" and'},
                "targets": [
                    {
                        "type": "slack",
                        "endpoint": "https://hooks.slack.com/x",
                        "skip_tls_check": True,
                        "repeat": {"interval": "every so often"},
                    }
                ],
                "enabled": True,
            }
        ],
    }
    warnings = convert_alerts(doc, stream="auditdemo").warnings
    assert len(warnings) == 4
    assert any(w.startswith("alerts[0].rule: does not parse") and "column" in w for w in warnings)
    assert any("alerts[0].targets[0].skip_tls_check: dropped" in w for w in warnings)
    assert any("alerts[0].targets[0].repeat.interval: 'every so often'" in w for w in warnings)
    assert any("alerts[0].enabled: not carried over" in w for w in warnings)


def test_json_text_is_accepted() -> None:
    text = json.dumps(PARSEABLE, indent=2)
    assert convert(text, stream="auditdemo", namespace="x") == convert(
        PARSEABLE, stream="auditdemo", namespace="x"
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ('{"version": "v1", "alerts": [', "not JSON: .* line 1, column 30"),
        ({"version": "v2", "alerts": []}, "version 'v2' is not supported"),
        ({"alerts": {"a": 1}}, "not a Parseable alerts document"),
        (
            {"alerts": [{"name": "a", "message": "m", "rule": {"type": "regex", "config": "x"}}]},
            r"alerts\[0\]\.rule: expected",
        ),
        ({"alerts": [{"name": "a", "rule": {"type": "composite", "config": "x"}}]}, "message"),
        (
            {
                "alerts": [
                    {
                        "name": "a",
                        "message": "m",
                        "rule": {"type": "composite", "config": "x"},
                        "targets": [{"type": "email", "endpoint": "x"}],
                    }
                ]
            },
            r"alerts\[0\]\.targets\[0\]\.type: 'email'",
        ),
        (
            {
                "alerts": [
                    {
                        "name": "a",
                        "message": "m",
                        "rule": {"type": "composite", "config": "x"},
                        "targets": [{"type": "webhook", "endpoint": "x", "headers": ["A: b"]}],
                    }
                ]
            },
            r"alerts\[0\]\.targets\[0\]\.headers: not an object",
        ),
    ],
)
def test_unusable_input_is_a_clear_error(doc: Any, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        convert(doc, stream="auditdemo", namespace=None)


def test_bad_stream_or_namespace_names() -> None:
    with pytest.raises(ConvertError, match="stream 'Audit Demo'"):
        convert(PARSEABLE, stream="Audit Demo", namespace=None)
    with pytest.raises(ConvertError, match="namespace 'Sec'"):
        convert(PARSEABLE, stream="auditdemo", namespace="Sec")
