"""Resources -> configuration model: secrets resolved, defaults applied, every mistake a
ConfigError with the reason a status condition shows."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from auditwatch.config import model
from auditwatch.config.build import build_alert, build_stream, check_stream
from auditwatch.config.model import ConfigError
from auditwatch.rules.ast import Rule
from auditwatch.rules.errors import RuleError
from auditwatch.rules.parse import parse_expression, parse_rule
from auditwatch.rules.reference import matches


class Secrets:
    """A SecretLookup over a dict, remembering what was asked."""

    def __init__(self, values: dict[tuple[str | None, str, str], str]) -> None:
        self.values = values
        self.asked: list[tuple[str | None, str, str]] = []

    def __call__(self, namespace: str | None, name: str, key: str) -> str | None:
        self.asked.append((namespace, name, key))
        return self.values.get((namespace, name, key))


NO_SECRETS = Secrets({})


def stream(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": "auditdemo", "generation": 3},
        "spec": spec,
    }


def alert(*targets: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": "secret-read", "namespace": "team-a", "generation": 2},
        "spec": {
            "stream": "auditdemo",
            "message": "secret {objectRef_name} was read by {user_username}",
            "rule": {"type": "composite", "config": RULE},
            "targets": list(targets),
        }
        | spec,
    }


RULE = '(verb = "get" or verb = "list") and objectRef_resource = "secrets"'
WEBHOOK = {"type": "webhook", "endpoint": "https://example.invalid/hook"}


def test_stream_basic_auth_comes_from_the_secret_with_default_keys() -> None:
    secrets = Secrets({(None, "ingest", "username"): "admin", (None, "ingest", "password"): "pw\n"})
    spec = build_stream(
        stream(auth={"basic": {"secretRef": {"name": "ingest"}}}, retention="7d"), secrets
    )
    assert spec == model.StreamSpec(
        name="auditdemo",
        auth=model.IngestAuth(username="admin", password="pw"),
        retention=timedelta(days=7),
        generation=3,
    )


def test_stream_bearer_token_with_namespace_and_key() -> None:
    secrets = Secrets({("auditwatch", "tokens", "apiserver"): "t0ken"})
    ref = {"name": "tokens", "namespace": "auditwatch", "key": "apiserver"}
    spec = build_stream(stream(auth={"bearer": {"secretRef": ref}}), secrets)
    assert spec.auth == model.IngestAuth(bearer_token="t0ken")
    assert spec.retention is None
    assert (spec.max_body_bytes, spec.max_event_bytes) == (
        model.DEFAULT_MAX_BODY_BYTES,
        model.DEFAULT_MAX_EVENT_BYTES,
    )


def test_stream_limits_and_anonymous_access() -> None:
    spec = build_stream(stream(limits={"maxBodyBytes": 4096}), NO_SECRETS)
    assert (spec.auth, spec.max_body_bytes, spec.max_event_bytes) == (
        None,
        4096,
        model.DEFAULT_MAX_EVENT_BYTES,
    )


def test_missing_secret_names_the_field_and_the_secret() -> None:
    resource = stream(auth={"basic": {"secretRef": {"name": "ingest", "namespace": "ops"}}})
    with pytest.raises(ConfigError) as caught:
        build_stream(resource, NO_SECRETS)
    assert caught.value.reason == "SecretNotFound"
    assert caught.value.message == (
        "spec.auth.basic.secretRef: key 'username' of Secret 'ops/ingest' not found"
    )


def test_schema_problems_are_invalid_spec_listing_them_all() -> None:
    with pytest.raises(ConfigError) as caught:
        build_stream(stream(retention="a week", limits={"maxBodyBytes": 1}), NO_SECRETS)
    assert caught.value.reason == "InvalidSpec"
    assert "spec.retention: 'a week' is not a duration" in caught.value.message
    assert "spec.limits.maxBodyBytes: must be at least 1024" in caught.value.message


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="kind: expected AuditStream") as caught:
        build_stream(alert(), NO_SECRETS)
    assert caught.value.reason == "InvalidSpec"


def test_zero_durations_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"spec\.retention: must be longer than zero"):
        build_stream(stream(retention="0s"), NO_SECRETS)
    with pytest.raises(ConfigError, match=r"spec.targets\[0\].repeat.interval: must be longer"):
        build_alert(alert(WEBHOOK | {"repeat": {"interval": "0m"}}), NO_SECRETS)


def test_composite_alert_with_defaults() -> None:
    spec = build_alert(alert(WEBHOOK), NO_SECRETS)
    assert spec.key == "team-a/secret-read"
    assert (spec.stream, spec.rule_type, spec.rule_text) == ("auditdemo", "composite", RULE)
    assert spec.rule == Rule(parse_expression(RULE))
    assert spec.message == "secret {objectRef_name} was read by {user_username}"
    assert spec.resolve_after == model.DEFAULT_RESOLVE_AFTER
    assert (spec.severity, spec.labels, spec.generation) == (None, {}, 2)
    assert spec.targets == (
        model.TargetSpec(type="webhook", endpoint="https://example.invalid/hook", name="webhook-0"),
    )


def test_alert_without_namespace_lives_in_default() -> None:
    resource = alert()
    del resource["metadata"]["namespace"]
    assert build_alert(resource, NO_SECRETS).key == "default/secret-read"


def test_column_rule_in_parseables_shape() -> None:
    config = {"column": "responseStatus_code", "operator": "=", "value": 403, "repeats": 5}
    spec = build_alert(alert(rule={"type": "column", "config": config}), NO_SECRETS)
    assert spec.rule_type == "column"
    assert spec.rule == parse_rule("column", config)
    assert spec.rule.repeats == 5
    assert json.loads(spec.rule_text) == config


def test_bad_rule_is_invalid_rule_with_the_position() -> None:
    resource = alert(rule={"type": "composite", "config": 'verb = "get" and'})
    with pytest.raises(ConfigError) as caught:
        build_alert(resource, NO_SECRETS)
    assert caught.value.reason == "InvalidRule"
    assert caught.value.message.startswith("spec.rule.config: ")
    assert "line 1, column " in caught.value.message
    cause = caught.value.__cause__
    assert isinstance(cause, RuleError)
    assert "^" in cause.pretty()


def test_snake_case_column_settings_are_not_silently_ignored() -> None:
    config = {"column": "verb", "value": "Get", "ignore_case": True}
    with pytest.raises(ConfigError, match="ignore_case") as caught:
        build_alert(alert(rule={"type": "column", "config": config}), NO_SECRETS)
    assert caught.value.reason == "InvalidRule"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"type": "composite", "config": {"column": "verb"}},
            "composite rule's config is a string",
        ),
        ({"type": "column", "config": 403}, "column rule's config is a mapping"),
    ],
)
def test_rule_config_of_the_wrong_shape(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build_alert(alert(rule=rule), NO_SECRETS)
    assert caught.value.reason == "InvalidSpec"


def test_secrets_of_targets_come_from_the_alerts_namespace() -> None:
    secrets = Secrets(
        {
            ("team-a", "notify", "slack"): "https://hooks.slack.com/services/T/B/X\n",
            ("team-a", "notify", "token"): "Bearer abc",
            ("team-a", "am", "username"): "am-user",
            ("team-a", "am", "password"): "am-pass",
        }
    )
    spec = build_alert(
        alert(
            WEBHOOK
            | {
                "headers": {"X-Team": "sec"},
                "headersFrom": [
                    {"name": "Authorization", "secretRef": {"name": "notify", "key": "token"}}
                ],
            },
            {"type": "slack", "endpointSecretRef": {"name": "notify", "key": "slack"}},
            {
                "type": "alertmanager",
                "name": "prod-am",
                "endpoint": "http://alertmanager:9093",
                "credentialsSecretRef": {"name": "am"},
                "skipTlsCheck": True,
            },
        ),
        secrets,
    )
    webhook, slack, alertmanager = spec.targets
    assert webhook.headers == {"X-Team": "sec", "Authorization": "Bearer abc"}
    assert (slack.name, slack.endpoint) == ("slack-1", "https://hooks.slack.com/services/T/B/X")
    assert (alertmanager.name, alertmanager.username, alertmanager.password) == (
        "prod-am",
        "am-user",
        "am-pass",
    )
    assert alertmanager.skip_tls_check is True
    assert {namespace for namespace, _, _ in secrets.asked} == {"team-a"}


def test_alertmanager_inline_username_with_password_secret() -> None:
    secrets = Secrets({("team-a", "am", "pw"): "s3cret"})
    target = {
        "type": "alertmanager",
        "endpoint": "http://am:9093",
        "username": "auditwatch",
        "passwordSecretRef": {"name": "am", "key": "pw"},
        "repeat": {"interval": "1m", "times": 2},
        "timeout": "3s",
    }
    [built] = build_alert(alert(target), secrets).targets
    assert (built.username, built.password) == ("auditwatch", "s3cret")
    assert built.repeat == model.RepeatSpec(interval=timedelta(minutes=1), times=2)
    assert built.timeout == timedelta(seconds=3)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            {"type": "slack", "endpoint": "https://hooks.slack.invalid/x", "headers": {"A": "b"}},
            r"spec.targets\[0\].headers: not used by slack targets",
        ),
        (
            WEBHOOK | {"username": "me"},
            r"spec.targets\[0\].username: not used by webhook targets "
            r"\(send credentials with headersFrom\)",
        ),
        (
            {
                "type": "alertmanager",
                "endpoint": "http://am",
                "passwordSecretRef": {"name": "a", "key": "b"},
            },
            r"passwordSecretRef: needs spec.targets\[0\].username",
        ),
        (
            {
                "type": "alertmanager",
                "endpoint": "http://am",
                "username": "me",
                "credentialsSecretRef": {"name": "am"},
            },
            r"spec.targets\[0\].username: cannot be combined with credentialsSecretRef",
        ),
        (
            WEBHOOK | {"headers": {"x-team": "a", "X-Team": "b"}},
            "header 'X-Team' is set twice",
        ),
        (WEBHOOK | {"headers": {"X Team": "a"}}, "'X Team' is not a header name"),
        (WEBHOOK | {"headers": {"X-Team": "a\r\nX-Evil: 1"}}, "has a line break"),
    ],
)
def test_target_field_combinations(target: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build_alert(alert(target), NO_SECRETS)
    assert caught.value.reason == "InvalidSpec"


def test_target_names_must_be_unique() -> None:
    with pytest.raises(ConfigError, match=r"spec.targets\[1\].name: 'webhook-0' is used twice"):
        build_alert(alert(WEBHOOK, WEBHOOK | {"name": "webhook-0"}), NO_SECRETS)


def test_endpoint_secret_that_is_not_a_url_is_refused_without_showing_it() -> None:
    secrets = Secrets({("team-a", "slack", "url"): "xoxb-very-secret"})
    target = {"type": "slack", "endpointSecretRef": {"name": "slack", "key": "url"}}
    with pytest.raises(ConfigError) as caught:
        build_alert(alert(target), secrets)
    assert caught.value.reason == "InvalidSpec"
    assert "not hold an http:// or https:// URL" in caught.value.message
    assert "xoxb" not in caught.value.message


def test_missing_target_secret() -> None:
    target = {"type": "slack", "endpointSecretRef": {"name": "slack", "key": "url"}}
    with pytest.raises(ConfigError) as caught:
        build_alert(alert(target), NO_SECRETS)
    assert caught.value.reason == "SecretNotFound"
    assert caught.value.message == (
        "spec.targets[0].endpointSecretRef: key 'url' of Secret 'team-a/slack' not found"
    )


def test_labels_and_severity() -> None:
    spec = build_alert(
        alert(labels={"team": "sec", "env_name": "prod"}, severity="critical"), NO_SECRETS
    )
    assert (spec.labels, spec.severity) == ({"team": "sec", "env_name": "prod"}, "critical")
    with pytest.raises(ConfigError, match=r"'app\.kubernetes\.io/team' is not a label name"):
        build_alert(alert(labels={"app.kubernetes.io/team": "sec"}), NO_SECRETS)


def test_check_stream() -> None:
    spec = build_alert(alert(), NO_SECRETS)
    with pytest.raises(ConfigError, match="no usable AuditStream named 'auditdemo'") as caught:
        check_stream(spec, {"other": build_stream(stream(), NO_SECRETS)})
    assert caught.value.reason == "StreamNotFound"


def alert_in(namespace: str) -> model.AlertSpec:
    resource = alert()
    resource["metadata"]["namespace"] = namespace
    return build_alert(resource, NO_SECRETS)


def streams_granting(allowed: dict[str, Any], home: str = "auditwatch") -> dict[str, Any]:
    return {"auditdemo": build_stream(stream(allowedAlerts=allowed), NO_SECRETS, home)}


def test_by_default_an_alert_sees_only_its_own_namespace_and_the_home_namespace_all() -> None:
    granted = streams_granting({})
    tenant = check_stream(alert_in("team-a"), granted)
    assert (tenant.cluster_wide, tenant.scope) == (False, "team-a")
    platform = check_stream(alert_in("auditwatch"), granted)
    assert (platform.cluster_wide, platform.scope) == (True, None)


def test_a_stream_admitting_only_the_same_namespace_refuses_a_tenant() -> None:
    granted = streams_granting({"namespaces": {"from": "Same"}})
    with pytest.raises(ConfigError) as caught:
        check_stream(alert_in("team-a"), granted)
    assert caught.value.reason == "StreamNotGranted"
    assert "'team-a'" in caught.value.message and "'auditdemo'" in caught.value.message
    assert check_stream(alert_in("auditwatch"), granted).cluster_wide


def test_selectors_match_namespace_labels() -> None:
    granted = streams_granting(
        {
            "namespaces": {
                "from": "Selector",
                "selector": {"matchExpressions": [{"key": "tenant", "operator": "Exists"}]},
            },
            "clusterWide": {
                "from": "Selector",
                "selector": {
                    "matchLabels": {"tier": "platform"},
                    "matchExpressions": [
                        {"key": "env", "operator": "In", "values": ["prod", "stage"]},
                        {"key": "frozen", "operator": "DoesNotExist"},
                        {"key": "team", "operator": "NotIn", "values": ["guests"]},
                    ],
                },
            },
        }
    )
    labels = {
        "team-a": {"tenant": "a"},
        "sec": {"tenant": "s", "tier": "platform", "env": "prod"},
        "sec-frozen": {"tenant": "s", "tier": "platform", "env": "prod", "frozen": "1"},
        "sec-guests": {"tenant": "s", "tier": "platform", "env": "prod", "team": "guests"},
        "sec-dev": {"tenant": "s", "tier": "platform", "env": "dev"},
    }
    with pytest.raises(ConfigError, match="does not admit"):
        check_stream(alert_in("unlabelled"), granted, labels)
    wide = {ns: check_stream(alert_in(ns), granted, labels).cluster_wide for ns in labels}
    assert wide == {
        "team-a": False,
        "sec": True,
        "sec-frozen": False,
        "sec-guests": False,
        "sec-dev": False,
    }


def test_from_none_grants_nobody_the_cluster() -> None:
    granted = streams_granting({"clusterWide": {"from": "None"}})
    assert check_stream(alert_in("auditwatch"), granted).scope == "auditwatch"


def test_all_grants_every_namespace_the_cluster() -> None:
    granted = streams_granting({"clusterWide": {"from": "All"}})
    assert check_stream(alert_in("team-a"), granted).scope is None


@pytest.mark.parametrize(
    "allowed",
    [
        {"namespaces": {"from": "Selector"}},
        {"clusterWide": {"from": "All", "selector": {"matchLabels": {"a": "b"}}}},
    ],
)
def test_a_selector_goes_with_from_selector_only(allowed: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="a selector goes with from: Selector") as caught:
        build_stream(stream(allowedAlerts=allowed), NO_SECRETS)
    assert caught.value.reason == "InvalidSpec"


def test_an_unknown_source_is_refused_by_the_schema() -> None:
    with pytest.raises(ConfigError, match="Everyone") as caught:
        build_stream(stream(allowedAlerts={"namespaces": {"from": "Everyone"}}), NO_SECRETS)
    assert caught.value.reason == "InvalidSpec"


def test_threshold_per_group_with_fields_spelled_as_in_rules() -> None:
    threshold = {"count": 5, "window": "1m", "groupBy": ["user.username", "objectRef_namespace"]}
    spec = build_alert(alert(threshold=threshold), NO_SECRETS)
    assert spec.threshold == model.ThresholdSpec(
        count=5,
        window=timedelta(minutes=1),
        group_by=("user.username", "objectRef_namespace"),
        columns=("user_username", "objectRef_namespace"),
        max_groups=model.DEFAULT_MAX_GROUPS,
    )
    assert build_alert(alert(), NO_SECRETS).threshold is None


@pytest.mark.parametrize(
    ("threshold", "reason", "message"),
    [
        (
            {"count": 5, "window": "1m", "groupBy": ["user.groups"]},
            "InvalidSpec",
            "spec.threshold.groupBy[0]: cannot group by 'user.groups'",
        ),
        (
            {"count": 5, "window": "1m", "groupBy": ["user.username", "user..name"]},
            "InvalidSpec",
            "spec.threshold.groupBy[1]: not a field name (",
        ),
        (
            {"count": 5, "window": "1m", "groupBy": ["user.username", "user_username"]},
            "InvalidSpec",
            "spec.threshold.groupBy: a field is named twice",
        ),
        ({"count": 5, "window": "a minute"}, "InvalidSpec", "spec.threshold.window: "),
        ({"count": 5, "window": "0s"}, "InvalidSpec", "spec.threshold.window: must be longer"),
        ({"count": 0, "window": "1m"}, "InvalidSpec", "spec.threshold.count: "),
        ({"window": "1m"}, "InvalidSpec", "spec.threshold.count: required field is missing"),
        ({"count": 5, "window": "1m", "maxGroups": 0}, "InvalidSpec", "spec.threshold.maxGroups"),
    ],
)
def test_a_bad_threshold_is_invalid_saying_where(
    threshold: dict[str, Any], reason: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_alert(alert(threshold=threshold), NO_SECRETS)
    assert caught.value.reason == reason
    assert message in caught.value.message


def test_a_group_field_error_has_its_position() -> None:
    with pytest.raises(ConfigError) as caught:
        build_alert(
            alert(threshold={"count": 2, "window": "1m", "groupBy": ["user.x y"]}), NO_SECRETS
        )
    assert "line 1, column 8" in caught.value.message
    cause = caught.value.__cause__
    assert isinstance(cause, RuleError)
    assert cause.pretty().splitlines()[:2] == ["user.x y", "       ^"]


def test_repeats_and_a_threshold_do_not_go_together() -> None:
    rule = {"type": "column", "config": {"column": "verb", "value": "get", "repeats": 3}}
    with pytest.raises(ConfigError, match=r"use threshold\.count"):
        build_alert(alert(rule=rule, threshold={"count": 5, "window": "1m"}), NO_SECRETS)


INFRASTRUCTURE = {
    "infrastructure": {
        "entries": {
            "cert-manager": {
                "serviceAccounts": [{"namespace": "cert-manager", "name": "cert-manager"}],
                "resources": ["secrets"],
            }
        }
    }
}


def test_exceptions_and_trust_lists_make_what_the_alert_excepts() -> None:
    built = build_alert(
        alert(
            exceptions={
                "reader": {"fields": ["user.username"], "values": [["system:serviceaccount:a:b"]]},
                "infra": {"trustList": "infrastructure"},
            }
        ),
        NO_SECRETS,
    )
    assert built.trust_lists == ("infrastructure",)
    streams = {"auditdemo": build_stream(stream(trustLists=INFRASTRUCTURE), NO_SECRETS)}
    running = check_stream(built, streams)
    assert running.unless is not None
    for username, excepted in [
        ("system:serviceaccount:a:b", True),
        ("system:serviceaccount:cert-manager:cert-manager", True),
        ("system:serviceaccount:a:bb", False),
    ]:
        event = {"user": {"username": username}, "objectRef": {"resource": "secrets"}}
        assert matches(running.unless, event) is excepted


def test_a_trust_list_the_stream_lacks_makes_the_alert_invalid() -> None:
    built = build_alert(alert(exceptions={"i": {"trustList": "infra"}}), NO_SECRETS)
    streams = {"auditdemo": build_stream(stream(trustLists=INFRASTRUCTURE), NO_SECRETS)}
    with pytest.raises(ConfigError) as error:
        check_stream(built, streams)
    assert error.value.reason == "TrustListNotFound"
    assert "no trust list 'infra' (its spec.trustLists: infrastructure)" in error.value.message


def test_a_bad_exception_is_an_invalid_rule_with_its_path_and_column() -> None:
    bad = alert(exceptions={"typo": {"fields": ["user.nmae"], "values": [["x"]]}})
    with pytest.raises(ConfigError) as error:
        build_alert(bad, NO_SECRETS)
    assert error.value.reason == "InvalidRule"
    assert error.value.message.startswith('spec.exceptions["typo"].fields[0]: unknown field')
    assert error.value.message.endswith("at line 1, column 6")
    misspelt = alert(exceptions={"typo": {"feilds": ["verb"], "values": [["get"]]}})
    with pytest.raises(ConfigError) as error:
        build_alert(misspelt, NO_SECRETS)
    assert error.value.reason == "InvalidSpec"
    assert "spec.exceptions.typo.feilds: unknown field" in error.value.message
