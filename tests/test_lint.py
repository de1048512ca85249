"""`auditwatch lint`: `file: Kind/name: problem` lines for a GitOps pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from auditwatch.config.build import build_alert
from auditwatch.config.model import ConfigError
from auditwatch.lint import lint

REPO = Path(__file__).resolve().parents[1]

ALERT = """\
apiVersion: auditwatch.dev/v1alpha1
kind: AuditAlert
metadata:
  name: secret-read
  namespace: security
spec:
  stream: auditdemo
  message: "secret {objectRef_name} was read by {user_username}"
  rule:
    type: composite
    config: RULE
  targets:
    - type: slack
      endpointSecretRef: {name: slack, key: url}
"""
GOOD_RULE = """'verb = "get" and objectRef_resource = "secrets"'"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_examples_are_clean() -> None:
    assert lint([REPO / "examples" / "standalone"]) == []


def test_a_good_alert_passes_without_its_secrets(tmp_path: Path) -> None:
    """Secrets are rarely in the repository; references to them are not resolved."""
    assert lint([write(tmp_path / "a.yaml", ALERT.replace("RULE", GOOD_RULE))]) == []


def test_every_schema_problem_gets_a_line(tmp_path: Path) -> None:
    text = ALERT.replace("RULE", GOOD_RULE).replace("type: slack", "type: email")
    text += "  resolveAfter: a while\n  skipTlsCheck: true\n"
    path = write(tmp_path / "a.yaml", text)
    assert lint([path]) == [
        f"{path}: AuditAlert/security/secret-read: spec.resolveAfter: 'a while' is not a duration"
        " like 10s, 3m 20s, 1h30m or 7d",
        f"{path}: AuditAlert/security/secret-read: spec.skipTlsCheck: unknown field",
        f"{path}: AuditAlert/security/secret-read: spec.targets[0].type: must be one of webhook,"
        " slack, alertmanager (got 'email')",
    ]


def test_rule_errors_carry_the_position(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", ALERT.replace("RULE", """'verb = "get" and'"""))
    [line] = lint([path])
    assert re.fullmatch(
        rf"{re.escape(str(path))}: AuditAlert/security/secret-read: spec\.rule\.config: "
        r".* at line 1, column \d+",
        line,
    ), line


def test_lint_reports_a_rule_error_where_the_operator_does(tmp_path: Path) -> None:
    """The column lint prints is the one the alert's Invalid condition shows."""
    text = ALERT.replace("RULE", """'verb = "get" and and objectRef.resource = "secrets"'""")
    path = write(tmp_path / "a.yaml", text)
    [line] = lint([path])
    with pytest.raises(ConfigError) as caught:
        build_alert(yaml.safe_load(text), lambda *_: "https://hooks.example/x")
    assert "column 22" in caught.value.message
    assert line.endswith(caught.value.message), (line, caught.value.message)


def test_field_combinations_the_schema_cannot_express(tmp_path: Path) -> None:
    text = ALERT.replace("RULE", GOOD_RULE) + "      headers: {X-Team: sec}\n"
    [line] = lint([write(tmp_path / "a.yaml", text)])
    assert line.endswith("spec.targets[0].headers: not used by slack targets")


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", "kind: AuditAlert\nmetadata: {name: x\n")
    [line] = lint([path])
    assert line.startswith(f"{path}: line 3, column 1: ")


def test_kinds(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.yaml",
        "apiVersion: auditwatch.dev/v1alpha1\nkind: AuditAlerts\nmetadata: {name: x}\n"
        "---\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
        "---\nreplicaCount: 2  # Helm values\n"
        "---\n- a list\n",
    )
    assert lint([path]) == [
        f"{path}: AuditAlerts/x: unknown kind 'AuditAlerts' (expected AuditStream or AuditAlert)",
        f"{path}: document 5: not a mapping",
    ]


def test_directories_recurse_and_missing_paths_are_reported(tmp_path: Path) -> None:
    write(tmp_path / "team" / "deep" / "bad.yml", "kind: AuditStream\napiVersion: x/v1\n")
    write(tmp_path / "team" / "README.md", "kind: [")
    lines = lint([tmp_path, tmp_path / "missing.yaml"])
    assert lines == [
        f"{tmp_path / 'team/deep/bad.yml'}: AuditStream (document 1): "
        "apiVersion: must be auditwatch.dev/v1alpha1 (got 'x/v1')",
        f"{tmp_path / 'team/deep/bad.yml'}: AuditStream (document 1): "
        "metadata.name: required field is missing",
        f"{tmp_path / 'missing.yaml'}: no such file or directory",
    ]
