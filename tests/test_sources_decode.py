"""Cloud envelopes without the HTTP layer: the GKE LogEntry mapping, AKS records keeping every
field the detection library reads, and the OIDC key set checked when a stream is built."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from auditwatch.config.build import build_stream
from auditwatch.config.model import ConfigError
from auditwatch.decode import decode_file
from auditwatch.rules import ast
from auditwatch.rules.parse import parse_rule
from auditwatch.rules.reference import field_values, matches
from auditwatch.sources import GCP_LOG_ENTRY, gke_event

CLOUD = Path("tests/data/cloud")
SAMPLES = Path("tests/data/audit-samples")
DETECTIONS = sorted(Path("examples/detections").glob("k8s-*.yaml"))


def entry(name: str) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads((CLOUD / name).read_bytes())
    return value


def test_gke_exec_entry_maps_to_the_event_the_apiserver_would_write() -> None:
    event = gke_event(entry("gke-logentry-exec.json"))
    original = entry("gke-logentry-exec.json")
    assert event == {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "verb": "create",
        "auditID": "3f2a1c9e-5b7d-4e21-9c4b-0a1b2c3d4e5f",
        "objectRef": {
            "apiVersion": "v1",
            "namespace": "default",
            "resource": "pods",
            "name": "nginx",
            "subresource": "exec",
        },
        "requestURI": "/core/v1/namespaces/default/pods/nginx/exec",
        "user": {"username": "alice@acme.example"},
        "sourceIPs": ["203.0.113.24"],
        "userAgent": "kubectl/v1.31.2 (linux/amd64) kubernetes/5864a46",
        "responseStatus": {"code": 200},
        "requestObject": original["protoPayload"]["request"],
        "annotations": original["labels"],
        "requestReceivedTimestamp": "2026-12-05T14:02:11.418276Z",
        "stageTimestamp": "2026-12-05T14:02:11.418276Z",
        GCP_LOG_ENTRY: original,
        "cluster": "gke-prod",
    }


@pytest.mark.parametrize(
    ("code", "http"), [(0, 200), (3, 400), (5, 404), (6, 409), (7, 403), (16, 401), (14, 503)]
)
def test_gke_status_codes_become_http_statuses(code: int, http: int) -> None:
    changed = entry("gke-logentry-secret-denied.json")
    changed["protoPayload"]["status"] = {"code": code}
    assert gke_event(changed)["responseStatus"]["code"] == http


@pytest.mark.parametrize(
    ("resource_name", "reference"),
    [
        ("core/v1/namespaces/team-a", {"resource": "namespaces", "name": "team-a"}),
        ("core/v1/namespaces/team-a/secrets", {"namespace": "team-a", "resource": "secrets"}),
        (
            "core/v1/nodes/gke-pool-1/proxy",
            {"resource": "nodes", "name": "gke-pool-1", "subresource": "proxy"},
        ),
        (
            "apps/v1/namespaces/web/deployments/api/scale",
            {
                "apiGroup": "apps",
                "namespace": "web",
                "resource": "deployments",
                "name": "api",
                "subresource": "scale",
            },
        ),
    ],
)
def test_gke_resource_names_become_object_refs(
    resource_name: str, reference: dict[str, str]
) -> None:
    changed = entry("gke-logentry-exec.json")
    changed["protoPayload"]["resourceName"] = resource_name
    assert gke_event(changed)["objectRef"] == {"apiVersion": "v1"} | reference


def fields(expr: ast.Expr) -> Iterator[ast.Field]:
    if isinstance(expr, ast.Compare | ast.Exists):
        yield expr.field
    elif isinstance(expr, ast.Not):
        yield from fields(expr.operand)
    elif isinstance(expr, ast.And | ast.Or):
        for operand in expr.operands:
            yield from fields(operand)


@pytest.mark.parametrize(
    "sample", ["aks-envelope-EventHubs.json", "aks-envelope-KubeAuditLog.json"]
)
def test_every_field_the_detections_read_survives_the_aks_envelope(sample: str) -> None:
    [event] = decode_file(SAMPLES / sample)
    text = (SAMPLES / sample).read_bytes().removeprefix(b"\xef\xbb\xbf")
    raw = orjson.loads(text)
    inner = orjson.loads(raw["properties"]["log"]) if "properties" in raw else raw
    read = 0
    for path in DETECTIONS:
        spec = yaml.safe_load(path.read_text())["spec"]
        rule = parse_rule(spec["rule"]["type"], spec["rule"]["config"])
        for field in fields(rule.condition):
            assert field_values(field, event) == field_values(field, inner), (path.name, field)
            read += bool(field_values(field, inner))
        assert matches(rule.condition, event) == matches(rule.condition, inner), path.name
    assert read > 0  # the samples do carry fields the detections test


def test_a_stream_whose_oidc_key_set_is_not_one_is_invalid() -> None:
    resource = {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": "gke"},
        "spec": {
            "auth": {
                "oidc": {
                    "issuer": "https://accounts.google.com",
                    "audience": "a",
                    "jwks": '{"keys": [{"kty": "nope"}]}',
                }
            }
        },
    }
    with pytest.raises(ConfigError) as caught:
        build_stream(resource, lambda namespace, name, key: None)
    assert caught.value.reason == "InvalidSpec"
    assert caught.value.message.startswith("spec.auth.oidc: not a JSON Web Key Set")
