"""Field names and what they point at in an audit event: both spellings, lists and `*`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auditwatch import paths
from auditwatch.schema import TYPED_BY_COLUMN, TYPED_FIELDS, TypedField

CONFIGMAP_EVENT: dict[str, Any] = {
    "verb": "create",
    "user": {"username": "alice", "groups": ["dev", None, "system:authenticated"]},
    "objectRef": {"resource": "configmaps", "namespace": "payments", "name": "s3"},
    "requestObject": {
        "metadata": {"name": "s3", "labels": {"app": "uploader", "tier": None}},
        "data": {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "bucket": "exports"},
    },
}


# --- split_name: template and CLI names as rule segments ----------------------------------------


@pytest.mark.parametrize(
    ("name", "segments"),
    [
        ("verb", ("verb",)),
        ("objectRef.resource", ("objectRef", "resource")),
        ("objectRef_resource", ("objectRef_resource",)),
        ("requestObject.spec.hostNetwork", ("requestObject", "spec", "hostNetwork")),
        ("requestObject.data.*", ("requestObject", "data", "*")),
        # A dotted name keeps the underscores of its keys.
        ("requestObject.data.aws_access_key_id", ("requestObject", "data", "aws_access_key_id")),
    ],
)
def test_split_name(name: str, segments: tuple[str, ...]) -> None:
    assert paths.split_name(name) == segments


# --- event_path: flattened names expanded, dotted paths as written ------------------------------


@pytest.mark.parametrize(
    ("segments", "path"),
    [
        (("objectRef_resource",), ("objectRef", "resource")),
        (("user_username",), ("user", "username")),
        (("requestObject_spec_hostNetwork",), ("requestObject", "spec", "hostNetwork")),
        (("requestObject__spec_",), ("requestObject", "spec")),  # empty parts are no keys
        (("verb",), ("verb",)),
        (("objectRef", "resource"), ("objectRef", "resource")),
        # Only a single segment is a flattened name: dotted keys keep their underscores.
        (("data", "aws_access_key_id"), ("data", "aws_access_key_id")),
        (("requestObject", "data", "*"), ("requestObject", "data", "*")),
    ],
)  # fmt: skip
def test_event_path(segments: tuple[str, ...], path: tuple[str, ...]) -> None:
    assert paths.event_path(segments) == path


@pytest.mark.parametrize("typed", TYPED_FIELDS, ids=lambda typed: typed.column)
def test_both_spellings_of_every_typed_column_name_it(typed: TypedField) -> None:
    assert paths.typed_field((typed.column,)) is typed
    assert paths.typed_field(typed.path) is typed
    assert paths.event_path((typed.column,)) == typed.path


@pytest.mark.parametrize(
    "segments",
    [
        ("requestObject", "spec"),
        ("requestObject_spec_hostNetwork",),
        ("annotations", "authorization.k8s.io/decision"),  # a key of the map, not the column
        ("user", "*"),
        ("objectRef", "*"),
        ("missing",),
    ],
)
def test_fields_without_a_typed_column(segments: tuple[str, ...]) -> None:
    assert paths.typed_field(segments) is None


def test_typed_field_of_a_flattened_name_is_the_column() -> None:
    assert paths.typed_field(("responseStatus_code",)) is TYPED_BY_COLUMN["responseStatus_code"]
    assert paths.typed_field(("responseStatus", "code")) is TYPED_BY_COLUMN["responseStatus_code"]


# --- walk: every value at a path --------------------------------------------------------------


def walked(value: Any, *path: str) -> list[Any]:
    return list(paths.walk(value, path))


def test_walk_follows_keys_to_one_value() -> None:
    assert walked(CONFIGMAP_EVENT, "objectRef", "resource") == ["configmaps"]
    assert walked(CONFIGMAP_EVENT, "requestObject", "metadata") == [
        CONFIGMAP_EVENT["requestObject"]["metadata"]
    ]
    assert walked({"a": False}, "a") == [False]  # a false value is still a value
    assert walked({"a": 0}, "a") == [0]


def test_walk_yields_nothing_for_missing_null_or_non_object_steps() -> None:
    assert walked(CONFIGMAP_EVENT, "objectRef", "subresource") == []
    assert walked(CONFIGMAP_EVENT, "missing", "deeper") == []
    assert walked({"a": None}, "a") == []
    assert walked({"a": "text"}, "a", "b") == []  # no keys inside a string
    assert walked({"a": 5}, "a", "b") == []
    assert walked(None, "a") == []


def test_walk_descends_into_every_element_of_lists() -> None:
    spec = {
        "containers": [
            {"image": "nginx", "securityContext": {"privileged": True}},
            {"image": "busybox"},
            {"image": None},
            "not an object",
        ]
    }
    assert walked(spec, "containers", "image") == ["nginx", "busybox"]
    assert walked(spec, "containers", "securityContext", "privileged") == [True]
    # A list at the end contributes its non-null elements, nested lists flattened.
    assert walked({"groups": ["a", None, "b"]}, "groups") == ["a", "b"]
    assert walked({"x": [[1, 2], [], [[3]], None]}, "x") == [1, 2, 3]
    assert walked({"x": [{"y": [1, {"z": 2}]}, [{"y": 3}]]}, "x", "y") == [1, {"z": 2}, 3]
    assert walked({"x": []}, "x") == []


def test_star_yields_every_value_of_an_object() -> None:
    assert walked(CONFIGMAP_EVENT, "requestObject", "data", "*") == [
        "AKIAIOSFODNN7EXAMPLE",
        "exports",
    ]
    assert walked(CONFIGMAP_EVENT, "requestObject", "metadata", "labels", "*") == ["uploader"]
    assert walked({"data": {}}, "data", "*") == []
    # Like a list, a value that is itself a list contributes its elements.
    assert walked({"data": {"a": ["x", "y"], "b": "z"}}, "data", "*") == ["x", "y", "z"]


def test_star_continues_below_each_value() -> None:
    containers = {
        "web": {"image": "nginx", "ports": [80, 443]},
        "sidecar": {"image": "envoy"},
        "empty": {},
        "text": "no keys here",
    }
    assert walked(containers, "*", "image") == ["nginx", "envoy"]
    assert walked(containers, "*", "ports") == [80, 443]
    assert walked({"a": {"x": 1, "y": {"z": 2}}, "b": {"w": 3}}, "*", "*") == [1, {"z": 2}, 3]


def test_star_walks_every_element_of_a_list_of_objects() -> None:
    rules = [{"verbs": ["get"], "labels": {"a": "1"}}, {"labels": {"b": "2", "c": "3"}}]
    assert walked({"rules": rules}, "rules", "labels", "*") == ["1", "2", "3"]
    assert walked({"rules": rules}, "rules", "*") == ["get", {"a": "1"}, {"b": "2", "c": "3"}]


def test_star_on_a_value_that_is_not_an_object_yields_nothing() -> None:
    assert walked({"data": "AKIAIOSFODNN7EXAMPLE"}, "data", "*") == []
    assert walked({"data": 5}, "data", "*") == []
    assert walked({"data": None}, "data", "*") == []
    assert walked({}, "data", "*") == []


def test_a_key_literally_named_star_cannot_be_addressed_alone() -> None:
    """`*` always means every key, so a key named `*` is found only together with its siblings."""
    assert walked({"*": "star", "a": "other"}, "*") == ["star", "other"]


# --- lookup: what message templates show ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("user.username", ["alice"]),
        ("user_username", ["alice"]),
        ("objectRef_namespace", ["payments"]),
        ("user.groups", ["dev", "system:authenticated"]),
        ("requestObject.data.*", ["AKIAIOSFODNN7EXAMPLE", "exports"]),
        ("requestObject.data.bucket", ["exports"]),
        ("requestObject_metadata_labels_app", ["uploader"]),
        ("objectRef.subresource", []),
        ("nothing_here", []),
    ],
)
def test_lookup(name: str, values: list[Any]) -> None:
    assert paths.lookup(CONFIGMAP_EVENT, name) == values


def test_lookup_on_a_real_event(samples: Path) -> None:
    event = json.loads((samples / "privileged-pod.log").read_text().splitlines()[0])
    images = [container["image"] for container in event["requestObject"]["spec"]["containers"]]
    assert paths.lookup(event, "requestObject.spec.containers.image") == images
    assert paths.lookup(event, "objectRef_resource") == ["pods"]
    assert paths.lookup(event, "requestObject.spec.containers.securityContext.*") == [True]
    annotations = event["requestObject"]["metadata"]["annotations"]
    assert paths.lookup(event, "requestObject.metadata.annotations.*") == list(annotations.values())
