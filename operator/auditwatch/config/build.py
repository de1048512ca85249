"""AuditStream / AuditAlert resources (plain dicts) -> the configuration model, secrets resolved.

Both configuration sources (YAML files in standalone mode, the Kubernetes API in the operator)
hand their resource dicts to `build_stream` / `build_alert`, so a resource means the same thing
and fails with the same `ConfigError` wherever it comes from. The schema (from the CRDs) is checked
first; the rules the schema cannot express (which fields go with which target type, positive
durations, label names) are checked here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any, Literal, cast

import jwt

from auditwatch.config import schema
from auditwatch.config.model import DEFAULT_NAMESPACE as DEFAULT_NAMESPACE
from auditwatch.config.model import (
    AlertGrant,
    AlertSpec,
    ClientCertificateAuth,
    ConfigError,
    IngestAuth,
    InvalidAlert,
    LabelRequirement,
    NamespaceFilter,
    OidcAuth,
    RepeatSpec,
    StreamSpec,
    TargetSpec,
    TargetType,
    ThresholdSpec,
)
from auditwatch.config.trust import build_trust_lists
from auditwatch.rules.ast import disjunction
from auditwatch.rules.errors import RuleError
from auditwatch.rules.exceptions import ExceptionError, compile_exceptions, exception_specs
from auditwatch.rules.parse import parse_rule
from auditwatch.rules.window import group_column

SecretLookup = Callable[[str | None, str, str], str | None]
"""(namespace, Secret name, key) -> the value; SecretMissing (or None) when the Secret or the
key is missing.

A namespace of None means the source's own default: the operator's namespace in a cluster,
`default` in standalone files.
"""


class SecretMissing(Exception):
    """Raised by a SecretLookup that can tell why a value is missing: the message names the
    Secret with its namespace, and says whether the Secret or only the key is absent."""

    @classmethod
    def of(
        cls, namespace: str, name: str, key: str, values: Mapping[str, str] | None, note: str = ""
    ) -> SecretMissing:
        """Why `key` of Secret `namespace/name` (whose values are `values`, None when the
        Secret does not exist) cannot be read; `note` says where the namespace came from."""
        secret = f"{namespace}/{name}"
        if values is None:
            return cls(f"Secret {secret!r} does not exist{note}")
        return cls(f"Secret {secret!r} exists but has no key {key!r}{note}")


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
"""Alertmanager (Prometheus) label names."""

_TARGET_FIELDS: dict[str, frozenset[str]] = {
    "webhook": frozenset({"headers", "headersFrom"}),
    "slack": frozenset(),
    "alertmanager": frozenset(
        {"headers", "headersFrom", "username", "passwordSecretRef", "credentialsSecretRef"}
    ),
}
"""The optional fields each target type uses, beyond name/endpoint/skipTlsCheck/timeout/repeat."""
_TYPE_SPECIFIC_FIELDS = frozenset[str]().union(*_TARGET_FIELDS.values())

RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "proxy-connection",
        "proxy-authorization",
    }
)
"""Headers that decide where and how a request travels, not what it says: the HTTP client sets
them, and a target's `headers` / `headersFrom` may not (InvalidSpec)."""


def _checked(resource: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The resource with defaults applied, or InvalidSpec listing every schema problem."""
    if isinstance(resource, Mapping) and resource.get("kind") != kind:
        raise ConfigError("InvalidSpec", f"kind: expected {kind} (got {resource.get('kind')!r})")
    problems = schema.validate(resource)
    if problems:
        raise ConfigError("InvalidSpec", "; ".join(problems))
    return schema.apply_defaults(resource)


def _duration(value: str, where: str) -> timedelta:
    """A positive duration (the pattern was checked by the schema; zero is not useful anywhere)."""
    try:
        duration = schema.parse_duration(value)
    except schema.DurationError as error:
        raise ConfigError("InvalidSpec", f"{where}: {error}") from None
    if duration <= timedelta():
        raise ConfigError("InvalidSpec", f"{where}: must be longer than zero (got {value!r})")
    return duration


def _secret(secrets: SecretLookup, namespace: str | None, name: str, key: str, where: str) -> str:
    """A Secret value, without the line break `kubectl create secret --from-file` often leaves."""
    try:
        value = secrets(namespace, name, key)
    except SecretMissing as missing:
        raise ConfigError("SecretNotFound", f"{where}: {missing}") from None
    if value is None:
        secret = f"{namespace}/{name}" if namespace else name
        raise ConfigError("SecretNotFound", f"{where}: key {key!r} of Secret {secret!r} not found")
    return value.rstrip("\r\n")


def build_stream(
    resource: Mapping[str, Any], secrets: SecretLookup, home: str = DEFAULT_NAMESPACE
) -> StreamSpec:
    """The StreamSpec of an AuditStream resource; ConfigError (InvalidSpec, SecretNotFound).

    `home` is the source's own namespace (where the stream's Secrets default to): what `Same`
    means in `spec.allowedAlerts`.
    """
    stream = _checked(resource, "AuditStream")
    spec = stream["spec"]
    auth = None
    basic = spec.get("auth", {}).get("basic")
    bearer = spec.get("auth", {}).get("bearer")
    if basic is not None:
        ref = basic["secretRef"]
        where = "spec.auth.basic.secretRef"
        auth = IngestAuth(
            username=_secret(secrets, ref.get("namespace"), ref["name"], ref["usernameKey"], where),
            password=_secret(secrets, ref.get("namespace"), ref["name"], ref["passwordKey"], where),
        )
    elif bearer is not None:
        ref = bearer["secretRef"]
        where = "spec.auth.bearer.secretRef"
        auth = IngestAuth(
            bearer_token=_secret(secrets, ref.get("namespace"), ref["name"], ref["key"], where)
        )
    elif (client := spec.get("auth", {}).get("clientCertificate")) is not None:
        auth = IngestAuth(client_certificate=_client_certificate(client, secrets))
    elif "oidc" in spec.get("auth", {}):
        auth = IngestAuth(oidc=_oidc(spec["auth"]["oidc"], secrets))
    retention = spec.get("retention")
    limits = spec["limits"]
    return StreamSpec(
        name=stream["metadata"]["name"],
        auth=auth,
        allowed_alerts=_grant(spec["allowedAlerts"], home),
        trust_lists=build_trust_lists(spec.get("trustLists", {})),
        retention=None if retention is None else _duration(retention, "spec.retention"),
        max_body_bytes=limits["maxBodyBytes"],
        max_event_bytes=limits["maxEventBytes"],
        cluster=spec.get("cluster"),
        generation=stream["metadata"].get("generation", 1),
    )


def _oidc(oidc: Mapping[str, Any], secrets: SecretLookup) -> OidcAuth:
    """`spec.auth.oidc`, its key set (inline `jwks` or `jwksSecretRef`) checked to be one."""
    if ("jwks" in oidc) == ("jwksSecretRef" in oidc):
        raise ConfigError("InvalidSpec", "spec.auth.oidc: set exactly one of jwks or jwksSecretRef")
    jwks = oidc.get("jwks")
    if jwks is None:
        ref = oidc["jwksSecretRef"]
        where = "spec.auth.oidc.jwksSecretRef"
        jwks = _secret(secrets, ref.get("namespace"), ref["name"], ref["key"], where)
    try:
        jwt.PyJWKSet.from_json(jwks)
    except (jwt.PyJWKError, jwt.PyJWKSetError, ValueError) as error:
        message = f"spec.auth.oidc: not a JSON Web Key Set: {error}"
        raise ConfigError("InvalidSpec", message) from None
    return OidcAuth(oidc["issuer"], oidc["audience"], jwks, oidc.get("serviceAccountEmail"))


def _grant(allowed: Mapping[str, Any], home: str) -> AlertGrant:
    """`spec.allowedAlerts` (defaults applied by the schema) as an AlertGrant."""

    def namespaces(part: str) -> NamespaceFilter:
        entry = allowed[part]
        source = entry["from"]
        selector = entry.get("selector")
        if (source == "Selector") != (selector is not None):
            raise ConfigError(
                "InvalidSpec",
                f"spec.allowedAlerts.{part}: a selector goes with from: Selector, and only there",
            )
        selector = selector or {}
        return NamespaceFilter(
            source,
            home,
            tuple(sorted(selector.get("matchLabels", {}).items())),
            tuple(
                LabelRequirement(item["key"], item["operator"], frozenset(item.get("values", [])))
                for item in selector.get("matchExpressions", [])
            ),
        )

    return AlertGrant(namespaces("namespaces"), namespaces("clusterWide"))


def _client_certificate(spec: dict[str, Any], secrets: SecretLookup) -> ClientCertificateAuth:
    """The CA bundle (PEM, from a Secret) and the allowed common names of client-cert auth."""
    from auditwatch.tls import load_authorities

    ref = spec["secretRef"]
    where = "spec.auth.clientCertificate.secretRef"
    pem = _secret(secrets, ref.get("namespace"), ref["name"], ref["key"], where)
    try:
        authorities = load_authorities(pem)
    except ValueError as error:
        raise ConfigError(
            "InvalidSpec",
            f"{where}: key {ref['key']!r} of Secret {ref['name']!r} does not hold PEM "
            f"CA certificates ({error})",
        ) from None
    return ClientCertificateAuth(
        authorities=authorities,
        authorities_pem=pem,
        common_names=frozenset(spec.get("commonNames", [])),
    )


def build_alert(resource: Mapping[str, Any], secrets: SecretLookup) -> AlertSpec:
    """The AlertSpec of an AuditAlert resource.

    Raises ConfigError: InvalidSpec (schema and field-combination problems), InvalidRule (the
    message is the parser's one-liner with the position; the RuleError is the `__cause__`, for
    `pretty()`), SecretNotFound. Whether the stream exists is for the caller (`check_stream`).
    """
    alert = _checked(resource, "AuditAlert")
    metadata, spec = alert["metadata"], alert["spec"]
    namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
    rule_type = cast(Literal["column", "composite"], spec["rule"]["type"])
    rule_config = spec["rule"]["config"]
    if rule_type == "composite" and not isinstance(rule_config, str):
        raise ConfigError("InvalidSpec", "spec.rule.config: a composite rule's config is a string")
    if not isinstance(rule_config, str | dict):
        raise ConfigError(
            "InvalidSpec", "spec.rule.config: a column rule's config is a mapping (or its JSON)"
        )
    try:
        rule = parse_rule(rule_type, rule_config)
    except RuleError as error:
        raise ConfigError("InvalidRule", f"spec.rule.config: {error}") from error
    exceptions = spec.get("exceptions", {})
    try:
        excepted = compile_exceptions(exception_specs(exceptions), "spec.exceptions")
    except ExceptionError as error:
        raise ConfigError("InvalidRule", str(error)) from error
    for name in spec.get("labels", {}):
        if not _LABEL_NAME.fullmatch(name):
            raise ConfigError(
                "InvalidSpec",
                f"spec.labels: {name!r} is not a label name "
                "(letters, digits and '_', not starting with a digit)",
            )
    return AlertSpec(
        namespace=namespace,
        name=metadata["name"],
        stream=spec["stream"],
        rule=rule,
        rule_type=rule_type,
        rule_text=rule_config if isinstance(rule_config, str) else json.dumps(rule_config),
        message=spec["message"],
        targets=_targets(spec.get("targets", []), namespace, secrets),
        resolve_after=_duration(spec["resolveAfter"], "spec.resolveAfter"),
        threshold=_threshold(spec.get("threshold"), rule.repeats),
        severity=spec.get("severity"),
        labels=dict(spec.get("labels", {})),
        generation=metadata.get("generation", 1),
        exceptions=excepted,
        trust_lists=tuple(
            sorted({entry["trustList"] for entry in exceptions.values() if "trustList" in entry})
        ),
    )


def _threshold(threshold: Mapping[str, Any] | None, repeats: int) -> ThresholdSpec | None:
    """The grouped threshold; each groupBy field is checked as rules check fields."""
    if threshold is None:
        return None
    if repeats > 1:
        raise ConfigError(
            "InvalidSpec",
            "spec.threshold: a column rule with repeats cannot also have a threshold "
            "(use threshold.count)",
        )
    fields = tuple(threshold.get("groupBy", ()))
    columns = []
    for index, text in enumerate(fields):
        try:
            columns.append(group_column(text))
        except RuleError as error:
            raise ConfigError("InvalidSpec", f"spec.threshold.groupBy[{index}]: {error}") from error
    if len(set(columns)) < len(columns):
        raise ConfigError("InvalidSpec", "spec.threshold.groupBy: a field is named twice")
    return ThresholdSpec(
        count=threshold["count"],
        window=_duration(threshold["window"], "spec.threshold.window"),
        group_by=fields,
        columns=tuple(columns),
        max_groups=threshold["maxGroups"],
    )


def _targets(
    targets: list[dict[str, Any]], namespace: str, secrets: SecretLookup
) -> tuple[TargetSpec, ...]:
    built = [_target(target, index, namespace, secrets) for index, target in enumerate(targets)]
    seen: set[str] = set()
    for index, target in enumerate(built):
        if target.name in seen:
            raise ConfigError(
                "InvalidSpec", f"spec.targets[{index}].name: {target.name!r} is used twice"
            )
        seen.add(target.name)
    return tuple(built)


def _target(
    target: dict[str, Any], index: int, namespace: str, secrets: SecretLookup
) -> TargetSpec:
    where = f"spec.targets[{index}]"
    target_type = cast(TargetType, target["type"])
    for field in sorted(_TYPE_SPECIFIC_FIELDS - _TARGET_FIELDS[target_type]):
        if field in target:
            hint = " (send credentials with headersFrom)" if target_type == "webhook" else ""
            raise ConfigError(
                "InvalidSpec", f"{where}.{field}: not used by {target_type} targets{hint}"
            )
    if "endpointSecretRef" in target:
        ref = target["endpointSecretRef"]
        field = f"{where}.endpointSecretRef"
        endpoint = _secret(secrets, namespace, ref["name"], ref["key"], field)
        if not re.match(r"https?://", endpoint):
            raise ConfigError(
                "InvalidSpec",
                f"{field}: key {ref['key']!r} of Secret {ref['name']!r} "
                "does not hold an http:// or https:// URL",
            )
    else:
        endpoint = target["endpoint"]
    username, password = _credentials(target, where, namespace, secrets)
    return TargetSpec(
        type=target_type,
        endpoint=endpoint,
        name=target.get("name", f"{target_type}-{index}"),
        headers=_headers(target, where, namespace, secrets),
        skip_tls_check=target["skipTlsCheck"],
        username=username,
        password=password,
        repeat=RepeatSpec(
            interval=_duration(target["repeat"]["interval"], f"{where}.repeat.interval"),
            times=target["repeat"]["times"],
        ),
        timeout=_duration(target["timeout"], f"{where}.timeout"),
    )


def _headers(
    target: dict[str, Any], where: str, namespace: str, secrets: SecretLookup
) -> dict[str, str]:
    headers = dict(target.get("headers", {}))
    for index, header in enumerate(target.get("headersFrom", [])):
        field = f"{where}.headersFrom[{index}]"
        ref = header["secretRef"]
        headers[header["name"]] = _secret(secrets, namespace, ref["name"], ref["key"], field)
    seen: set[str] = set()
    for name, value in headers.items():
        if not re.fullmatch(schema.HEADER_NAME, name):
            raise ConfigError("InvalidSpec", f"{where}.headers: {name!r} is not a header name")
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError(
                "InvalidSpec",
                f"{where}.headers: {name!r} is set by auditwatch itself and cannot be overridden",
            )
        if "\n" in value or "\r" in value:
            raise ConfigError(
                "InvalidSpec", f"{where}: the value of header {name!r} has a line break"
            )
        if name.lower() in seen:
            raise ConfigError("InvalidSpec", f"{where}: header {name!r} is set twice")
        seen.add(name.lower())
    return headers


def _credentials(
    target: dict[str, Any], where: str, namespace: str, secrets: SecretLookup
) -> tuple[str | None, str | None]:
    """Basic-auth user and password: inline user + password Secret, or one credentials Secret."""
    if "credentialsSecretRef" in target:
        for field in ("username", "passwordSecretRef"):
            if field in target:
                raise ConfigError(
                    "InvalidSpec", f"{where}.{field}: cannot be combined with credentialsSecretRef"
                )
        ref = target["credentialsSecretRef"]
        field = f"{where}.credentialsSecretRef"
        return (
            _secret(secrets, namespace, ref["name"], ref["usernameKey"], field),
            _secret(secrets, namespace, ref["name"], ref["passwordKey"], field),
        )
    if "passwordSecretRef" in target:
        if "username" not in target:
            raise ConfigError("InvalidSpec", f"{where}.passwordSecretRef: needs {where}.username")
        ref = target["passwordSecretRef"]
        field = f"{where}.passwordSecretRef"
        return target["username"], _secret(secrets, namespace, ref["name"], ref["key"], field)
    return target.get("username"), None


def invalid_alert(resource: Mapping[str, Any], error: ConfigError) -> InvalidAlert:
    """What the status of an AuditAlert that `build_alert` or `check_stream` refused shows."""
    metadata = resource.get("metadata") or {}
    spec = resource.get("spec")
    stream = spec.get("stream") if isinstance(spec, Mapping) else None
    generation = metadata.get("generation")
    return InvalidAlert(
        namespace=metadata.get("namespace") or DEFAULT_NAMESPACE,
        name=str(metadata.get("name", "")),
        stream=stream if isinstance(stream, str) else None,
        reason=error.reason,
        message=error.message,
        generation=generation if isinstance(generation, int) else 1,
    )


def check_stream(
    alert: AlertSpec,
    streams: Mapping[str, StreamSpec],
    namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> AlertSpec:
    """The alert as it runs on its stream: what it may see, by the stream's `allowedAlerts`,
    and what the stream's trust lists it names except.

    Raises StreamNotFound unless the alert's stream is among the usable `streams`,
    StreamNotGranted when the stream does not admit alerts from the alert's namespace, and
    TrustListNotFound when it names a trust list the stream does not have.
    `namespace_labels` are the labels of each namespace, for selectors.
    """
    stream = streams.get(alert.stream)
    if stream is None:
        raise ConfigError(
            "StreamNotFound", f"spec.stream: no usable AuditStream named {alert.stream!r}"
        )
    grant = stream.allowed_alerts
    labels = (namespace_labels or {}).get(alert.namespace, {})
    if not grant.namespaces.admits(alert.namespace, labels):
        raise ConfigError(
            "StreamNotGranted",
            f"spec.stream: AuditStream {alert.stream!r} does not admit AuditAlerts from namespace "
            f"{alert.namespace!r} (its spec.allowedAlerts.namespaces)",
        )
    missing = [name for name in alert.trust_lists if name not in stream.trust_lists]
    if missing:
        raise ConfigError(
            "TrustListNotFound",
            f"spec.exceptions: AuditStream {alert.stream!r} has no trust list "
            f"{', '.join(map(repr, missing))} (its spec.trustLists: "
            f"{', '.join(sorted(stream.trust_lists)) or 'none'})",
        )
    trusted = [
        expression
        for name in alert.trust_lists
        if (expression := stream.trust_lists[name].expression()) is not None
    ]
    return replace(
        alert,
        cluster_wide=grant.cluster_wide.admits(alert.namespace, labels),
        trusted=disjunction(trusted) if trusted else None,
    )
