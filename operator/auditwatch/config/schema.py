"""The AuditStream and AuditAlert schemas, read from the CRDs under crds/.

The CRD files are the one source of truth: the apiserver validates with them, and so do
`auditwatch lint` and the standalone file loader, through `validate` here. Problems come back as
`path: what is wrong` lines a user can act on, not as raw JSON-Schema messages.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import yaml

GROUP = "auditwatch.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_FILES = {"AuditStream": "auditstreams.yaml", "AuditAlert": "auditalerts.yaml"}
"""Kind -> CRD file name, in crds/ of a checkout or auditwatch/data/ of an installed package."""
KINDS = tuple(CRD_FILES)

DURATION_PATTERN = (
    r"^ *([0-9]+ *(ms|msecs?|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?|w|weeks?) *)+$"
)
"""Parseable's durations ("10s", "3m 20s") and Go's ("1h30m"); every duration field of the CRDs
uses exactly this pattern (RE2 and Python `re` read it alike)."""

_DURATION_PART = re.compile(r"([0-9]+) *([a-z]+)")
_UNITS = {
    **dict.fromkeys(("ms", "msec", "msecs"), timedelta(milliseconds=1)),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), timedelta(seconds=1)),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), timedelta(minutes=1)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), timedelta(hours=1)),
    **dict.fromkeys(("d", "day", "days"), timedelta(days=1)),
    **dict.fromkeys(("w", "week", "weeks"), timedelta(weeks=1)),
}

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
HEADER_NAME = r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$"

PATTERN_MEANINGS = {
    DURATION_PATTERN: "a duration like 10s, 3m 20s, 1h30m or 7d",
    DNS_SUBDOMAIN: "a lowercase DNS name (a-z, 0-9, '-', '.')",
    DNS_LABEL: "a lowercase DNS label (a-z, 0-9, '-'; at most 63 characters)",
    r"^[-._a-zA-Z0-9]+$": "a Secret key (letters, digits, '-', '_', '.')",
    r"^https?://": "an http:// or https:// URL",
    HEADER_NAME: "an HTTP header name",
    r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$": "a CamelCase reason",
    (
        r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
    ): "a condition type",
}
"""What each pattern of the CRDs means, for messages (a test checks every pattern is here)."""

_JSON_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
}


class DurationError(ValueError):
    """A duration string that cannot be read."""


class CrdNotFoundError(FileNotFoundError):
    """Neither a checkout's crds/ nor the installed package data has the CRD file."""


def parse_duration(text: str) -> timedelta:
    """`text` ("10s", "3m 20s", "1h30m", "7d") as a timedelta."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise DurationError(
            f"{text!r} is not a duration: write numbers with units (ms, s, m, h, d, w), "
            "e.g. 10s, 3m 20s, 1h30m"
        )
    total = timedelta()
    try:
        for number, unit in _DURATION_PART.findall(text):
            total += int(number) * _UNITS[unit]
    except OverflowError:
        raise DurationError(f"{text!r} is too long a duration") from None
    return total


def crd_text(kind: str) -> str:
    """The CRD YAML of `kind`: from the checkout's crds/, else from the package's data/."""
    filename = CRD_FILES[kind]
    checkout = Path(__file__).resolve().parents[3] / "crds" / filename
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    packaged = importlib.resources.files("auditwatch") / "data" / filename
    try:
        return packaged.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CrdNotFoundError(
            f"CRD file {filename} is neither in {checkout.parent} nor packaged in auditwatch/data"
        ) from None


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """The parsed CustomResourceDefinition of `kind`."""
    document = yaml.safe_load(crd_text(kind))
    if not isinstance(document, dict):
        raise ValueError(f"the CRD file of {kind} does not hold a CustomResourceDefinition")
    return document


def openapi_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the served version of `kind` (do not modify it)."""
    for version in crd(kind)["spec"]["versions"]:
        if version["name"] == VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise ValueError(f"the CRD of {kind} has no version {VERSION}")


EXACTLY_ONE_OF: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    "AuditStream": {("spec", "auth"): ("basic", "bearer", "clientCertificate", "oidc")},
    "AuditAlert": {
        ("spec", "targets", "[]"): ("endpoint", "endpointSecretRef"),
        ("spec", "exceptions", "{}"): ("fields", "trustList"),
    },
}
"""Objects that need exactly one of some fields, by path ("[]" an item, "{}" a map's value).

Not in the CRDs: a CRD's oneOf makes the apiserver (1.20 at least) answer a typo with
`<nil>: Invalid value: "": "spec.targets" must validate one and only one schema (oneOf)`.
Here they make `path: set one of a, b` lines; the operator shows them as the resource's
InvalidSpec condition, and `kubectl apply` names a misspelt field itself."""


def _json_schema(node: Any, one_of: Mapping[tuple[str, ...], tuple[str, ...]]) -> Any:
    """An OpenAPI (structural) schema as Draft 7 JSON Schema, with `one_of` (see
    EXACTLY_ONE_OF) added where its paths point.

    Structural schemas prune unknown fields silently; here they are errors instead (what
    `kubectl apply --validate=strict` does), so typos like `skipTLSCheck` are caught.
    """

    def convert(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        result: dict[str, Any] = {}
        for key, value in node.items():
            if key == "properties":
                result[key] = {name: convert(child, (*path, name)) for name, child in value.items()}
            elif key in ("items", "additionalProperties"):
                result[key] = convert(value, (*path, "[]" if key == "items" else "{}"))
            elif not key.startswith("x-kubernetes-"):
                result[key] = value
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            result["additionalProperties"] = False
        if path in one_of:
            result["oneOf"] = [{"required": [name]} for name in one_of[path]]
        return result

    return convert(node, ())


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_json_schema(openapi_schema(kind), EXACTLY_ONE_OF[kind]))


def field_path(segments: Any) -> str:
    """`spec.targets[0].headers["X-Team"]` from a sequence of keys and indexes."""
    text = ""
    for segment in segments:
        if isinstance(segment, int):
            text += f"[{segment}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", segment):
            text += f".{segment}" if text else segment
        else:
            text += f'["{segment}"]'
    return text


def _describe(error: jsonschema.ValidationError) -> list[str]:
    """One or more `path: problem` lines for a JSON-Schema error."""
    path = list(error.absolute_path)
    where = field_path(path) or "resource"
    instance = error.instance
    kind, expected = error.validator, error.validator_value
    if kind == "required":
        return [
            f"{field_path([*path, name])}: required field is missing"
            for name in expected
            if name not in instance
        ]
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        return [
            f"{field_path([*path, name])}: unknown field" for name in instance if name not in known
        ]
    if kind == "oneOf" and all(set(branch) == {"required"} for branch in expected):
        names = [name for branch in expected for name in branch["required"]]
        given = [name for name in names if name in instance]
        if given:
            return [f"{where}: set only one of {', '.join(names)} (got {', '.join(given)})"]
        return [f"{where}: set one of {', '.join(names)}"]
    if kind == "type":
        return [f"{where}: must be {_JSON_TYPES.get(str(expected), expected)} (got {instance!r})"]
    if kind == "enum":
        return [f"{where}: must be one of {', '.join(map(str, expected))} (got {instance!r})"]
    if kind == "pattern":
        meaning = PATTERN_MEANINGS.get(expected, f"text matching {expected}")
        return [f"{where}: {instance!r} is not {meaning}"]
    if kind == "minimum":
        return [f"{where}: must be at least {expected} (got {instance!r})"]
    if kind == "maximum":
        return [f"{where}: must be at most {expected} (got {instance!r})"]
    if kind == "minLength":
        return [f"{where}: must not be empty" if expected == 1 else f"{where}: too short"]
    if kind == "maxLength":
        return [f"{where}: longer than {expected} characters"]
    if kind == "maxItems":
        return [f"{where}: more than {expected} entries"]
    return [f"{where}: {error.message}"]


def validate(resource: Any) -> list[str]:
    """Every problem of an AuditStream / AuditAlert document, as `path: problem` lines.

    Covers apiVersion, kind, metadata.name (and namespace), and the spec against the CRD schema.
    An empty list means the document is fit for `apply_defaults` and the builders.
    """
    if not isinstance(resource, Mapping):
        return [f"resource: must be a mapping (got {type(resource).__name__})"]
    kind = resource.get("kind")
    if kind not in CRD_FILES:
        return [f"kind: unknown kind {kind!r} (expected {' or '.join(KINDS)})"]
    problems: list[str] = []
    if resource.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION} (got {resource.get('apiVersion')!r})")
    metadata = resource.get("metadata")
    if not isinstance(metadata, Mapping) or "name" not in metadata:
        problems.append("metadata.name: required field is missing")
    else:
        problems.extend(_metadata_problems(kind, metadata))
    for error in _validator(kind).iter_errors(dict(resource)):
        problems.extend(line for line in _describe(error) if line not in problems)
    return sorted(problems)


def _metadata_problems(kind: str, metadata: Mapping[str, Any]) -> list[str]:
    """Name rules the apiserver enforces, checked here for files that never reach one."""
    problems = []
    name = metadata["name"]
    if not isinstance(name, str) or len(name) > 253 or not re.fullmatch(DNS_SUBDOMAIN, name):
        problems.append(f"metadata.name: {name!r} is not {PATTERN_MEANINGS[DNS_SUBDOMAIN]}")
    namespace = metadata.get("namespace")
    if (
        kind == "AuditAlert"
        and namespace is not None
        and not (
            isinstance(namespace, str)
            and len(namespace) <= 63
            and re.fullmatch(DNS_LABEL, namespace)
        )
    ):
        problems.append(f"metadata.namespace: {namespace!r} is not a namespace name")
    return problems


def apply_defaults(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a valid resource with the schema's defaults filled in, as the apiserver would."""
    defaulted: dict[str, Any] = _defaulted(
        copy.deepcopy(dict(resource)), openapi_schema(resource["kind"])
    )
    return defaulted


def _defaulted(value: Any, schema: Mapping[str, Any]) -> Any:
    """`value` with missing defaulted properties added, at every depth (in place)."""
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties:
            for name, subschema in properties.items():
                if name not in value and "default" in subschema:
                    value[name] = copy.deepcopy(subschema["default"])
            for name, item in value.items():
                if name in properties:
                    value[name] = _defaulted(item, properties[name])
    elif isinstance(value, list) and "items" in schema:
        return [_defaulted(item, schema["items"]) for item in value]
    return value
