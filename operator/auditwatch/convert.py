"""`auditwatch convert`: a Parseable alerts document -> AuditAlert YAML (and Secrets).

Parseable (v0.6.2 to v0.9) keeps a stream's alerts as `{"version": "v1", "alerts": [...]}` with
snake_case target fields and credentials written inline. The conversion spells fields the
Kubernetes way (`ignore_case` becomes `ignoreCase`), and moves every credential (a
Slack URL, an Alertmanager password, an Authorization-like header) into a Secret next to the
alert, referenced instead of inlined. Whatever cannot be carried over unchanged is said in a
warning, written as a comment above the document it concerns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from auditwatch.config import schema
from auditwatch.rules.errors import RuleError
from auditwatch.rules.parse import parse_rule

_SENSITIVE_HEADER = re.compile(r"auth|token|secret|key|password|cookie|signature", re.IGNORECASE)
"""Header names whose values are credentials and so go into a Secret."""

_COLUMN_KEYS = frozenset({"column", "operator", "value", "repeats"})
_TARGET_KEYS = {
    "webhook": frozenset({"type", "endpoint", "headers", "skip_tls_check", "repeat"}),
    "slack": frozenset({"type", "endpoint", "repeat"}),
    "alertmanager": frozenset(
        {"type", "endpoint", "skip_tls_check", "username", "password", "repeat"}
    ),
}
"""Parseable's fields of each target type."""


class ConvertError(ValueError):
    """A document that is not a Parseable alerts document; the message says where."""


@dataclass
class Conversion:
    """The converted documents (each Secret before the alert using it), and the warnings."""

    documents: list[dict[str, Any]] = field(default_factory=list)
    document_warnings: list[list[str]] = field(default_factory=list)
    """Per document: what the reader should know about it."""

    @property
    def warnings(self) -> list[str]:
        """Every warning, in document order."""
        return [warning for warnings in self.document_warnings for warning in warnings]

    def yaml(self) -> str:
        """Multi-document YAML, each document preceded by its warnings as comments."""
        parts = []
        for document, warnings in zip(self.documents, self.document_warnings, strict=True):
            comments = "".join(f"# warning: {warning}\n" for warning in warnings)
            if document["kind"] == "Secret":
                comments += (
                    "# Credentials copied from the Parseable document: keep this Secret out of\n"
                    "# version control (or replace it with a SealedSecret or an ExternalSecret).\n"
                )
            body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=4096)
            parts.append(comments + body)
        return "---\n".join(parts)


def convert(doc: dict[str, Any] | str, *, stream: str, namespace: str | None = None) -> str:
    """AuditAlert YAML (with Secrets for credentials) for a Parseable alerts document."""
    return convert_alerts(doc, stream=stream, namespace=namespace).yaml()


def convert_alerts(
    doc: dict[str, Any] | str, *, stream: str, namespace: str | None = None
) -> Conversion:
    """The documents and warnings `convert` writes out; ConvertError for unusable input."""
    if not re.fullmatch(schema.DNS_SUBDOMAIN, stream):
        raise ConvertError(
            f"stream {stream!r} is not {schema.PATTERN_MEANINGS[schema.DNS_SUBDOMAIN]}"
        )
    if namespace is not None and not re.fullmatch(schema.DNS_LABEL, namespace):
        raise ConvertError(f"namespace {namespace!r} is not a namespace name")
    document = _loaded(doc) if isinstance(doc, str) else doc
    if not isinstance(document, dict) or not isinstance(document.get("alerts"), list):
        raise ConvertError(
            'not a Parseable alerts document: expected {"version": "v1", "alerts": [...]}'
        )
    if document.get("version", "v1") != "v1":
        raise ConvertError(f"version {document['version']!r} is not supported (only v1)")
    conversion = Conversion()
    names: set[str] = set()
    for index, alert in enumerate(document["alerts"]):
        if not isinstance(alert, dict):
            raise ConvertError(f"alerts[{index}]: not an object")
        name = _unique(_dns_label(str(alert.get("name", "")), index), names)
        _AlertConversion(alert, index, name, stream, namespace).add_to(conversion)
    return conversion


def _loaded(text: str) -> Any:
    """The document from JSON (Parseable's format), or from YAML of the same shape."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConvertError(
                f"not JSON: {json_error.msg} at line {json_error.lineno}, column {json_error.colno}"
            ) from None


def _dns_label(text: str, index: int) -> str:
    """Parseable's free-form alert name as a Kubernetes name."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    return label or f"alert-{index + 1}"


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        suffix = f"-{number}"
        candidate, number = name[: 63 - len(suffix)] + suffix, number + 1
    taken.add(candidate)
    return candidate


class _AlertConversion:
    """One Parseable alert: the AuditAlert, the Secret its credentials need, the warnings."""

    def __init__(
        self, alert: dict[str, Any], index: int, name: str, stream: str, namespace: str | None
    ) -> None:
        self.alert = alert
        self.where = f"alerts[{index}]"
        self.name = name
        self.stream = stream
        self.namespace = namespace
        self.secret_name = f"{name}-credentials"
        self.secret_values: dict[str, str] = {}
        self.warnings: list[str] = []

    def add_to(self, conversion: Conversion) -> None:
        metadata: dict[str, Any] = {"name": self.name}
        if self.namespace is not None:
            metadata["namespace"] = self.namespace
        original_name = self.alert.get("name")
        if original_name != self.name:
            metadata["annotations"] = {"auditwatch.dev/parseable-name": str(original_name)}
        message = self.alert.get("message")
        if not isinstance(message, str) or not message:
            raise ConvertError(f"{self.where}.message: missing")
        spec: dict[str, Any] = {"stream": self.stream, "message": message, "rule": self._rule()}
        targets = self.alert.get("targets", [])
        if not isinstance(targets, list):
            raise ConvertError(f"{self.where}.targets: not a list")
        if targets:
            spec["targets"] = [self._target(target, i) for i, target in enumerate(targets)]
        for key in sorted(set(self.alert) - {"name", "message", "rule", "targets"}):
            self.warnings.append(f"{self.where}.{key}: not carried over (no AuditAlert field)")
        if self.secret_values:
            secret_metadata = {**metadata, "name": self.secret_name}
            secret_metadata.pop("annotations", None)
            conversion.documents.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": secret_metadata,
                    "type": "Opaque",
                    "stringData": self.secret_values,
                }
            )
            conversion.document_warnings.append([])
        conversion.documents.append(
            {
                "apiVersion": schema.API_VERSION,
                "kind": "AuditAlert",
                "metadata": metadata,
                "spec": spec,
            }
        )
        conversion.document_warnings.append(self.warnings)

    def _rule(self) -> dict[str, Any]:
        rule = self.alert.get("rule")
        where = f"{self.where}.rule"
        if not isinstance(rule, dict) or rule.get("type") not in ("composite", "column"):
            raise ConvertError(f"{where}: expected {{type: composite | column, config: ...}}")
        config = rule.get("config")
        if rule["type"] == "composite":
            if not isinstance(config, str):
                raise ConvertError(f"{where}.config: a composite rule's config must be a string")
            converted: dict[str, Any] = {"type": "composite", "config": config}
            checked: str | dict[str, Any] = config
        else:
            if isinstance(config, str):
                try:
                    config = json.loads(config)
                except json.JSONDecodeError:
                    raise ConvertError(f"{where}.config: not a JSON object") from None
            if not isinstance(config, dict):
                raise ConvertError(f"{where}.config: a column rule's config must be an object")
            checked = self._column(config, f"{where}.config")
            converted = {"type": "column", "config": checked}
        try:
            parse_rule(rule["type"], checked)
        except RuleError as error:
            self.warnings.append(f"{where}: does not parse, fix it before applying: {error}")
        return converted

    def _column(self, config: dict[str, Any], where: str) -> dict[str, Any]:
        column = {key: value for key, value in config.items() if key in _COLUMN_KEYS}
        for key, value in config.items():
            if key in ("ignore_case", "ignoreCase"):
                column["ignoreCase"] = value
                if key == "ignore_case" and value:
                    self.warnings.append(
                        f"{where}.ignore_case: Parseable ignored it (the rule was case-sensitive); "
                        "as ignoreCase it now makes the rule case-insensitive"
                    )
            elif key not in _COLUMN_KEYS:
                self.warnings.append(f"{where}.{key}: dropped (not a column rule setting)")
        return column

    def _target(self, target: Any, index: int) -> dict[str, Any]:
        where = f"{self.where}.targets[{index}]"
        if not isinstance(target, dict):
            raise ConvertError(f"{where}: not an object")
        target_type = target.get("type")
        if target_type not in ("webhook", "slack", "alertmanager"):
            raise ConvertError(
                f"{where}.type: {target_type!r} is not webhook, slack or alertmanager"
            )
        endpoint = target.get("endpoint")
        if not isinstance(endpoint, str):
            raise ConvertError(f"{where}.endpoint: missing")
        prefix = f"{target_type}-{index}"
        converted: dict[str, Any] = {"type": target_type}
        if target_type == "slack":
            converted["endpointSecretRef"] = self._secret_ref(f"{prefix}-endpoint", endpoint)
        else:
            converted["endpoint"] = endpoint
        headers = target.get("headers") or {}
        if not isinstance(headers, dict):
            raise ConvertError(f"{where}.headers: not an object")
        if target_type == "webhook":
            converted.update(self._headers(headers, prefix))
        if target_type != "slack" and target.get("skip_tls_check") is not None:
            converted["skipTlsCheck"] = bool(target["skip_tls_check"])
        if target_type == "alertmanager":
            if target.get("username") is not None:
                converted["username"] = str(target["username"])
            if target.get("password") is not None:
                converted["passwordSecretRef"] = self._secret_ref(
                    f"{prefix}-password", str(target["password"])
                )
        if target.get("repeat") is not None:
            if not isinstance(target["repeat"], dict):
                raise ConvertError(f"{where}.repeat: not an object")
            converted["repeat"] = self._repeat(target["repeat"], f"{where}.repeat")
        for key in sorted(set(target) - _TARGET_KEYS[target_type]):
            self.warnings.append(f"{where}.{key}: dropped (not a {target_type} target setting)")
        return converted

    def _headers(self, headers: dict[str, Any], prefix: str) -> dict[str, Any]:
        inline = {}
        from_secret = []
        for name, value in headers.items():
            if _SENSITIVE_HEADER.search(name):
                key = f"{prefix}-" + re.sub(r"[^-._a-zA-Z0-9]+", "-", name.lower())
                from_secret.append({"name": name, "secretRef": self._secret_ref(key, str(value))})
            else:
                inline[str(name)] = str(value)
        converted: dict[str, Any] = {}
        if inline:
            converted["headers"] = inline
        if from_secret:
            converted["headersFrom"] = from_secret
        return converted

    def _repeat(self, repeat: dict[str, Any], where: str) -> dict[str, Any]:
        converted: dict[str, Any] = {}
        if "interval" in repeat:
            converted["interval"] = str(repeat["interval"])
            try:
                schema.parse_duration(converted["interval"])
            except schema.DurationError as error:
                self.warnings.append(f"{where}.interval: {error}")
        if "times" in repeat:
            converted["times"] = repeat["times"]
        return converted

    def _secret_ref(self, key: str, value: str) -> dict[str, str]:
        self.secret_values[key] = value
        return {"name": self.secret_name, "key": key}
