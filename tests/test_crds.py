"""The CRDs under crds/: what the apiserver insists on (structural schemas), what kubectl shows."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from auditwatch.config import model, schema

KINDS = ("AuditStream", "AuditAlert")
JUNCTORS = ("oneOf", "anyOf", "allOf", "not")
DURATION_FIELDS = {"retention", "timeout", "interval", "resolveAfter"}


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below `node` (junctor branches excluded), with its path."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from nodes(node["items"], f"{path}[]")


def all_nodes() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for kind in KINDS:
        for path, node in nodes(schema.openapi_schema(kind)):
            yield kind, path, node


@pytest.mark.parametrize(
    ("kind", "scope", "plural", "short_name"),
    [
        ("AuditStream", "Cluster", "auditstreams", "austream"),
        ("AuditAlert", "Namespaced", "auditalerts", "aualert"),
    ],
)
def test_crd_names_scope_and_version(kind: str, scope: str, plural: str, short_name: str) -> None:
    crd = schema.crd(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{plural}.auditwatch.dev"
    assert crd["spec"]["group"] == "auditwatch.dev"
    assert crd["spec"]["scope"] == scope
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["listKind"]) == (kind, plural, f"{kind}List")
    assert short_name in names["shortNames"]
    assert "auditwatch" in names["categories"]
    [version] = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_every_node_has_a_type_unless_it_preserves_unknown_fields() -> None:
    untyped = [
        f"{kind}{path}"
        for kind, path, node in all_nodes()
        if not node.get("type")
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and not node.get("x-kubernetes-int-or-string")
    ]
    assert untyped == []


def test_objects_are_described_and_maps_are_typed() -> None:
    for kind, path, node in all_nodes():
        if node.get("type") != "object" or path == ".metadata":
            continue
        has_properties = "properties" in node
        has_map = isinstance(node.get("additionalProperties"), dict)
        assert has_properties != has_map, f"{kind}{path}: needs properties xor additionalProperties"
        for name in node.get("required", []):
            assert name in node.get("properties", {}), f"{kind}{path}: requires unknown {name}"


def test_junctors_only_hold_value_validations() -> None:
    """Structural rule: no type/description/default inside oneOf & co, nor new properties."""
    forbidden = {"type", "description", "default", "additionalProperties", "nullable"}
    found = 0
    for kind, path, node in all_nodes():
        for junctor in JUNCTORS:
            branches = node.get(junctor)
            if branches is None:
                continue
            found += 1
            for branch in branches if isinstance(branches, list) else [branches]:
                assert not forbidden & set(branch), f"{kind}{path}.{junctor}: {branch}"
                for name in [*branch.get("required", []), *branch.get("properties", {})]:
                    assert name in node["properties"], f"{kind}{path}.{junctor}: {name}"
    assert found >= 1  # a trust list entry's identities: the schema is really walked


def test_exactly_one_of_names_fields_the_crds_have() -> None:
    """The checks kept out of the CRDs (schema.EXACTLY_ONE_OF) point at real objects and
    fields: a renamed field would otherwise drop its check unseen."""
    for kind, checks in schema.EXACTLY_ONE_OF.items():
        for path, names in checks.items():
            node = schema.openapi_schema(kind)
            for segment in path:
                node = {"[]": node.get("items"), "{}": node.get("additionalProperties")}.get(
                    segment, node.get("properties", {}).get(segment)
                )
                assert isinstance(node, dict), f"{kind} {path}: no {segment}"
            assert set(names) <= set(node["properties"]), f"{kind} {path}: {names}"
            assert "oneOf" not in node, f"{kind} {path}: the apiserver would answer <nil>: ..."


def test_root_metadata_is_left_to_the_apiserver() -> None:
    for kind in KINDS:
        root = schema.openapi_schema(kind)
        assert root["properties"]["metadata"] == {"type": "object"}
        assert "default" not in root


def test_defaults_are_valid_for_their_own_field() -> None:
    checked = 0
    for _, _, node in all_nodes():
        if "default" in node:
            jsonschema.validate(node["default"], schema._json_schema(node, {}))
            checked += 1
    assert checked >= 8


def test_list_maps_have_required_keys() -> None:
    for kind, path, node in all_nodes():
        if node.get("x-kubernetes-list-type") == "map":
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in node["items"]["required"], f"{kind}{path}: {key}"


def test_every_pattern_compiles_has_a_meaning_and_avoids_non_re2_syntax() -> None:
    for kind, path, node in all_nodes():
        pattern = node.get("pattern")
        if pattern is None:
            continue
        re.compile(pattern)
        assert "(?" not in pattern and "\\d" not in pattern, f"{kind}{path}: not RE2-safe"
        assert pattern in schema.PATTERN_MEANINGS, f"{kind}{path}: no message for {pattern}"


def test_duration_fields_share_the_one_duration_pattern() -> None:
    durations = [
        (kind, path, node)
        for kind, path, node in all_nodes()
        if path.rsplit(".", 1)[-1] in DURATION_FIELDS
    ]
    assert len(durations) == 4
    for kind, path, node in durations:
        assert node["type"] == "string"
        assert node["pattern"] == schema.DURATION_PATTERN, f"{kind}{path}"


def test_condition_schema_is_metav1_condition_and_the_same_in_both_crds() -> None:
    stream = schema.openapi_schema("AuditStream")["properties"]["status"]["properties"]
    alert = schema.openapi_schema("AuditAlert")["properties"]["status"]["properties"]
    assert stream["conditions"] == alert["conditions"]
    item = alert["conditions"]["items"]
    assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_crd_defaults_are_the_models_defaults() -> None:
    alert = schema.openapi_schema("AuditAlert")["properties"]["spec"]["properties"]
    target = alert["targets"]["items"]["properties"]
    repeat = target["repeat"]["properties"]
    assert schema.parse_duration(repeat["interval"]["default"]) == model.DEFAULT_REPEAT_INTERVAL
    assert repeat["times"]["default"] == model.DEFAULT_REPEAT_TIMES
    assert schema.parse_duration(target["timeout"]["default"]) == model.DEFAULT_TARGET_TIMEOUT
    assert schema.parse_duration(alert["resolveAfter"]["default"]) == model.DEFAULT_RESOLVE_AFTER
    limits = schema.openapi_schema("AuditStream")["properties"]["spec"]["properties"]["limits"]
    assert limits["properties"]["maxBodyBytes"]["default"] == model.DEFAULT_MAX_BODY_BYTES
    assert limits["properties"]["maxEventBytes"]["default"] == model.DEFAULT_MAX_EVENT_BYTES


def schema_at(kind: str, json_path: str) -> dict[str, Any]:
    """The schema node a printer column's JSONPath reads (filters like [?(...)] step into items)."""
    node = schema.openapi_schema(kind)
    for segment in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).strip(".").split("."):
        name, _, rest = segment.partition("[")
        node = node["properties"][name]
        if rest:
            node = node["items"]
    return node


@pytest.mark.parametrize(
    ("kind", "columns"),
    [
        ("AuditStream", ["Ready", "Events", "Last Event", "Age"]),
        ("AuditAlert", ["Stream", "State", "Matches", "Last Match", "Age"]),
    ],
)
def test_printer_columns_read_fields_that_exist_with_matching_types(
    kind: str, columns: list[str]
) -> None:
    printer = schema.crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [column["name"] for column in printer] == columns
    for column in printer:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = schema_at(kind, column["jsonPath"])
        expected = {"date": ("string", "date-time"), "integer": ("integer", "int64")}.get(
            column["type"], ("string", None)
        )
        assert (node["type"], node.get("format")) == expected, column


def test_ready_column_reads_the_ready_condition() -> None:
    [ready] = [
        column
        for column in schema.crd("AuditStream")["spec"]["versions"][0]["additionalPrinterColumns"]
        if column["name"] == "Ready"
    ]
    assert ready["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def test_required_fields() -> None:
    spec = schema.openapi_schema("AuditAlert")["properties"]["spec"]
    assert set(spec["required"]) == {"stream", "message", "rule"}
    assert set(spec["properties"]["rule"]["required"]) == {"type", "config"}
    assert spec["properties"]["targets"]["items"]["required"] == ["type"]


def alert(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditAlert",
        "metadata": {"name": "a"},
        "spec": {"stream": "s", "message": "m", "rule": {"type": "composite", "config": "x = 1"}}
        | spec,
    }


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        (alert(rule={"type": "regex", "config": "x"}), "spec.rule.type: must be one of"),
        (alert(targets=[{"type": "slack"}]), "spec.targets[0]: set one of endpoint"),
        (alert(severity="urgent"), "spec.severity: must be one of info"),
        (alert(resolveAfter="soon"), "spec.resolveAfter: 'soon' is not a duration"),
        (alert(labels={"team": 3}), "spec.labels.team: must be a string"),
        (
            alert(targets=[{"type": "webhook", "endpoint": "h", "headers": {"X-A": 1}}]),
            'spec.targets[0].headers["X-A"]: must be a string',
        ),
        (alert(stream="Bad_Name"), "spec.stream: 'Bad_Name' is not a lowercase DNS name"),
    ],
)
def test_invalid_documents_fail_with_the_path_of_the_problem(
    resource: dict[str, Any], problem: str
) -> None:
    problems = schema.validate(resource)
    assert any(line.startswith(problem) for line in problems), problems


def test_installed_package_reads_the_crds_from_its_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Outside a checkout (no crds/ beside the package) the packaged copy is used."""
    checkout_text = schema.crd_text("AuditStream")
    monkeypatch.setattr(schema, "__file__", str(tmp_path / "lib/auditwatch/config/schema.py"))
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path / package)
    (tmp_path / "auditwatch/data").mkdir(parents=True)
    (tmp_path / "auditwatch/data/auditstreams.yaml").write_text(checkout_text)
    assert schema.crd_text("AuditStream") == checkout_text
    with pytest.raises(schema.CrdNotFoundError, match=r"auditalerts\.yaml"):
        schema.crd_text("AuditAlert")


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("AuditAlert", ".spec"),
        ("AuditAlert", ".spec.rule.type"),
        ("AuditAlert", ".spec.targets[].type"),
        ("AuditAlert", ".spec.severity"),
        ("AuditAlert", ".status.state"),
        ("AuditStream", ".spec"),
    ],
)
def test_kubectl_explain_has_a_description_for(kind: str, path: str) -> None:
    """Issue #11 item 9: `kubectl explain` showed nothing for these."""
    described = dict(nodes(schema.openapi_schema(kind)))
    assert described[path].get("description"), f"{kind}{path}"
