"""The vectorised evaluator and the per-event reference give the same, expected answers."""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditwatch.normalise import EventBatch, from_table, normalise
from auditwatch.rules import evaluate, reference
from auditwatch.rules.ast import (
    SET_OPS,
    Compare,
    Exists,
    Expr,
    Field,
    Not,
    Op,
    Scalar,
    conjunction,
    disjunction,
)
from auditwatch.rules.evaluate import DISTINCT_SHARE, compile_rule
from auditwatch.rules.parse import parse_expression

RECEIVED = datetime(2025, 1, 1, tzinfo=UTC)


LogReader = Callable[[str], list[dict[str, Any]]]


@pytest.fixture(scope="session")
def read_log(samples: Path) -> LogReader:
    """Reads a sample `.log` file: one audit event per line (cached: tests must not mutate)."""

    @functools.cache
    def read(name: str) -> list[dict[str, Any]]:
        lines = (samples / name).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    return read


def field(dotted: str) -> Field:
    return Field(tuple(dotted.split(".")))


def cmp(name: str | Field, op: Op, value: Any, ignore_case: bool = False) -> Compare:
    return Compare(field(name) if isinstance(name, str) else name, op, value, ignore_case)


def both(expr: Expr, events: list[dict[str, Any]]) -> list[bool]:
    """The rows `expr` matches, after checking both evaluators agree on them."""
    vectorised = compile_rule(expr).evaluate(normalise(events, RECEIVED))
    assert vectorised.null_count == 0
    assert len(vectorised) == len(events)
    expected = reference.filter_events(expr, events)
    assert vectorised.to_pylist() == expected
    return expected


def count(expr: Expr, events: list[dict[str, Any]]) -> int:
    return sum(both(expr, events))


ANNOTATION_DECISION = Field(("annotations", "authorization.k8s.io/decision"))
PRIVILEGED = "requestObject.spec.containers.securityContext.privileged"


# --- Real samples: counts verified by reading the files -------------------------------------


def test_the_eleven_403s_of_the_impersonation_log(read_log: LogReader) -> None:
    events = read_log("impersonation-and-403s.log")
    assert count(cmp("responseStatus.code", Op.EQ, 403), events) == 11
    assert count(cmp("responseStatus_code", Op.EQ, 403), events) == 11
    assert count(cmp("responseStatus_code", Op.GE, 400), events) == 11
    denied_bob = conjunction(
        [cmp("responseStatus_code", Op.EQ, 403), cmp("impersonatedUser.username", Op.EQ, "bob")]
    )
    assert count(denied_bob, events) == 4
    denied_sa = conjunction(
        [
            cmp("responseStatus_code", Op.EQ, 403),
            cmp("impersonatedUser_username", Op.STARTS_WITH, "system:serviceaccount:"),
        ]
    )
    assert count(denied_sa, events) == 4


def test_secret_reconnaissance_then_exec(read_log: LogReader) -> None:
    events = read_log("secret-recon-then-exec.log")
    secret_reads = conjunction(
        [cmp("objectRef.resource", Op.EQ, "secrets"), cmp("verb", Op.IN, ("list", "get", "watch"))]
    )
    assert count(secret_reads, events) == 2  # RequestReceived and ResponseComplete
    assert count(cmp("objectRef_subresource", Op.EQ, "exec"), events) == 2
    assert count(cmp("responseStatus.code", Op.EQ, 101), events) == 2
    assert count(cmp(ANNOTATION_DECISION, Op.EQ, "forbid"), events) == 2
    assert count(cmp(ANNOTATION_DECISION, Op.EQ, "allow"), events) == 12
    # The RequestReceived event has no annotations: `exists` and `!=` are false on it.
    assert count(Exists(ANNOTATION_DECISION), events) == 14
    assert count(cmp(ANNOTATION_DECISION, Op.NE, "forbid"), events) == 12
    recon = conjunction(
        [
            cmp("user.username", Op.EQ, "mayor-malware"),
            cmp("objectRef.resource", Op.IN, ("roles", "rolebindings")),
        ]
    )
    assert count(recon, events) == 6  # list + 2 get, each of roles and rolebindings


def test_exec_into_pods_across_the_samples(read_log: LogReader) -> None:
    exec_rule = conjunction(
        [cmp("objectRef.resource", Op.EQ, "pods"), cmp("objectRef.subresource", Op.EQ, "exec")]
    )
    assert count(exec_rule, read_log("pod-exec.log")) == 1
    assert count(exec_rule, read_log("sekoia-mixed.log")) == 1
    assert count(exec_rule, read_log("impersonation-and-403s.log")) == 0


def test_privileged_container_hostnetwork_and_hostpath(read_log: LogReader) -> None:
    assert count(cmp(PRIVILEGED, Op.EQ, True), read_log("privileged-pod.log")) == 1
    sekoia = read_log("sekoia-mixed.log")
    assert count(cmp(PRIVILEGED, Op.EQ, True), sekoia) == 1
    assert count(cmp("requestObject.spec.hostNetwork", Op.EQ, True), sekoia) == 1
    assert count(cmp("requestObject_spec_hostNetwork", Op.EQ, True), sekoia) == 1
    assert count(Exists(field("requestObject.spec.volumes.hostPath.path")), sekoia) == 1
    binding = conjunction(
        [cmp("verb", Op.EQ, "create"), cmp("objectRef_resource", Op.EQ, "clusterrolebindings")]
    )
    assert count(binding, sekoia) == 2
    # `true` is a boolean, not the text "true" nor the number 1.
    assert count(cmp(PRIVILEGED, Op.EQ, "true"), sekoia) == 0
    assert count(cmp(PRIVILEGED, Op.EQ, 1), sekoia) == 0


def test_stored_concatenated_and_sliced_batches_give_the_same_answers(read_log: LogReader) -> None:
    sekoia, recon = read_log("sekoia-mixed.log"), read_log("secret-recon-then-exec.log")
    events = sekoia + recon
    rule = disjunction(
        [
            cmp(PRIVILEGED, Op.EQ, True),
            conjunction([cmp("verb", Op.EQ, "list"), cmp(ANNOTATION_DECISION, Op.EQ, "forbid")]),
            cmp("user.groups", Op.EQ, "system:masters", ignore_case=True),
        ]
    )
    expected = reference.filter_events(rule, events)
    assert sum(expected) == 7  # 5 minikube-user events in system:masters, 2 forbidden lists
    compiled = compile_rule(rule)
    stored = from_table(normalise(events, RECEIVED).table)
    assert compiled.evaluate(stored).to_pylist() == expected
    chunked = EventBatch.concat([normalise(sekoia, RECEIVED), normalise(recon, RECEIVED)])
    assert chunked.table.column("verb").num_chunks == 2
    assert compiled.evaluate(chunked).to_pylist() == expected
    whole = normalise(events, RECEIVED)
    sliced = EventBatch(whole.table.slice(3, 10), events[3:13])
    assert compiled.evaluate(sliced).to_pylist() == expected[3:13]


@pytest.mark.parametrize(
    ("log", "text", "expected"),
    [
        ("impersonation-and-403s.log", "responseStatus_code = 403", 11),
        ("impersonation-and-403s.log", '!(responseStatus_code = 403) and verb = "list"', 3),
        ("secret-recon-then-exec.log", 'objectRef_resource = "secrets" and verb = "list"', 2),
        (
            "secret-recon-then-exec.log",
            'annotations["authorization.k8s.io/decision"] = "forbid"',
            2,
        ),
        ("sekoia-mixed.log", "requestObject.spec.hostNetwork = true", 1),
        ("sekoia-mixed.log", f'objectRef.subresource = "exec" or {PRIVILEGED} = true', 2),
    ],
)
def test_rule_texts_on_the_samples(log: str, text: str, expected: int, read_log: LogReader) -> None:
    assert count(parse_expression(text), read_log(log)) == expected


# --- Language semantics ---------------------------------------------------------------------


def test_missing_field_fails_every_comparison_and_its_negation_holds(read_log: LogReader) -> None:
    events = read_log("impersonation-and-403s.log")  # no subresource, no annotations anywhere
    for op, value in [
        (Op.NE, "exec"),
        (Op.NOT_CONTAINS, "x"),
        (Op.NOT_REGEX, "x"),
        (Op.NOT_IN, ("exec",)),
        (Op.NE, 5),
    ]:
        rule = cmp("objectRef.subresource", op, value)
        assert count(rule, events) == 0
        assert count(Not(rule), events) == len(events)
    assert count(cmp(ANNOTATION_DECISION, Op.NE, "allow"), events) == 0
    assert count(Not(Exists(field("requestObject.spec"))), events) == len(events)


def pod(
    containers: list[dict[str, Any]], init: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers}
    if init is not None:
        spec["initContainers"] = init
    return {"verb": "create", "objectRef": {"resource": "pods"}, "requestObject": {"spec": spec}}


def test_any_element_of_arrays_matches() -> None:
    plain = {"name": "a", "securityContext": {"privileged": False}}
    privileged = {"name": "b", "securityContext": {"privileged": True}}
    events = [
        pod([plain, privileged]),
        pod([plain], init=[privileged]),
        pod([plain, {"name": "c"}]),
        pod([]),
    ]
    assert both(cmp(PRIVILEGED, Op.EQ, True), events) == [True, False, False, False]
    init_privileged = cmp(
        "requestObject.spec.initContainers.securityContext.privileged", Op.EQ, True
    )
    assert both(init_privileged, events) == [False, True, False, False]
    # Any element: some container is not privileged in the first event too.
    assert both(cmp(PRIVILEGED, Op.NE, True), events) == [True, True, True, False]
    assert both(Exists(field("requestObject.spec.containers.name")), events) == [
        True,
        True,
        True,
        False,
    ]
    groups: list[dict[str, Any]] = [
        {"user": {"groups": ["dev", "system:masters"]}},
        {"user": {"groups": []}},
        {},
    ]
    assert both(cmp("user.groups", Op.EQ, "system:masters"), groups) == [True, False, False]
    assert both(cmp("user_groups", Op.STARTS_WITH, "dev"), groups) == [True, False, False]
    assert both(Exists(field("user.groups")), groups) == [True, False, False]


def test_type_clashes_are_false_not_errors() -> None:
    events: list[dict[str, Any]] = [
        {"verb": "get", "responseStatus": {"code": 403}},
        {"verb": 5, "responseStatus": {"code": "403"}},
        {"verb": True, "responseStatus": {"code": 403.0}},
        {"verb": ["get"], "responseStatus": {"code": True}},
        {"verb": None, "responseStatus": {"code": 2**63}},
    ]
    assert both(cmp("verb", Op.EQ, 5), events) == [False] * 5
    assert both(cmp("verb", Op.EQ, True), events) == [False] * 5
    assert both(cmp("verb", Op.NE, 5), events) == [False] * 5
    assert both(cmp("verb", Op.EQ, "get"), events) == [True, False, False, False, False]
    assert both(cmp("verb", Op.GT, "a"), events) == [False] * 5
    # Only a JSON integer in int64 range is a code; the rest read as missing, as in the column.
    assert both(cmp("responseStatus.code", Op.EQ, "403"), events) == [False] * 5
    assert both(cmp("responseStatus.code", Op.EQ, 403), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.GT, 2.5), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.LT, 403.5), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.EQ, 403.0), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.NE, math.nan), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.LT, 2**70), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.CONTAINS, "40"), events) == [False] * 5
    assert both(cmp("responseStatus.code", Op.IN, ("403", 403.0)), events) == [True] + [False] * 4
    assert both(cmp("responseStatus.code", Op.NOT_IN, ("403",)), events) == [False] * 5


def test_ignore_case(read_log: LogReader) -> None:
    events = read_log("secret-recon-then-exec.log")
    assert count(cmp("user.username", Op.EQ, "MAYOR-MALWARE", ignore_case=True), events) == 15
    assert count(cmp("user.username", Op.EQ, "MAYOR-MALWARE"), events) == 0
    assert count(cmp("objectRef.resource", Op.IN, ("SECRETS",), ignore_case=True), events) == 2
    assert count(cmp("user.username", Op.REGEX, "^MAYOR", ignore_case=True), events) == 15
    names: list[dict[str, Any]] = [
        {"user": {"username": "Straße"}},
        {"user": {"username": "STRASSE"}},
        {},
    ]
    assert both(cmp("user.username", Op.EQ, "strasse", ignore_case=True), names) == [
        True,
        True,
        False,
    ]


def test_regex_beyond_re2_keeps_python_semantics(read_log: LogReader) -> None:
    events = read_log("secret-recon-then-exec.log")
    assert count(cmp("user.username", Op.REGEX, "^(?=.*malware)mayor"), events) == 15
    assert count(cmp("verb", Op.REGEX, "^(?!get)"), events) == 8  # 15 events, 7 gets
    users: list[dict[str, Any]] = [
        {"user": {"username": "user\u0663"}},  # ARABIC-INDIC DIGIT THREE: a digit to Python
        {"user": {"username": "admin\n"}},  # Python's `$` matches before a final newline
        {"user": {"username": "{,3}"}},
    ]
    assert both(cmp("user.username", Op.REGEX, r"user\d"), users) == [True, False, False]
    assert both(cmp("user.username", Op.REGEX, "admin$"), users) == [False, True, False]
    assert both(cmp("user.username", Op.REGEX, "^x{,3}$"), users) == [False, False, False]
    # `$` ending a trailing group or branch (the library's `([/?]|$)`) still matches before a
    # final newline; followed by more of the pattern it means what it means to Python.
    assert both(cmp("user.username", Op.REGEX, "^admin([/?]|$)"), users) == [False, True, False]
    assert both(cmp("user.username", Op.REGEX, "admin$\n"), users) == [False, True, False]
    assert both(cmp("user.username", Op.REGEX, "(admin$|x)\n"), users) == [False, True, False]


@pytest.mark.parametrize("limit", [evaluate.MAX_KNOWN_VALUES, 5])
def test_text_tested_per_distinct_value_keeps_flags_and_case_apart(
    monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """Leaves differing only in case sensitivity or a pattern's flags remember their answers
    per distinct value separately, batch after batch, and start over at MAX_KNOWN_VALUES."""
    monkeypatch.setattr(evaluate, "MAX_KNOWN_VALUES", limit)
    uris = ["/API/v1/pods", "/api/v1/pods", "/healthz\n", "/healthz\n", "/z\nx", None]
    events = [{"requestURI": uri, "verb": "get"} for uri in uris] * DISTINCT_SHARE
    others = [{"requestURI": uri} for uri in ("/apis/x", "/API/", "z", "/Api/v1\nz")]
    batches = [events, events[::-1], others * DISTINCT_SHARE, events]
    encoded = evaluate._Context(normalise(events, RECEIVED)).distinct("requestURI")
    assert encoded is not None and len(encoded.values) == 4  # the per-value path is the one taken
    rules = [
        compile_rule(parse_expression(text))
        for text in (
            'requestURI ~ "^/api/"',
            'requestURI ~ "^/api/"i',
            'requestURI ~ "(?i)^/api/"',
            'requestURI ~ "(?m)z$"',
            'requestURI ~ "z$"',
            'requestURI =% "API"',
            'requestURI =% "API"i',
            'requestURI !% "API"',
            'requestURI !~ "^/api/"i',
        )
    ]
    for rows in batches:
        batch = normalise(rows, RECEIVED)
        answers = [rule.evaluate(batch).to_pylist() for rule in rules]
        assert answers == [reference.filter_events(rule.expr, rows) for rule in rules]
    assert answers[0][:6] == [False, True, False, False, False, False]
    assert answers[1][:6] == answers[2][:6] == [True, True, False, False, False, False]
    assert answers[3][:6] == [False, False, True, True, True, False]
    assert answers[4][:6] == [False, False, True, True, False, False]


def test_invalid_regex_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        compile_rule(cmp("verb", Op.REGEX, "("))


def test_annotations_that_are_not_text_are_answered_from_the_event() -> None:
    events: list[dict[str, Any]] = [
        {"annotations": {"a": ["forbid"]}},
        {"annotations": {"a": 5}},
        {"annotations": [{"a": "forbid"}]},
        {"annotations": {"a": "forbid"}},
        {"annotations": {}},
    ]
    key = Field(("annotations", "a"))
    assert both(cmp(key, Op.EQ, "forbid"), events) == [True, False, True, True, False]
    assert both(Exists(key), events) == [True, True, True, True, False]
    assert both(cmp(key, Op.EQ, 5), events) == [False, True, False, False, False]
    # `annotations` itself is a typed column: a list there is a type clash and reads as missing.
    assert both(Exists(Field(("annotations",))), events) == [True, True, False, True, True]


def configmap(data: Any) -> dict[str, Any]:
    return {"objectRef": {"resource": "configmaps"}, "requestObject": {"data": data}}


def test_a_star_segment_matches_any_value_of_an_object() -> None:
    events = [
        configmap({"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "bucket": "exports"}),
        configmap({"config.json": '{"id": "AKIAI44QH8DHBEXAMPLE"}'}),
        configmap({"LOG_LEVEL": "info"}),
        configmap({}),
        configmap({"a": None}),
        configmap("AKIAIOSFODNN7EXAMPLE"),  # not an object: `*` has nothing to walk
        configmap([{"k": "AKIAIOSFODNN7EXAMPLE"}, {"k": "x"}]),  # a list: each element's values
        configmap({"nested": {"k": "AKIAIOSFODNN7EXAMPLE"}}),  # `*` is one level, not any depth
        {"requestObject": {"data": {"*": "AKIAIOSFODNN7EXAMPLE"}}},  # a key named `*` is a key
        {},
    ]
    any_value = field("requestObject.data.*")
    assert both(cmp(any_value, Op.REGEX, "AKIA[0-9A-Z]{16}"), events) == [
        True, True, False, False, False, False, True, False, True, False,
    ]  # fmt: skip
    assert both(Exists(any_value), events) == [
        True, True, True, False, False, False, True, True, True, False,
    ]  # fmt: skip
    # Any value, as for lists: `!=` holds when some value differs; `not` when none matches.
    assert both(cmp(any_value, Op.NE, "info"), events) == [
        True, True, False, False, False, False, True, False, True, False,
    ]  # fmt: skip
    assert both(Not(cmp(any_value, Op.EQ, "info")), events) == [
        True, True, False, True, True, True, True, True, True, True,
    ]  # fmt: skip
    assert both(cmp("requestObject.data.*.k", Op.EQ, "AKIAIOSFODNN7EXAMPLE"), events) == [
        False, False, False, False, False, False, False, True, False, False,
    ]  # fmt: skip
    assert both(cmp("requestObject.data.*.*", Op.EQ, "AKIAIOSFODNN7EXAMPLE"), events) == [
        False, False, False, False, False, False, False, True, False, False,
    ]  # fmt: skip


def test_a_star_segment_takes_list_values_element_by_element() -> None:
    events: list[dict[str, Any]] = [
        {"requestObject": {"spec": {"a": {"ports": [80, 443]}, "b": {"ports": [8080]}}}},
        {"requestObject": {"spec": {"a": {"ports": []}}}},
        {"requestObject": {"spec": [{"a": {"ports": [22]}}, {"b": {"ports": [23]}}]}},
    ]
    assert both(cmp("requestObject.spec.*.ports", Op.EQ, 8080), events) == [True, False, False]
    assert both(cmp("requestObject.spec.*.ports", Op.LT, 1024), events) == [True, False, True]
    assert both(Exists(field("requestObject.spec.*.ports")), events) == [True, False, True]


def test_a_star_segment_on_the_real_samples(read_log: LogReader) -> None:
    events = read_log("secret-recon-then-exec.log")
    # The annotations hold the authorizer's decision and reason (and once two latencies).
    any_annotation = field("annotations.*")
    decision = count(cmp(ANNOTATION_DECISION, Op.EQ, "forbid"), events)
    assert count(cmp(any_annotation, Op.EQ, "forbid"), events) == decision == 2
    assert count(cmp(any_annotation, Op.STARTS_WITH, "RBAC: allowed by RoleBinding"), events) == 12
    assert count(cmp(any_annotation, Op.ENDS_WITH, "ms"), events) == 1
    assert count(Exists(any_annotation), events) == count(Exists(ANNOTATION_DECISION), events)
    assert count(Exists(any_annotation), events) == len(events) - 1  # RequestReceived: none
    sekoia = read_log("sekoia-mixed.log")
    assert count(cmp("requestObject.metadata.labels.*", Op.EQ, "priv-shell"), sekoia) == 1
    assert count(cmp("requestObject.metadata.annotations.*", Op.CONTAINS, "hostPath"), sekoia) == 1
    privileged = read_log("privileged-pod.log")
    any_security_setting = field("requestObject.spec.containers.securityContext.*")
    assert count(cmp(any_security_setting, Op.EQ, True), privileged) == 1
    assert count(cmp("requestObject.spec.containers.*", Op.EQ, "centos"), privileged) == 1


def test_a_star_field_reads_the_event_as_sent_not_the_typed_columns() -> None:
    events: list[dict[str, Any]] = [
        {"responseStatus": {"code": "403"}},  # text: null in the typed column
        {"responseStatus": {"code": 403}},
    ]
    assert both(cmp("responseStatus_code", Op.EQ, "403"), events) == [False, False]
    assert both(cmp("responseStatus.*", Op.EQ, "403"), events) == [True, False]
    assert both(cmp("responseStatus.*", Op.EQ, 403), events) == [False, True]


def test_annotations_star_is_every_annotation_not_a_key_named_star() -> None:
    events: list[dict[str, Any]] = [
        {"annotations": {"authorization.k8s.io/decision": "forbid"}},
        {"annotations": {"*": "allow", "b": "forbid"}},
        {"annotations": {"a": ["forbid"], "b": 5}},  # not text: not in the map column
        {"annotations": [{"a": "forbid"}]},
        {"annotations": {}},
        {},
    ]
    any_annotation = field("annotations.*")
    assert both(cmp(any_annotation, Op.EQ, "forbid"), events) == [
        True, True, True, True, False, False,
    ]  # fmt: skip
    assert both(cmp(any_annotation, Op.EQ, 5), events) == [
        False, False, True, False, False, False,
    ]  # fmt: skip
    assert both(Exists(any_annotation), events) == [True, True, True, True, False, False]
    bracketed = Field(("annotations", "*"))
    assert both(cmp(bracketed, Op.NE, "allow"), events) == [True, True, True, True, False, False]


class CountingEvents(list[dict[str, Any]]):
    """Events that remember which rows were read."""

    read: set[int]

    def __getitem__(self, index: Any) -> Any:
        self.read.add(index)
        return super().__getitem__(index)


def test_per_event_fields_are_only_read_on_rows_still_possible(read_log: LogReader) -> None:
    events = read_log("sekoia-mixed.log")
    counting = CountingEvents(events)
    counting.read = set()
    batch = EventBatch(normalise(events, RECEIVED).table, counting)
    rule = conjunction(
        [
            cmp("requestObject.spec.hostNetwork", Op.EQ, True),
            cmp("objectRef.resource", Op.EQ, "pods"),
        ]
    )
    assert compile_rule(rule).evaluate(batch).to_pylist() == reference.filter_events(rule, events)
    pods = {i for i, event in enumerate(events) if event["objectRef"]["resource"] == "pods"}
    assert counting.read == pods
    counting.read = set()
    either = disjunction([cmp(PRIVILEGED, Op.EQ, True), cmp("verb", Op.EQ, "create")])
    compile_rule(either).evaluate(batch)
    assert counting.read == {i for i, event in enumerate(events) if event["verb"] != "create"}


@given(numbers=st.sets(st.integers(0, 1499), max_size=200))
def test_row_sets_convert_both_ways(numbers: set[int]) -> None:
    """A few rows are taken off one by one, more found by scanning all bits: same rows."""
    rows = evaluate.rows_from(numbers, 1500)
    assert evaluate.row_numbers(rows) == sorted(numbers)
    assert evaluate.rows_of(evaluate.mask_of(rows, 1500)) == rows


@given(
    flags=st.lists(st.one_of(st.booleans(), st.none()), max_size=80),
    start=st.integers(0, 80),
    length=st.integers(0, 80),
)
def test_a_mask_as_rows_reads_null_as_false(
    flags: list[bool | None], start: int, length: int
) -> None:
    """Slices of a mask with nulls (what kernels give on columns with nulls) as row sets."""
    mask = pa.array(flags, pa.bool_()).slice(start, length)
    expected = [row for row, flag in enumerate(mask.to_pylist()) if flag]
    assert evaluate.row_numbers(evaluate.rows_of(mask)) == expected


def test_empty_batch() -> None:
    result = compile_rule(cmp("verb", Op.EQ, "get")).evaluate(normalise([], RECEIVED))
    assert result.type == pa.bool_()
    assert len(result) == 0


# --- Property: the vectorised evaluator is the reference, on any rule and event -------------

FIELDS = [
    ("verb",),
    ("objectRef", "resource"),
    ("objectRef_subresource",),
    ("user", "username"),
    ("user_username",),
    ("responseStatus", "code"),
    ("responseStatus_code",),
    ("user", "groups"),
    ("sourceIPs",),
    ("annotations",),
    ("annotations", "authorization.k8s.io/decision"),
    ("annotations", "a"),
    ("requestObject", "spec", "containers", "securityContext", "privileged"),
    ("requestObject", "spec", "containers", "image"),
    ("requestObject_spec_hostNetwork",),
    ("user",),
    ("missing",),
    ("user", "extra", "x"),
    ("annotations", "*"),
    ("requestObject", "data", "*"),
    ("requestObject", "spec", "containers", "*"),
    ("requestObject", "spec", "*", "image"),
    ("user", "*"),
    ("user", "extra", "*"),
    ("responseStatus", "*"),
    ("*",),
    ("*", "resource"),
]
TEXTS = ["get", "list", "create", "pods", "secrets", "exec", "403", "forbid", "allow", "Alice"]
TEXTS += ["ALICE", "alice", "Straße", "STRASSE", "system:masters", "", "a\n", "İ", "i", "ſ"]
NUMBERS: list[Scalar] = [0, 1, 101, 200, 403, -1, 2**63, 2**70, 2.5, 403.0, -0.5, 1e30]
NUMBERS += [math.nan, math.inf, -math.inf]
REGEXES = ["^li", "st$", "(?=get)", r"\d+", "s.c", "^$", "[a-z]+:", "(a|b)*c", "[^x]", "ſ"]
REGEXES += ["(?i)ALICE", "e{,2}", "[[:alpha:]]", r"\bpods\b", "A.*e", "^(?!get)", "x|", "İ"]
REGEXES += ["(st|$)", "e(:|$)", "(a$|s)\n"]

halves = st.integers(-6, 12).map(lambda n: n / 2)  # whole and fractional, near event codes
scalars = st.one_of(
    st.sampled_from(TEXTS), st.sampled_from(NUMBERS), st.integers(-3, 6), halves, st.booleans()
)


CODES = [{"responseStatus": {"code": code}} for code in [*range(-3, 7), 403, 2**63 - 1, -(2**63)]]
NUMERIC_OPS = [Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE]


@pytest.mark.parametrize("op", [*NUMERIC_OPS, Op.IN, Op.NOT_IN])
def test_every_number_against_every_code(op: Op) -> None:
    literals: list[Scalar] = [n / 2 for n in range(-8, 15)] + NUMBERS + [2**63 - 1, -(2**63)]
    for literal in literals:
        value = (literal, 5) if op in SET_OPS else literal
        both(cmp("responseStatus.code", op, value), [*CODES, {}])


VERBS = [{"verb": text} for text in TEXTS] + [{"user": {"groups": TEXTS}}, {}]


@pytest.mark.parametrize("op", list(Op))
def test_every_text_against_every_text(op: Op) -> None:
    literals = (
        TEXTS + ["ST", "straSSe", "I", "\n"] + (REGEXES if op in (Op.REGEX, Op.NOT_REGEX) else [])
    )
    for literal in literals:
        for ignore_case in (False, True):
            value = (literal, "get") if op in SET_OPS else literal
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # `[[:alpha:]]`
                both(cmp("verb", op, value, ignore_case), VERBS)
                both(cmp("user.groups", op, value, ignore_case), VERBS)
                # each text DISTINCT_SHARE times: few distinct values (of a text column, of a
                # list column's elements), each tested once
                both(cmp("verb", op, value, ignore_case), VERBS * DISTINCT_SHARE)
                both(cmp("user.groups", op, value, ignore_case), VERBS * DISTINCT_SHARE)


@st.composite
def comparisons(draw: st.DrawFn) -> Expr:
    target = Field(draw(st.sampled_from(FIELDS)))
    op = draw(st.sampled_from(list(Op)))
    value: Scalar | tuple[Scalar, ...]
    if op in SET_OPS:
        value = tuple(draw(st.lists(scalars, min_size=1, max_size=3)))
    elif op in (Op.REGEX, Op.NOT_REGEX):
        value = draw(st.one_of(st.sampled_from(REGEXES), scalars))
    else:
        value = draw(scalars)
    return Compare(target, op, value, draw(st.booleans()))


leaves = st.one_of(comparisons(), st.builds(Exists, st.sampled_from(FIELDS).map(Field)))
expressions = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.lists(inner, min_size=2, max_size=3).map(conjunction),
        st.lists(inner, min_size=2, max_size=3).map(disjunction),
    ),
    max_leaves=6,
)

SAMPLE_LOGS = ["secret-recon-then-exec.log", "sekoia-mixed.log", "privileged-pod.log"]
JSON_VALUES = st.one_of(
    st.sampled_from(TEXTS),
    st.sampled_from([101, 403, 2**63, 2.5, 403.0]),
    st.integers(-3, 6),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.sampled_from(TEXTS), st.integers(-2, 500), st.none()), max_size=3),
    st.dictionaries(st.sampled_from(["a", "privileged", "image"]), st.sampled_from(TEXTS)),
)
MUTATED_PATHS = [
    ("verb",),
    ("objectRef", "resource"),
    ("objectRef", "subresource"),
    ("user", "username"),
    ("user", "groups"),
    ("responseStatus", "code"),
    ("sourceIPs",),
    ("annotations",),
    ("annotations", "a"),
    ("annotations", "authorization.k8s.io/decision"),
    ("requestObject", "spec", "containers"),
    ("requestObject", "spec", "hostNetwork"),
    ("user", "extra", "x"),
    ("requestObject", "data"),
    ("requestObject", "data", "a"),
    ("missing",),
]


def set_path(event: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(event.get(key), dict):
            event[key] = {}
        event = event[key]
    event[path[-1]] = value


def delete_path(event: dict[str, Any], path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        event = event.get(key)  # type: ignore[assignment]
        if not isinstance(event, dict):
            return
    event.pop(path[-1], None)


@st.composite
def audit_events(draw: st.DrawFn, samples: list[dict[str, Any]]) -> dict[str, Any]:
    base: dict[str, Any] = draw(st.one_of(st.sampled_from(samples), st.just({})))
    event = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(MUTATED_PATHS))
        if draw(st.booleans()):
            set_path(event, path, draw(JSON_VALUES))
        else:
            delete_path(event, path)
    return event


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=expressions, data=st.data(), stored=st.booleans(), repeated=st.booleans())
def test_vectorised_equals_reference(
    read_log: LogReader, expr: Expr, data: st.DataObject, stored: bool, repeated: bool
) -> None:
    samples = [event for name in SAMPLE_LOGS for event in read_log(name)]
    events = data.draw(st.lists(audit_events(samples), min_size=1, max_size=8))
    if repeated:  # few distinct values per column: costly text leaves test each value once
        events = events * DISTINCT_SHARE
    batch = normalise(events, RECEIVED)
    if stored:
        batch = from_table(batch.table)
    rule = compile_rule(expr)
    result = rule.evaluate(batch)
    assert result.null_count == 0
    expected = reference.filter_events(expr, events)
    assert result.to_pylist() == expected
    # a second batch: the answers the first one left in the leaves give the same result
    assert rule.evaluate(from_table(batch.table)).to_pylist() == expected


def test_a_null_list_matches_nothing_even_when_its_offsets_span_elements() -> None:
    """Arrow lets a null list's offsets span elements (the elements then mean nothing): a
    comparison on the list, by kernel or by distinct element, does not see them."""
    events: list[dict[str, Any]] = [{"sourceIPs": ["1.2.3.4"]}, {}, {"sourceIPs": ["10.0.0.1"]}]
    events *= DISTINCT_SHARE
    table = normalise(events, RECEIVED).table
    spanning = pa.ListArray.from_arrays(
        pa.array(range(len(events) + 1), pa.int32()),
        pa.array(["1.2.3.4", "1.2.3.4", "10.0.0.1"] * DISTINCT_SHARE),
        mask=pa.array([False, True, False] * DISTINCT_SHARE),
    )
    batch = EventBatch(
        table.set_column(table.schema.get_field_index("sourceIPs"), "sourceIPs", spanning)
    )
    for rule in ('sourceIPs = "1.2.3.4"', 'sourceIPs ~ "^1\\\\."', 'sourceIPs =% "1.2"i'):
        assert compile_rule(parse_expression(rule)).evaluate(batch).to_pylist() == [
            True, False, False,
        ] * DISTINCT_SHARE, rule  # fmt: skip
