"""Status dicts and the `auditwatch status` tables: what kubectl users would see."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from auditwatch.config.model import ConfigError, StreamSpec
from auditwatch.status import Conditions, alert_status, iso, stream_status
from auditwatch.status_table import age, alerts_table, streams_table
from auditwatch.store import StreamStats

T0 = datetime(2025, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    conditions = Conditions()
    [first] = conditions.ready("default/a", True, "RuleActive", "ok", 1, T0)
    [same] = conditions.ready("default/a", True, "RuleActive", "still ok", 2, T0 + timedelta(1))
    [flipped] = conditions.ready(
        "default/a", False, "InvalidRule", "bad", 3, T0 + timedelta(days=2)
    )
    [back] = conditions.ready("default/a", True, "RuleActive", "ok", 4, T0 + timedelta(days=3))
    assert first["lastTransitionTime"] == same["lastTransitionTime"] == "2025-05-01T10:00:00Z"
    assert (same["message"], same["observedGeneration"]) == ("still ok", 2)
    assert (flipped["status"], flipped["reason"]) == ("False", "InvalidRule")
    assert flipped["lastTransitionTime"] == "2025-05-03T10:00:00Z"
    assert back["lastTransitionTime"] == "2025-05-04T10:00:00Z"
    [other] = conditions.ready("default/b", True, "RuleActive", "ok", 1, T0 + timedelta(days=9))
    assert other["lastTransitionTime"] == "2025-05-10T10:00:00Z", "per resource"


def test_alert_status_from_tracker_and_deliveries() -> None:
    tracker = {
        "state": "Firing",
        "matches": 4,
        "lastMatchTime": iso(T0),
        "lastMatch": {"user": "eve", "verb": "get"},
        "firedAt": iso(T0),
        "resolvedAt": None,
    }
    deliveries = {"hook": {"sent": 2, "failed": 0, "retries": 1, "lastError": None}}
    status = alert_status("default", "a", "audit", 3, tracker, deliveries, None, Conditions(), T0)
    assert status["state"] == "Firing"
    assert status["matches"] == 4
    assert status["lastMatch"] == {"user": "eve", "verb": "get"}
    assert status["targets"] == [{"name": "hook", "sent": 2, "failed": 0, "lastError": None}]
    assert status["observedGeneration"] == 3
    assert status["conditions"][0]["observedGeneration"] == 3


def test_invalid_alert_status_says_why() -> None:
    problem = ConfigError("InvalidRule", "spec.rule.config: expected an operator")
    status = alert_status("ns", "a", "audit", 2, None, {}, problem, Conditions(), T0)
    assert (status["state"], status["matches"]) == ("Invalid", 0)
    [ready] = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidRule")
    assert ready["message"] == problem.message


def test_stream_status() -> None:
    stats = StreamStats(events=7, bytes=100, staged_bytes=0, last_event_time=T0, last_received=T0)
    status = stream_status(StreamSpec("audit", generation=2), stats, Conditions(), T0)
    assert status["eventsReceived"] == 7
    assert status["lastEventTime"] == "2025-05-01T10:00:00Z"
    assert status["ingestPath"] == "/api/v1/logstream/audit"
    assert status["conditions"][0]["status"] == "True"


NOW = datetime(2025, 5, 10, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ago", "shown"),
    [
        (timedelta(seconds=0), "0s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(seconds=59), "59s"),
        (timedelta(minutes=12, seconds=30), "12m"),
        (timedelta(hours=1, minutes=59), "119m"),
        (timedelta(hours=3), "3h"),
        (timedelta(hours=47), "47h"),
        (timedelta(days=5, hours=3), "5d"),
        (timedelta(seconds=-30), "0s"),
    ],
)
def test_age_is_compact(ago: timedelta, shown: str) -> None:
    assert age(iso(NOW - ago), NOW) == shown


def test_age_reads_fractional_times_and_none() -> None:
    assert age((NOW - timedelta(seconds=5, microseconds=5)).isoformat(), NOW) == "5s"
    assert age(None, NOW) == "<none>"


def test_alerts_table_columns_and_rows() -> None:
    status: dict[str, Any] = {
        "alerts": {
            "default/secret-read": {
                "namespace": "default",
                "name": "secret-read",
                "stream": "auditdemo",
                "state": "Firing",
                "matches": 12,
                "lastMatchTime": (NOW - timedelta(seconds=30)).isoformat(),
                "since": iso(NOW - timedelta(days=3)),
            },
            "security/orphan": {
                "namespace": "security",
                "name": "orphan",
                "stream": None,
                "state": "Invalid",
                "matches": 0,
                "since": iso(NOW - timedelta(minutes=5)),
            },
        }
    }
    assert alerts_table(status, NOW).splitlines() == [
        "NAMESPACE   NAME          STREAM      STATE     MATCHES   LAST MATCH   AGE",
        "default     secret-read   auditdemo   Firing    12        30s          3d",
        "security    orphan                    Invalid   0         <none>       5m",
    ]


def test_streams_table() -> None:
    status: dict[str, Any] = {
        "streams": {
            "auditdemo": {
                "eventsReceived": 10,
                "lastEventTime": iso(NOW - timedelta(seconds=8)),
                "conditions": [{"type": "Ready", "status": "True"}],
                "since": iso(NOW - timedelta(hours=2)),
            }
        }
    }
    assert streams_table(status, NOW).splitlines() == [
        "NAME        READY   EVENTS   LAST EVENT   AGE",
        "auditdemo   True    10       8s           2h",
    ]


def test_empty_tables_are_just_the_header() -> None:
    assert alerts_table({"alerts": {}}, NOW) == (
        "NAMESPACE   NAME   STREAM   STATE   MATCHES   LAST MATCH   AGE"
    )
