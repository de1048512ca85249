"""Grouping one alert's matching rows of a batch: keys and event times from the columns."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from tests.e2e_support import synthetic_events

from auditwatch.normalise import normalise
from auditwatch.rules.errors import RuleError
from auditwatch.rules.parse import parse_expression
from auditwatch.rules.plan import PlanAlert, StreamPlan
from auditwatch.rules.window import GROUP_COLUMNS, group_column

RECEIVED = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def micros(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("user.username", "user_username"),
        ("user_username", "user_username"),
        ('objectRef["namespace"]', "objectRef_namespace"),
        ("responseStatus.code", "responseStatus_code"),
    ],
)
def test_group_fields_are_written_as_in_rules(text: str, column: str) -> None:
    assert group_column(text) == column


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("user.groups", 0, "cannot group by 'user.groups'"),  # a list: which element?
        ("auditID", 0, "cannot group by 'auditID'"),  # one group per request
        ("requestObject.spec", 0, "cannot group by"),
        ("user. name", 4, "not a field name"),
        ('annotations["a', 11, "not a field name"),
    ],
)
def test_other_fields_are_refused_with_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(RuleError, match=message) as caught:
        group_column(text)
    assert caught.value.position == position
    assert caught.value.text == text


def test_every_group_column_is_a_single_value_column() -> None:
    assert "user_username" in GROUP_COLUMNS and "objectRef_namespace" in GROUP_COLUMNS
    assert not {"user_groups", "sourceIPs", "annotations", "auditID"} & set(GROUP_COLUMNS)


def test_the_plan_hands_a_grouped_alert_its_rows_by_group_with_event_times() -> None:
    timed = [
        ("eve", "2026-03-01T09:59:30.000001Z"),
        ("bob", "2026-03-01T09:59:10Z"),
        ("eve", "2026-03-01T09:58:00Z"),
        ("eve", None),  # no timestamp: when it was received
        ("ann", "2026-03-01T09:59:00Z"),
    ]
    events = [
        synthetic_events(f"e{n}", 1, user={"username": user})[0]
        | ({"stageTimestamp": stamp} if stamp else {})
        for n, (user, stamp) in enumerate(timed)
    ]
    events[4]["verb"] = "list"  # ann's does not match
    plan = StreamPlan(
        [
            PlanAlert("grouped", parse_expression('verb = "get"'), group_by=("user_username",)),
            PlanAlert("plain", parse_expression('verb = "get"')),
        ]
    )
    grouped, plain = plan.evaluate(normalise(events, received_at=RECEIVED))
    assert plain.groups is None
    assert grouped.rows() == plain.rows() == [0, 1, 2, 3]
    groups = grouped.groups
    assert groups is not None
    by_key = {
        key: (count, last, times)
        for key, count, last, times in zip(
            groups.keys, groups.counts, groups.last_rows, groups.times, strict=True
        )
    }
    eve_times = [
        micros(datetime(2026, 3, 1, 9, 58, tzinfo=UTC)),
        micros(datetime(2026, 3, 1, 9, 59, 30, 1, tzinfo=UTC)),
        micros(RECEIVED),
    ]
    assert by_key == {
        ("eve",): (3, 3, eve_times),
        ("bob",): (1, 1, [micros(datetime(2026, 3, 1, 9, 59, 10, tzinfo=UTC))]),
    }


def test_a_missing_group_value_is_a_group_of_its_own() -> None:
    events = synthetic_events("n", 2) + [
        event | {"objectRef": {"resource": "nodes"}} for event in synthetic_events("c", 3)
    ]
    plan = StreamPlan(
        [PlanAlert("a", parse_expression('verb = "get"'), group_by=("objectRef_namespace",))]
    )
    [result] = plan.evaluate(normalise(events, received_at=RECEIVED))
    assert result.groups is not None
    assert dict(zip(result.groups.keys, result.groups.counts, strict=True)) == {
        ("default",): 2,
        (None,): 3,
    }
