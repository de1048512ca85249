"""The alert state machine: when notices go out, what they say, and what survives a restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.sample_data import SAMPLES

from auditwatch.alerts import AlertTracker, Notice, SnapshotError, render_message
from auditwatch.config.model import AlertSpec, RepeatSpec, TargetSpec
from auditwatch.rules.ast import Compare, Field, Op, Rule

T0 = datetime(2024, 10, 29, 12, 0, tzinfo=UTC)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


RECON = load("secret-recon-then-exec.log")
GETS = [event for event in RECON if event["verb"] == "get"]


def target(name: str, kind: str = "webhook", interval: float = 10, times: int = 3) -> TargetSpec:
    return TargetSpec(
        type=kind,  # type: ignore[arg-type]
        endpoint=f"http://127.0.0.1:1/{name}",
        name=name,
        repeat=RepeatSpec(interval=timedelta(seconds=interval), times=times),
    )


def make_spec(
    *,
    targets: tuple[TargetSpec, ...] = (target("hook"),),
    repeats: int = 1,
    rule_text: str = 'verb = "get"',
    message: str = "{user_username} did {verb} on {objectRef.resource}",
    resolve_after: float = 60,
) -> AlertSpec:
    return AlertSpec(
        namespace="sec",
        name="gets",
        stream="audit",
        rule=Rule(Compare(Field(("verb",)), Op.EQ, "get"), repeats=repeats),
        rule_type="column" if repeats > 1 else "composite",
        rule_text=rule_text,
        message=message,
        targets=targets,
        resolve_after=timedelta(seconds=resolve_after),
    )


def kinds(notices: list[Notice]) -> list[tuple[str, str]]:
    return [(notice.target, notice.kind) for notice in notices]


def test_first_match_fires_at_once_to_every_target() -> None:
    tracker = AlertTracker(make_spec(targets=(target("hook"), target("chat", "slack"))))
    assert tracker.status()["state"] == "Listening"
    notices = tracker.observe(2, GETS[1], seconds(0))
    assert kinds(notices) == [("hook", "firing"), ("chat", "firing")]
    first = notices[0]
    assert first.count == 2 and first.total == 2
    assert first.event.audit_id == GETS[1]["auditID"]
    assert first.message == "mayor-malware did get on roles"
    assert first.fired_at == seconds(0) and first.resolved_at is None
    assert [n.sequence for n in notices] == [1, 2]
    status = tracker.status()
    assert status["state"] == "Firing"
    assert status["matches"] == 2
    assert status["lastMatchTime"] == seconds(0).isoformat()
    assert status["lastMatch"] == {
        "user": "mayor-malware",
        "verb": "get",
        "resource": "roles",
        "namespace": GETS[1]["objectRef"].get("namespace"),
        "name": GETS[1]["objectRef"].get("name"),
        "auditID": GETS[1]["auditID"],
    }


def test_repeats_follow_interval_and_stop_at_times() -> None:
    tracker = AlertTracker(make_spec(targets=(target("hook", interval=10, times=3),)))
    assert kinds(tracker.observe(1, GETS[0], seconds(0))) == [("hook", "firing")]
    # More matches before the interval is over: nothing yet, but a deadline at the interval.
    assert tracker.observe(2, GETS[2], seconds(4)) == []
    assert tracker.next_deadline() == seconds(10)
    assert tracker.tick(seconds(9)) == []
    repeat = tracker.tick(seconds(10))
    assert kinds(repeat) == [("hook", "repeat")]
    assert repeat[0].count == 2 and repeat[0].total == 3
    assert repeat[0].event.audit_id == GETS[2]["auditID"]
    assert repeat[0].message == f"mayor-malware did get on {GETS[2]['objectRef']['resource']}"
    # A match after the interval passed is reported at once.
    third = tracker.observe(1, GETS[3], seconds(25))
    assert kinds(third) == [("hook", "repeat")] and third[0].count == 1
    # times=3 is used up: more matches keep it firing but send nothing more.
    assert tracker.observe(1, GETS[4], seconds(40)) == []
    assert tracker.tick(seconds(55)) == []
    assert tracker.status()["state"] == "Firing"
    assert tracker.status()["matches"] == 5


def test_no_repeat_without_new_matches() -> None:
    tracker = AlertTracker(make_spec(targets=(target("hook", interval=10, times=5),)))
    tracker.observe(1, GETS[0], seconds(0))
    assert tracker.tick(seconds(30)) == []
    assert tracker.next_deadline() == seconds(60)  # only the resolve is pending


def test_resolves_after_quiet_once_per_target_even_when_repeats_are_used_up() -> None:
    spec = make_spec(targets=(target("hook", times=1), target("chat", "slack", times=1)))
    tracker = AlertTracker(spec)
    tracker.observe(1, GETS[0], seconds(0))
    tracker.observe(1, GETS[1], seconds(30))
    assert tracker.next_deadline() == seconds(90)
    assert tracker.tick(seconds(89)) == []
    resolved = tracker.tick(seconds(120))
    assert kinds(resolved) == [("hook", "resolved"), ("chat", "resolved")]
    assert all(n.resolved_at == seconds(90) and n.state == "resolved" for n in resolved)
    assert resolved[0].count == 1  # the match at 30 s was never reported (times=1)
    assert tracker.status()["state"] == "Resolved"
    assert tracker.status()["resolvedAt"] == seconds(90).isoformat()
    # Nothing after the resolve: no "paused" message, no repeats.
    assert tracker.tick(seconds(500)) == []
    assert tracker.next_deadline() is None


def test_match_after_silence_resolves_then_fires_anew() -> None:
    tracker = AlertTracker(make_spec())
    tracker.observe(1, GETS[0], seconds(0))
    notices = tracker.observe(1, GETS[1], seconds(200))
    assert [n.kind for n in notices] == ["resolved", "firing"]
    assert notices[0].resolved_at == seconds(60)
    assert notices[1].fired_at == seconds(200) and notices[1].count == 1
    assert notices[1].total == 2


def test_composite_rule_resolves() -> None:
    """Parseable's composite alerts never resolve and repeat forever; these do."""
    tracker = AlertTracker(make_spec(rule_text='verb = "get" and objectRef_resource = "roles"'))
    tracker.observe(1, GETS[0], seconds(0))
    assert kinds(tracker.tick(seconds(61))) == [("hook", "resolved")]


def test_column_repeats_need_n_matches_within_the_window() -> None:
    tracker = AlertTracker(make_spec(repeats=3, resolve_after=60))
    assert tracker.observe(1, GETS[0], seconds(0)) == []
    assert tracker.observe(1, GETS[1], seconds(30)) == []
    # The first match is out of the window by now: two in the window, not enough.
    assert tracker.observe(1, GETS[2], seconds(70)) == []
    assert tracker.status()["state"] == "Listening"
    fired = tracker.observe(1, GETS[3], seconds(80))
    assert kinds(fired) == [("hook", "firing")]
    assert fired[0].count == 3 and fired[0].total == 4


def test_column_alert_does_not_flap_between_matches() -> None:
    """Non-matching events never reach the tracker; only time without a match resolves."""
    tracker = AlertTracker(make_spec(repeats=2, resolve_after=60))
    tracker.observe(2, GETS[1], seconds(0))
    for t in (20, 40, 59):
        assert tracker.tick(seconds(t)) == []
        tracker.observe(1, GETS[2], seconds(t))
        assert tracker.status()["state"] == "Firing"


def test_alertmanager_targets_get_refreshes_outside_repeat_times() -> None:
    spec = make_spec(
        targets=(target("am", "alertmanager", interval=1000, times=1), target("hook", times=1)),
        resolve_after=300,
    )
    tracker = AlertTracker(spec, refresh_interval=timedelta(seconds=60))
    tracker.observe(1, GETS[0], seconds(0))
    assert tracker.next_deadline() == seconds(60)
    assert kinds(tracker.tick(seconds(60))) == [("am", "refresh")]
    tracker.observe(1, GETS[1], seconds(100))
    assert kinds(tracker.tick(seconds(120))) == [("am", "refresh")]
    assert kinds(tracker.tick(seconds(400))) == [("am", "resolved"), ("hook", "resolved")]
    assert tracker.tick(seconds(460)) == []


def test_restart_restores_firing_without_new_notice_and_keeps_counts() -> None:
    spec = make_spec(targets=(target("hook", interval=10, times=2),))
    tracker = AlertTracker(spec)
    tracker.observe(1, GETS[0], seconds(0))
    tracker.observe(1, GETS[1], seconds(5))
    saved = json.loads(json.dumps(tracker.snapshot()))  # it must survive JSON

    restored = AlertTracker.restore(spec, saved)
    assert restored.status() == tracker.status()
    assert restored.tick(seconds(6)) == []
    repeat = restored.tick(seconds(10))
    assert kinds(repeat) == [("hook", "repeat")]
    assert repeat[0].count == 1 and repeat[0].sequence == 2
    assert repeat[0].message == f"mayor-malware did get on {GETS[1]['objectRef']['resource']}"
    # times=2 was reached across the restart.
    assert restored.observe(1, GETS[2], seconds(30)) == []
    assert kinds(restored.tick(seconds(90))) == [("hook", "resolved")]


def test_restore_of_resolved_alert_after_downtime_resolves_at_the_deadline() -> None:
    spec = make_spec()
    tracker = AlertTracker(spec)
    tracker.observe(1, GETS[0], seconds(0))
    restored = AlertTracker.restore(spec, tracker.snapshot())
    resolved = restored.tick(seconds(3600))
    assert [n.kind for n in resolved] == ["resolved"]
    assert resolved[0].resolved_at == seconds(60)


def test_spec_change_keeps_state_for_same_rule_and_resets_for_new_rule() -> None:
    spec = make_spec()
    tracker = AlertTracker(spec)
    tracker.observe(1, GETS[0], seconds(0))

    new_targets = make_spec(targets=(target("hook"), target("chat", "slack")), message="{verb}")
    kept = AlertTracker.restore(new_targets, tracker.snapshot())
    assert kept.status()["state"] == "Firing"
    # The added target learns about the ongoing firing; the old one is not told again.
    notices = kept.tick(seconds(1))
    assert kinds(notices) == [("chat", "firing")]
    assert notices[0].message == "get"

    changed = AlertTracker.restore(make_spec(rule_text='verb = "list"'), tracker.snapshot())
    assert changed.status()["state"] == "Listening"
    assert changed.status()["matches"] == 0
    fired = changed.observe(1, GETS[0], seconds(2))
    assert fired[0].kind == "firing" and fired[0].sequence == 2  # sequence never goes back


@pytest.mark.parametrize(
    "snapshot",
    [
        {"version": 99},
        {"version": 1, "state": "Exploded"},
        {"version": 1, "state": "Firing", "stream": "audit", "ruleType": "composite",
         "ruleText": 'verb = "get"', "lastMatchTime": "not a time"},
        {"version": 1, "state": "Firing", "stream": "audit", "ruleType": "composite",
         "ruleText": 'verb = "get"'},
        {"version": 1, "state": "Listening", "matches": -3, "stream": "audit",
         "ruleType": "composite", "ruleText": 'verb = "get"'},
    ],
)  # fmt: skip
def test_bad_snapshot_is_a_clear_error(snapshot: dict[str, Any]) -> None:
    with pytest.raises(SnapshotError):
        AlertTracker.restore(make_spec(), snapshot)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        AlertTracker(make_spec()).tick(datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("secret {objectRef_name} read by {user_username}", "secret db-pass read by alice"),
        ("{objectRef.namespace}/{objectRef.name}", "prod/db-pass"),
        ("groups: {user.groups}", "groups: dev, system:authenticated"),
        ("images {requestObject.spec.containers.image}", "images nginx, busybox"),
        ("code {responseStatus_code}, dry {requestObject.dryRun}", "code 200, dry false"),
        ("missing [{objectRef.subresource}] [{nothing_here}]", "missing [] []"),
        ("{annotations}", '{"k8s.io/x":"y"}'),
        ("plain text, {not a field}", "plain text, {not a field}"),
    ],
)
def test_message_template(template: str, expected: str) -> None:
    event = {
        "verb": "get",
        "user": {"username": "alice", "groups": ["dev", "system:authenticated"]},
        "objectRef": {"resource": "secrets", "namespace": "prod", "name": "db-pass"},
        "responseStatus": {"code": 200},
        "requestObject": {
            "dryRun": False,
            "spec": {"containers": [{"image": "nginx"}, {"image": "busybox"}]},
        },
        "annotations": {"k8s.io/x": "y"},
    }
    assert render_message(template, event) == expected
