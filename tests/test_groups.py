"""Grouped thresholds: each group fires and resolves on its own, by event time, within a cap.

The trackers are fed as the engine feeds them: real audit events, normalised, evaluated by the
stream's plan, their matching rows grouped by `rules/window.py`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.sample_data import SAMPLES

from auditwatch.alerts import AlertTracker, Notice, SnapshotError
from auditwatch.config.model import AlertSpec, RepeatSpec, TargetSpec, ThresholdSpec
from auditwatch.groups import GroupedTracker
from auditwatch.normalise import normalise
from auditwatch.rules.parse import parse_rule
from auditwatch.rules.plan import PlanAlert, StreamPlan

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
"""Wall-clock time of the tracker (resolves, repeats); event times are set separately."""
EVENT_T0 = datetime(2024, 10, 29, 12, 20, tzinfo=UTC)

DENIED = next(
    json.loads(line)
    for line in (SAMPLES / "secret-recon-then-exec.log").read_text().splitlines()
    if '"code":403' in line
)
"""A real refused request (mayor-malware lists secrets, 403, decision forbid)."""

RULE = 'annotations["authorization.k8s.io/decision"] = "forbid"'


def denial(user: str, at: float, number: int, code: int = 403) -> dict[str, Any]:
    """DENIED by `user`, `at` seconds of event time after EVENT_T0."""
    stamp = (EVENT_T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    return DENIED | {
        "auditID": f"denial-{user}-{number}",
        "user": {"username": user},
        "stageTimestamp": stamp,
        "requestReceivedTimestamp": stamp,
        "responseStatus": DENIED["responseStatus"] | {"code": code},
    }


def make_spec(
    count: int = 5,
    window: float = 60,
    group_by: tuple[str, ...] = ("user.username",),
    max_groups: int = 1000,
    resolve_after: float = 300,
) -> AlertSpec:
    columns = tuple(field.replace(".", "_") for field in group_by)
    return AlertSpec(
        namespace="sec",
        name="denied-burst",
        stream="audit",
        rule=parse_rule("composite", RULE),
        rule_type="composite",
        rule_text=RULE,
        message="{user.username} was refused",
        targets=(
            TargetSpec(
                type="webhook",
                endpoint="http://127.0.0.1:1/hook",
                name="hook",
                repeat=RepeatSpec(interval=timedelta(seconds=60), times=3),
            ),
        ),
        resolve_after=timedelta(seconds=resolve_after),
        threshold=ThresholdSpec(count, timedelta(seconds=window), group_by, columns, max_groups),
    )


def feed(tracker: GroupedTracker, events: list[dict[str, Any]], now: datetime) -> list[Notice]:
    """One request's events through the plan into the tracker, as the engine does."""
    assert tracker.spec.threshold is not None
    plan = StreamPlan(
        [PlanAlert("a", tracker.spec.rule.condition, group_by=tracker.spec.threshold.columns)]
    )
    batch = normalise(events, received_at=now)
    [result] = plan.evaluate(batch) or [None]
    if result is None:
        return tracker.tick(now)
    assert result.groups is not None
    return tracker.observe_groups(result.groups, batch.event, now)


def fired_groups(notices: list[Notice], kind: str = "firing") -> list[dict[str, str]]:
    return [dict(notice.group) for notice in notices if notice.kind == kind]


def test_a_group_fires_on_count_matches_within_the_window_of_event_time() -> None:
    tracker = GroupedTracker(make_spec())
    # Four denials in 40 s: not yet. Events arrive out of order; event time decides.
    assert feed(tracker, [denial("eve", t, t) for t in (30, 0, 40, 10)], NOW) == []
    assert tracker.status()["state"] == "Listening"
    notices = feed(tracker, [denial("eve", 55, 55)], NOW + timedelta(seconds=1))
    assert fired_groups(notices) == [{"user.username": "eve"}]
    [firing] = notices
    assert firing.count == 5 and firing.total == 5
    assert firing.event.audit_id == "denial-eve-55"
    status = tracker.status()
    assert status["state"] == "Firing" and status["matches"] == 5
    assert status["groups"] == {
        "firing": 1,
        "pending": 0,
        "evicted": 0,
        "top": [
            {
                "group": {"user.username": "eve"},
                "matches": 5,
                "firedAt": (NOW + timedelta(seconds=1)).isoformat(),
            }
        ],
    }


def test_denials_spread_over_time_or_across_users_do_not_fire() -> None:
    """What k8s-request-denied-burst did wrong: 403s over minutes, from different users."""
    tracker = GroupedTracker(make_spec())
    spread = [denial("eve", 70 * n, n) for n in range(6)]  # one every 70 s
    crowd = [denial(f"user-{n}", n, n) for n in range(20)]  # 20 users, one each
    four_each = [denial(user, n, n) for n in range(4) for user in ("ann", "bob", "cy")]
    assert feed(tracker, spread + crowd + four_each, NOW) == []
    assert tracker.status()["groups"]["pending"] == 1 + 20 + 3
    # A sixth denial 70 s after the fifth: the window holds two at most.
    assert feed(tracker, [denial("eve", 420, 9)], NOW) == []
    assert tracker.status()["state"] == "Listening"


def test_matches_across_batches_count_in_one_window() -> None:
    tracker = GroupedTracker(make_spec(count=3))
    assert feed(tracker, [denial("eve", 0, 0)], NOW) == []
    assert feed(tracker, [denial("eve", 20, 1), denial("bob", 20, 1)], NOW) == []
    assert fired_groups(feed(tracker, [denial("eve", 50, 2)], NOW)) == [{"user.username": "eve"}]


def test_groups_resolve_on_their_own_and_the_alert_with_the_last() -> None:
    tracker = GroupedTracker(make_spec(count=2, resolve_after=60))
    fired = feed(tracker, [denial("eve", 0, 0), denial("eve", 1, 1)], NOW)
    later = NOW + timedelta(seconds=40)
    fired += feed(tracker, [denial("bob", 2, 0), denial("bob", 3, 1)], later)
    assert fired_groups(fired) == [{"user.username": "eve"}, {"user.username": "bob"}]
    assert [n.sequence for n in fired] == [1, 2]  # one counter for the alert, across groups

    resolved = tracker.tick(NOW + timedelta(seconds=61))
    assert fired_groups(resolved, "resolved") == [{"user.username": "eve"}]
    assert resolved[0].sequence == 3
    assert tracker.status()["state"] == "Firing"
    assert tracker.status()["groups"]["firing"] == 1
    assert tracker.next_deadline() == later + timedelta(seconds=60)

    resolved = tracker.tick(later + timedelta(seconds=60))
    assert fired_groups(resolved, "resolved") == [{"user.username": "bob"}]
    status = tracker.status()
    assert status["state"] == "Resolved" and status["groups"]["firing"] == 0
    assert tracker.next_deadline() is None
    # eve again: a new firing of that group, the threshold counted anew.
    assert feed(tracker, [denial("eve", 500, 2)], later + timedelta(seconds=90)) == []


def test_a_firing_group_repeats_with_its_own_count() -> None:
    tracker = GroupedTracker(make_spec(count=2))
    feed(tracker, [denial("eve", 0, 0), denial("eve", 1, 1)], NOW)
    assert feed(tracker, [denial("eve", 2, n) for n in range(2, 5)], NOW) == []  # interval
    feed(tracker, [denial("bob", 2, 0)], NOW)
    [repeat] = tracker.tick(NOW + timedelta(seconds=60))
    assert (repeat.kind, repeat.count, repeat.total) == ("repeat", 3, 5)
    assert repeat.group == (("user.username", "eve"),)


def test_groups_beyond_the_cap_evict_the_oldest_pending_and_never_a_firing_one() -> None:
    tracker = GroupedTracker(make_spec(count=2, max_groups=2))
    feed(tracker, [denial("ann", 0, 0)], NOW)
    feed(tracker, [denial("bob", 1, 0)], NOW)
    feed(tracker, [denial("cy", 2, 0)], NOW)  # evicts ann, the pending group updated first
    assert tracker.evicted == 1
    assert feed(tracker, [denial("ann", 3, 1)], NOW) == []  # ann's first denial was lost
    assert tracker.evicted == 2  # bob went for it
    fired = feed(tracker, [denial("cy", 4, 1), denial("ann", 5, 2)], NOW)
    assert sorted(map(str, fired_groups(fired))) == [
        "{'user.username': 'ann'}",
        "{'user.username': 'cy'}",
    ]
    # Both kept groups fire: a new group is the one dropped, and the firing ones go on.
    assert feed(tracker, [denial("dan", 6, 0), denial("dan", 7, 1)], NOW) == []
    assert tracker.evicted == 3
    assert tracker.status()["groups"] | {"top": None} == {
        "firing": 2,
        "pending": 0,
        "evicted": 3,
        "top": None,
    }


def test_expired_pending_groups_make_room_without_counting_as_evicted() -> None:
    tracker = GroupedTracker(make_spec(count=2, window=60, max_groups=2))
    feed(tracker, [denial("ann", 0, 0), denial("bob", 0, 0)], NOW)
    feed(tracker, [denial("cy", 600, 0)], NOW)  # ann's and bob's windows have passed
    assert tracker.evicted == 0
    assert tracker.status()["groups"]["pending"] == 1


def test_several_group_fields_and_values_without_a_field() -> None:
    tracker = GroupedTracker(make_spec(count=2, group_by=("user.username", "objectRef.namespace")))
    cluster_wide = [denial("eve", n, n) | {"objectRef": {"resource": "nodes"}} for n in range(2)]
    [notice] = feed(tracker, cluster_wide, NOW)
    assert notice.group == (("user.username", "eve"), ("objectRef.namespace", ""))


def test_state_survives_a_restart_pending_windows_and_firing_groups() -> None:
    spec = make_spec(count=3, resolve_after=60)
    tracker = GroupedTracker(spec)
    feed(tracker, [denial("eve", 0, 0), denial("eve", 1, 1)], NOW)
    fired = feed(tracker, [denial("bob", n, n) for n in range(3)], NOW)
    snapshot = json.loads(json.dumps(tracker.snapshot()))

    restored = GroupedTracker.restore(spec, snapshot)
    assert restored.status() == tracker.status()
    # eve's two denials before the restart and one after make three within the window.
    again = feed(restored, [denial("eve", 2, 2)], NOW + timedelta(seconds=5))
    assert fired_groups(again) == [{"user.username": "eve"}]
    assert again[0].sequence == fired[-1].sequence + 1
    # bob, restored firing, is not notified as new; he resolves when his quiet period ends.
    resolved = restored.tick(NOW + timedelta(seconds=60))
    assert fired_groups(resolved, "resolved") == [{"user.username": "bob"}]


def test_a_changed_threshold_starts_afresh_keeping_the_sequence() -> None:
    spec = make_spec(count=2)
    tracker = GroupedTracker(spec)
    feed(tracker, [denial("eve", 0, 0), denial("eve", 1, 1)], NOW)
    restored = GroupedTracker.restore(make_spec(count=3), tracker.snapshot())
    assert restored.status()["state"] == "Listening" and restored.status()["matches"] == 0
    assert restored.sequence == tracker.sequence
    # An ungrouped tracker does not take the grouped counts either, nor the other way round.
    plain = AlertTracker.restore(replace(spec, threshold=None), tracker.snapshot())
    assert plain.total == 0 and plain.sequence == tracker.sequence
    grouped = GroupedTracker.restore(spec, plain.snapshot())
    assert grouped.total == 0


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ("nope", "groups: expected an object"),
        ({"pending": [["eve", [1]]]}, "groups.pending: expected a list of group values"),
        ({"pending": [[["eve"], []]]}, "groups.pending: expected non-empty lists of times"),
        ({"firing": [["eve"]]}, "groups.firing: expected a list of [group, state] pairs"),
        ({"evicted": -1}, "groups.evicted: expected a non-negative integer"),
    ],
)
def test_a_corrupt_snapshot_is_refused(groups: Any, message: str) -> None:
    spec = make_spec()
    snapshot = GroupedTracker(spec).snapshot() | {"groups": groups}
    with pytest.raises(SnapshotError, match=message.replace("[", r"\[")):
        GroupedTracker.restore(spec, snapshot)
