"""A stream plan gives every alert exactly what evaluating it alone, and the reference, give."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.test_rules_evaluate import (
    RECEIVED,
    SAMPLE_LOGS,
    LogReader,
    audit_events,
    expressions,
    read_log,
)

from auditwatch.normalise import EventBatch, from_table, normalise, parse_event
from auditwatch.rules import evaluate, reference
from auditwatch.rules.ast import Compare, Exists, Expr, Field, Not, Op, conjunction, disjunction
from auditwatch.rules.evaluate import compile_rule
from auditwatch.rules.parse import parse_expression
from auditwatch.rules.plan import PlanAlert, StreamPlan

__all__ = ["read_log"]  # the fixture, shared with the evaluator's tests

GUARD_VALUES = {
    ("verb",): ["get", "list", "create", "patch", "watch"],
    ("objectRef", "resource"): ["pods", "secrets", "roles", "rolebindings"],
    ("objectRef_subresource",): ["exec", "status"],
    ("stage",): ["ResponseComplete", "RequestReceived", "ResponseStarted"],
    ("objectRef", "namespace"): ["default", "kube-system", "mayor", "x"],
}


@st.composite
def guards(draw: st.DrawFn) -> Expr:
    """What the index reads: equality, `in`, `not ... exists` on the guard columns."""
    segments = draw(st.sampled_from(sorted(GUARD_VALUES)))
    target = Field(segments)
    kind = draw(st.sampled_from(["eq", "in", "absent"]))
    if kind == "absent":
        return Not(Exists(target))
    values = GUARD_VALUES[segments]
    if kind == "eq":
        return Compare(target, Op.EQ, draw(st.sampled_from(values)))
    chosen = draw(st.lists(st.sampled_from([*values, 5]), min_size=1, max_size=3))
    return Compare(target, Op.IN, tuple(chosen))


guarded = st.builds(
    lambda heads, branches, tail: conjunction([*heads, *branches, *tail]),
    st.lists(guards(), min_size=1, max_size=3),
    st.lists(
        st.lists(
            st.lists(guards(), min_size=1, max_size=2).map(conjunction), min_size=2, max_size=3
        ).map(disjunction),
        max_size=1,
    ),
    st.lists(expressions, max_size=2),
)
conditions = st.one_of(guarded, expressions, guards())
plan_alerts = st.builds(
    PlanAlert,
    key=st.just(""),
    condition=conditions,
    scope=st.one_of(st.none(), st.sampled_from(GUARD_VALUES[("objectRef", "namespace")])),
    unless=st.one_of(st.none(), guards(), expressions),
)


def scope(namespace: str) -> Expr:
    return Compare(Field(("objectRef", "namespace")), Op.EQ, namespace)


def alone(alert: PlanAlert, batch: EventBatch) -> tuple[list[int], int]:
    """(matching rows, excepted rows) of one alert evaluated by itself on every row."""
    condition = alert.condition
    if alert.scope is not None:
        condition = conjunction([scope(alert.scope), condition])
    matched = compile_rule(condition).evaluate(batch)
    if alert.unless is None:
        return pc.indices_nonzero(matched).to_pylist(), 0
    excepted = pc.and_(matched, compile_rule(alert.unless).evaluate(batch))
    return pc.indices_nonzero(pc.and_not(matched, excepted)).to_pylist(), excepted.true_count


def by_reference(alert: PlanAlert, events: list[dict[str, Any]]) -> list[int]:
    rows = []
    for row, event in enumerate(events):
        visible = alert.scope is None or reference.matches(scope(alert.scope), event)
        excepted = alert.unless is not None and reference.matches(alert.unless, event)
        if visible and reference.matches(alert.condition, event) and not excepted:
            rows.append(row)
    return rows


def planned(plan: StreamPlan, batch: EventBatch, count: int) -> list[tuple[list[int], int]]:
    """Per alert (matching rows, excepted rows); alerts the plan left out matched nothing."""
    out: list[tuple[list[int], int]] = [([], 0)] * count
    for result in plan.evaluate(batch):
        assert result.error is None
        out[result.alert] = (result.rows(), result.excepted)
    return out


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alerts=st.lists(plan_alerts, min_size=1, max_size=6), data=st.data(), stored=st.booleans())
def test_plan_equals_each_alert_alone_and_the_reference(
    read_log: LogReader, alerts: list[PlanAlert], data: st.DataObject, stored: bool
) -> None:
    samples = [event for name in SAMPLE_LOGS for event in read_log(name)]
    events = data.draw(st.lists(audit_events(samples), min_size=1, max_size=10))
    batch = normalise(events, RECEIVED)
    if stored:  # events parsed lazily, as the fast path and storage give them
        batch = from_table(batch.table)
    plan = StreamPlan(alerts)
    results = planned(plan, batch, len(alerts))
    for alert, result in zip(alerts, results, strict=True):
        assert result == alone(alert, batch)
        assert result[0] == by_reference(alert, events)


def detections() -> list[PlanAlert]:
    """The shipped library's composite rules, as `examples/detections` writes them."""
    import yaml

    alerts = []
    for path in sorted(Path("examples/detections").glob("k8s-*.yaml")):
        spec = yaml.safe_load(path.read_text())["spec"]["rule"]
        if spec["type"] == "composite":
            alerts.append(PlanAlert(path.stem, parse_expression(spec["config"])))
    return alerts


def test_the_library_and_tenant_copies_on_the_real_samples(read_log: LogReader) -> None:
    """Every sample log: the library plus scoped copies match as each alone would."""
    library = detections()
    assert len(library) > 20
    tenants = [
        PlanAlert(f"{ns}/{alert.key}", alert.condition, scope=ns)
        for ns in ("default", "kube-system", "nobody")
        for alert in library
    ]
    alerts = [*library, *tenants]
    plan = StreamPlan(alerts)
    fired = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for log in SAMPLE_LOGS:
            events = read_log(log)
            batch = from_table(normalise(events, RECEIVED).table)
            results = planned(plan, batch, len(alerts))
            for alert, result in zip(alerts, results, strict=True):
                assert result == alone(alert, batch), (log, alert.key)
                fired += bool(result[0])
    assert fired >= 5  # the samples do set detections off, scoped copies included


def test_batch_after_batch_a_plan_matches_as_a_fresh_one(
    read_log: LogReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan remembers the alerts each guard value tuple finds from one batch to the next, and
    starts over when it holds `MAX_REMEMBERED_KEYS` of them: later batches are not affected."""
    from auditwatch.rules import plan as plan_module

    monkeypatch.setattr(plan_module, "MAX_REMEMBERED_KEYS", 3)
    alerts = detections()
    plan = StreamPlan(alerts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for log in [*SAMPLE_LOGS, *reversed(SAMPLE_LOGS)]:
            batch = from_table(normalise(read_log(log), RECEIVED).table)
            fresh = planned(StreamPlan(alerts), batch, len(alerts))
            assert planned(plan, from_table(batch.table), len(alerts)) == fresh, log


def test_guards_on_a_column_with_few_of_them_are_evaluated_not_indexed(
    read_log: LogReader,
) -> None:
    """The library guards on `objectRef.namespace` and `stage` with two value sets each: those
    columns are not worth grouping batches by, and their guards are evaluated instead; with
    tenants' scopes the namespace is indexed. Either way each alert matches as it would alone."""
    library = detections()
    tenants = [
        PlanAlert(f"{ns}/{alert.key}", alert.condition, scope=ns)
        for ns in ("default", "kube-system", "mayor", "a", "b")
        for alert in library
    ]
    few, many = StreamPlan(library), StreamPlan([*library, *tenants])
    assert "objectRef_namespace" not in few._columns and "stage" not in few._columns
    assert "objectRef_namespace" in many._columns and "verb" in few._columns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for log in SAMPLE_LOGS:
            batch = from_table(normalise(read_log(log), RECEIVED).table)
            for plan, alerts in ((few, library), (many, [*library, *tenants])):
                results = planned(plan, batch, len(alerts))
                for alert, result in zip(alerts, results, strict=True):
                    assert result == alone(alert, batch), (log, alert.key)


def test_a_batch_beyond_the_kept_row_sets_is_grouped_as_any(read_log: LogReader) -> None:
    """Batches are grouped with each row's set kept for up to 1,024 rows; a longer batch (a
    replay from storage, say) matches as each alert alone would."""
    events = [event for name in SAMPLE_LOGS for event in read_log(name)]
    events = (events * (1100 // len(events) + 1))[:1100]
    batch = from_table(normalise(events, RECEIVED).table)
    alerts = detections()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        results = planned(StreamPlan(alerts), batch, len(alerts))
        assert [result for result in results if result[0]]  # something matched
        for alert, result in zip(alerts, results, strict=True):
            assert result == alone(alert, batch), alert.key
            assert all(row < 1100 for row in result[0])


def test_a_scoped_alert_sees_only_its_namespace() -> None:
    events = [
        {"verb": "get", "objectRef": {"resource": "secrets", "namespace": ns}}
        for ns in ("team-a", "team-b", None)
    ]
    rule = parse_expression('objectRef.resource = "secrets"')
    alerts = [PlanAlert("a", rule, scope="team-a"), PlanAlert("all", rule)]
    results = planned(StreamPlan(alerts), normalise(events, RECEIVED), 2)
    assert results == [([0], 0), ([0, 1, 2], 0)]


def test_exceptions_are_counted_not_matched() -> None:
    events = [{"verb": "get", "user": {"username": user}} for user in ("ci", "eve", "ci")]
    alert = PlanAlert(
        "reads", parse_expression('verb = "get"'), unless=parse_expression('user.username = "ci"')
    )
    assert planned(StreamPlan([alert]), normalise(events, RECEIVED), 1) == [([1], 2)]


def test_a_failing_alert_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditwatch.rules import evaluate

    original = evaluate._PathTest.__call__

    def explode(self: evaluate._PathTest, ctx: Any, row: int) -> bool:
        if "boom" in self.path:
            raise RuntimeError("rule bug")
        return original(self, ctx, row)

    monkeypatch.setattr(evaluate._PathTest, "__call__", explode)
    events = [{"verb": "get", "requestObject": {"boom": 1, "ok": 1}}]
    alerts = [
        PlanAlert("broken", parse_expression("requestObject.boom exists")),
        PlanAlert("fine", parse_expression("requestObject.ok exists")),
    ]
    results = StreamPlan(alerts).evaluate(normalise(events, RECEIVED))
    assert [(r.key, r.rows(), type(r.error)) for r in results] == [
        ("broken", [], RuntimeError),
        ("fine", [0], type(None)),
    ]


def test_paths_read_from_the_text_equal_the_parsed_event() -> None:
    """The plan reads only its rules' paths from the event texts (`rules/extract.py`): JSON
    that a partial read could get wrong (escaped or repeated keys, numbers beyond 64 bits or a
    double's range, lists in lists, null) matches exactly as the whole parsed event does."""
    from auditwatch.columnar import batch_from_json

    objects = [
        '"spec": {"containers": [{"securityContext": {"privileged": true}}]}',
        '"spec": {"containers": [[{"securityContext": {"privileged": true}}]]}',
        '"spec": {"cont\\u0061iners": [{"securityContext": {"privileged": true}}]}',
        '"spec": {"containers": [{"securityContext": {"privileged": true, "privileged": false}}]}',
        '"spec": {"containers": null, "hostNetwork": 1180591620717411303424}',
        '"spec": {"containers": [{"securityContext": {"privileged": true}}], "x": 1e999}',
        '"spec": {"hostNetwork": 1e999}',
        '"spec": [{"hostNetwork": true}, 5, "s", null]',
        '"data": {"password": "p", "k": "AKIAIOSFODNN7EXAMPLE1", "n": {"k": 2}}',
        '"data": ["a", {"aws_access_key_id": null}]',
    ]
    texts = [
        f'{{"kind":"Event","apiVersion":"audit.k8s.io/v1","auditID":"{n:08x}-0000-4000-8000-'
        f'000000000000","stage":"ResponseComplete","verb":"create","requestObject":{{{body}}}}}'
        for n, body in enumerate(objects)
    ]
    batch = batch_from_json(("[" + ",".join(texts) + "]").encode(), RECEIVED)
    assert batch is not None
    rules = [
        "requestObject.spec.containers.securityContext.privileged = true",
        "requestObject.spec.containers exists",
        "requestObject.spec.hostNetwork exists",
        "requestObject.spec.hostNetwork = true",
        "requestObject.spec.hostNetwork > 5",
        'requestObject.data.* ~ "AKIA"',
        "requestObject.data.password exists",
        "requestObject.data.aws_access_key_id exists",
        "requestObject.data.*.k = 2",
        "not requestObject.spec.containers.securityContext.privileged = false",
    ]
    alerts = [PlanAlert(rule, parse_expression(rule)) for rule in rules]
    events = [parse_event(text) for text in texts]
    results = planned(StreamPlan(alerts), batch, len(alerts))
    for alert, result in zip(alerts, results, strict=True):
        assert result[0] == by_reference(alert, events), alert.key
    assert results[0][0] == [0, 1, 2, 5]  # a repeated key: the last one counts


@pytest.mark.parametrize("kernels", [0, evaluate.KERNELS_BEFORE_ENCODING, 1_000])
def test_cheap_comparisons_answer_alike_by_kernel_and_by_distinct_value(
    monkeypatch: pytest.MonkeyPatch, kernels: int
) -> None:
    """Past the first few cheap comparisons on a column in a batch, the rest test each
    distinct value once: the same rows, null cells, int columns and lists included (a costly
    comparison on a list's elements goes by distinct element whatever the count)."""
    monkeypatch.setattr(evaluate, "KERNELS_BEFORE_ENCODING", kernels)
    events: list[dict[str, Any]] = [
        {"verb": "get", "responseStatus": {"code": 200}, "user": {"groups": ["a", "b"]}},
        {"verb": "create", "responseStatus": {"code": 403}, "user": {"groups": ["b"]}},
        {"verb": None, "responseStatus": {"code": 404.5}, "user": {"groups": [None, "c"]}},
        {"verb": 5, "responseStatus": {"code": 201}},
        {"responseStatus": {"code": "200"}, "user": {"groups": None}},
    ] * evaluate.DISTINCT_SHARE
    rules = [
        'verb = "get"',
        'verb != "get"',
        'verb in ("get", "create")',
        'not verb in ("get", "watch")',
        'verb startswith "cr"',
        "responseStatus.code >= 201",
        "responseStatus.code < 300",
        "responseStatus.code = 200",
        "responseStatus.code != 403",
        'user.groups = "b"',
        'user.groups != "b"',
        'user.groups in ("a", "c")',
        'user.groups ~ "^[ab]$"',  # costly: by distinct element from the first
        'user.groups =% "C"i',
    ]
    alerts = [PlanAlert(str(n), parse_expression(rule)) for n, rule in enumerate(rules)]
    for batch in (normalise(events, RECEIVED), normalise(events[::-1], RECEIVED)):
        sent = batch.events
        results = planned(StreamPlan(alerts), batch, len(alerts))
        assert [rows for rows, _ in results] == [by_reference(a, sent) for a in alerts]
