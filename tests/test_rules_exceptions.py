"""Exceptions as data: what each operator excepts, exactly, and where a bad one is reported."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from tests.sample_data import SAMPLES

from auditwatch.decode import decode_file
from auditwatch.normalise import normalise
from auditwatch.rules.ast import Expr
from auditwatch.rules.exceptions import ExceptionError, ExceptionSpec, compile_exceptions
from auditwatch.rules.parse import parse_expression
from auditwatch.rules.plan import PlanAlert, StreamPlan
from auditwatch.rules.reference import matches

EVENTS = SAMPLES.parents[1] / "detection_events"
AUTHORIZED = "system:serviceaccount:default:authorized-user"
UNAUTHORIZED = "system:serviceaccount:default:unauthorized-user"


def event(
    username: str, namespace: str = "default", groups: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "auditID": f"{username}-{namespace}",
        "stage": "ResponseComplete",
        "verb": "get",
        "user": {"username": username, "groups": list(groups)},
        "objectRef": {"resource": "secrets", "namespace": namespace, "name": "s"},
    }


def unless(*exceptions: ExceptionSpec) -> Expr:
    compiled = compile_exceptions(exceptions, "spec.exceptions")
    assert compiled is not None
    return compiled


def spec(
    fields: list[str], values: list[list[Any]], comps: list[str] | None = None
) -> ExceptionSpec:
    return ExceptionSpec(
        "x", tuple(fields), tuple(comps or ()), tuple(tuple(row) for row in values)
    )


def test_an_exact_exception_excepts_the_authorized_user_and_never_the_unauthorized_one() -> None:
    """The seed's `!% "authorized-user"` exempted unauthorized-user; `=` compares the whole name."""
    excepted = unless(spec(["user.username"], [[AUTHORIZED]]))
    assert matches(excepted, event(AUTHORIZED))
    assert not matches(excepted, event(UNAUTHORIZED))
    naive = parse_expression('user_username =% "authorized-user"')
    assert matches(naive, event(UNAUTHORIZED)), "the pitfall the exact comparison avoids"


def test_every_field_of_a_value_tuple_must_match() -> None:
    excepted = unless(
        spec(
            ["user.username", "objectRef.namespace"],
            [["system:serviceaccount:argocd:argocd-server", "argocd"], [AUTHORIZED, "default"]],
        )
    )
    assert matches(excepted, event("system:serviceaccount:argocd:argocd-server", "argocd"))
    assert not matches(excepted, event("system:serviceaccount:argocd:argocd-server", "payments"))
    assert matches(excepted, event(AUTHORIZED, "default"))
    assert not matches(excepted, event(AUTHORIZED, "argocd"))


@pytest.mark.parametrize(
    ("comp", "value", "excepted", "kept"),
    [
        ("in", ["team-a", "team-b"], "team-b", "team-c"),
        ("startswith", "team-", "team-a", "payments-team-"),
        ("endswith", "-dev", "shop-dev", "shop-dev-2"),
        ("contains", "sandbox", "a-sandbox-1", "sandbo"),
        ("glob", "ci-*-runner?", "ci-shop-runner1", "ci-shop-runner12"),
        ("glob", "a.b", "a.b", "axb"),
    ],
)
def test_each_operator_compares_as_documented(
    comp: str, value: Any, excepted: str, kept: str
) -> None:
    expression = unless(spec(["objectRef.namespace"], [[value]], [comp]))
    assert matches(expression, event("u", excepted))
    assert not matches(expression, event("u", kept))


def test_a_field_of_several_values_matches_when_one_does() -> None:
    expression = unless(spec(["user.groups"], [["platform-admins"]]))
    assert matches(expression, event("bob", groups=("developers", "platform-admins")))
    assert not matches(expression, event("bob", groups=("developers",)))


@pytest.mark.parametrize(
    ("exception", "where", "message"),
    [
        (
            spec(["user.nmae"], [["x"]]),
            'spec.exceptions["x"].fields[0]',
            "unknown field user.nmae: user has extra, groups, uid, username at line 1, column 6",
        ),
        (spec(["usr.name"], [["x"]]), 'spec.exceptions["x"].fields[0]', "unknown field 'usr'"),
        (
            spec(["objectRef.namespace and x"], [["x"]]),
            'spec.exceptions["x"].fields[0]',
            "not a field name (expected an operator) at line 1, column 21",
        ),
        (
            spec(["user.username"], [["x"]], ["startswth"]),
            'spec.exceptions["x"].comps[0]',
            "unknown operator 'startswth' (use =, in, startswith, endswith, contains, glob)",
        ),
        (
            spec(["user.username", "verb"], [["x"]]),
            'spec.exceptions["x"].values[0]',
            "1 value(s) for 2 field(s)",
        ),
        (
            spec(["user.username"], [["x"]], ["=", "="]),
            'spec.exceptions["x"].comps',
            "2 operator(s) for 1 field(s)",
        ),
        (
            spec(["responseStatus.code"], [[403]], ["startswith"]),
            'spec.exceptions["x"].values[0][0]',
            "'startswith' compares text",
        ),
        (
            spec(["verb"], [["get"]], ["in"]),
            'spec.exceptions["x"].values[0][0]',
            "'in' takes a non-empty list",
        ),
        (spec(["verb"], [[{"a": 1}]]), 'spec.exceptions["x"].values[0][0]', "takes one value"),
    ],
)
def test_a_bad_exception_says_where_and_what(
    exception: ExceptionSpec, where: str, message: str
) -> None:
    with pytest.raises(ExceptionError) as raised:
        compile_exceptions([exception], "spec.exceptions")
    assert raised.value.where == where
    assert message in str(raised.value)
    assert str(raised.value).startswith(where + ": ")


def test_the_plan_excepts_in_the_same_pass_and_agrees_with_the_reference() -> None:
    """Over the real samples: the plan's matches are the rule's less the exceptions', and the
    excepted rows are counted, for several alerts sharing one plan."""
    files = [*sorted(SAMPLES.glob("*.log")), *sorted(EVENTS.glob("*.jsonl"))]
    events = [e for path in files for e in decode_file(path)]
    batch = normalise(events, datetime(2025, 1, 1, tzinfo=UTC))
    rule = parse_expression('stage = "ResponseComplete" and verb in ("get", "list", "watch")')
    excepted = unless(
        spec(["user.username"], [["system:admin"]]),
        ExceptionSpec(
            "ns", ("objectRef.namespace", "verb"), ("startswith", "="), (("ware", "list"),)
        ),
    )
    plan = StreamPlan([PlanAlert("a", rule, unless=excepted), PlanAlert("b", rule)])
    results = {result.key: result for result in plan.evaluate(batch)}
    matched = [i for i, e in enumerate(events) if matches(rule, e)]
    reported = [i for i in matched if not matches(excepted, events[i])]
    assert 0 < len(reported) < len(matched)
    assert results["a"].rows() == reported
    assert results["a"].excepted == len(matched) - len(reported)
    assert results["b"].rows() == matched and results["b"].excepted == 0
