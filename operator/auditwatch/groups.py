"""The life of an AuditAlert with a grouped threshold: each group fires and resolves on its own.

`threshold: {count: 5, window: 1m, groupBy: [user.username]}` fires for a user once 5 of their
matching events fall within one minute of event time (`stageTimestamp`, else
`requestReceivedTimestamp`, else when auditwatch received the event), whatever other users do.
A group that fired is an `AlertTracker` of its own (alerts.py): it notifies, repeats and
resolves (`resolve_after` without a match *of that group*) exactly as an ungrouped alert does,
and each of its notices carries the group. The alert as a whole is Firing while any group is,
Resolved once the last one resolved. Notice sequence numbers are the alert's, shared by all
its groups, so a receiver still de-duplicates on one counter.

Memory is bounded: a group not firing keeps at most `count - 1` event times, only those within
`window` of its latest; at most `max_groups` groups (pending and firing) are kept. A new group
beyond the cap first drops pending groups whose window has passed, then the pending group
updated longest ago; a firing group is never dropped (it owes its targets a resolve), so when
every kept group is firing the new one is the one dropped. Drops are counted (`evicted`, and
`auditwatch_alert_groups_evicted` in /metrics).

State survives a restart (`snapshot` / `restore`): pending windows and firing groups with
their delivery bookkeeping, under the same conditions as an ungrouped alert (`continues`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from auditwatch.alerts import (
    ALERTMANAGER_REFRESH_INTERVAL,
    AlertState,
    AlertTracker,
    Notice,
    SnapshotError,
    continues,
    threshold_identity,
)
from auditwatch.config.model import AlertSpec, ThresholdSpec
from auditwatch.rules.window import GroupedRows, Key

TOP_GROUPS = 5
"""Firing groups a status lists (those with the most matches): a status stays small."""

_SCALARS = (str, int, type(None))


def _group_text(value: str | int | None) -> str:
    return "" if value is None else str(value)


def _key(value: Any, what: str) -> Key:
    if not isinstance(value, list) or not all(
        isinstance(part, _SCALARS) and not isinstance(part, bool) for part in value
    ):
        raise SnapshotError(f"{what}: expected a list of group values, got {value!r}")
    return tuple(value)


class GroupedTracker:
    """The state of one alert with a threshold, fed per batch with its matches by group."""

    def __init__(
        self, spec: AlertSpec, *, refresh_interval: timedelta = ALERTMANAGER_REFRESH_INTERVAL
    ) -> None:
        if spec.threshold is None:
            raise ValueError(f"alert {spec.key} has no threshold")
        self.spec = spec
        self.threshold: ThresholdSpec = spec.threshold
        self.refresh_interval = refresh_interval
        self.total = 0
        self.excepted = 0
        """Events the rule matched that the alert's exceptions excepted (not in `total`)."""
        self.last_match_time: datetime | None = None
        self.last_event: dict[str, Any] | None = None
        self.fired_at: datetime | None = None
        """When the first group of the current firing fired."""
        self.resolved_at: datetime | None = None
        self.sequence = 0
        self.evicted = 0
        """Groups dropped at the `max_groups` cap, since the alert was created."""
        self._window = int(self.threshold.window / timedelta(microseconds=1))
        self._latest_time = 0
        """The latest event time seen (µs): pending times older than a window before it are
        of no more use."""
        self._pending: dict[Key, list[int]] = {}
        """Groups not firing: event times (µs) of their recent matches, updated last at the
        end (a dict keeps insertion order: the first is the one updated longest ago)."""
        self._firing: dict[Key, AlertTracker] = {}
        self._group_spec = replace(spec, threshold=None)
        """What each firing group's tracker runs: the alert without its threshold."""

    @property
    def state(self) -> AlertState:
        if self._firing:
            return "Firing"
        return "Listening" if self.fired_at is None else "Resolved"

    # -- feeding ----------------------------------------------------------------------------

    def observe_groups(
        self, groups: GroupedRows, event: Callable[[int], dict[str, Any]], now: datetime
    ) -> list[Notice]:
        """Take in one batch's matches, by group; `event(row)` reads a row's event (only the
        rows a notice or the status shows are read). Returns the notices now due."""
        notices = self.tick(now)
        if not groups.keys:
            return notices
        count = self.threshold.count
        for key, matched, last_row, times in zip(
            groups.keys, groups.counts, groups.last_rows, groups.times, strict=True
        ):
            self.total += matched
            self._latest_time = max(self._latest_time, times[-1])
            firing = self._firing.get(key)
            if firing is not None:
                notices += self._run(key, firing, matched, event(last_row), now)
                continue
            recent = sorted(self._pending.pop(key, []) + times)
            fired_at = next(
                (
                    end
                    for end in range(count - 1, len(recent))
                    if recent[end] - recent[end - count + 1] <= self._window
                ),
                None,
            )
            if fired_at is None:
                self._keep_pending(key, recent)
                continue
            if not self._make_room():
                self.evicted += 1
                continue
            if not self._firing:  # the alert's firing starts with its first group's
                self.fired_at, self.resolved_at = now, None
            self._firing[key] = tracker = AlertTracker(
                self._group_spec, refresh_interval=self.refresh_interval
            )
            reported = len(recent) - (fired_at - count + 1)
            notices += self._run(key, tracker, reported, event(last_row), now)
        last = max(range(len(groups.keys)), key=groups.last_rows.__getitem__)
        self.last_event = event(groups.last_rows[last])
        self.last_match_time = now
        return notices

    def _keep_pending(self, key: Key, recent: list[int]) -> None:
        """Keep the times that may still count toward a firing: the last count - 1 within a
        window of the group's latest."""
        start = recent[-1] - self._window
        kept = [moment for moment in recent[-(self.threshold.count - 1) :] if moment >= start]
        if key in self._pending or self._make_room():
            self._pending[key] = kept
        else:
            self.evicted += 1

    def _make_room(self) -> bool:
        """Room for one more group under the cap: expired pending groups go first, then the
        pending group updated longest ago (counted). False when every kept group is firing."""
        if len(self._pending) + len(self._firing) < self.threshold.max_groups:
            return True
        horizon = self._latest_time - self._window
        for key in [key for key, times in self._pending.items() if times[-1] < horizon]:
            del self._pending[key]
        if len(self._pending) + len(self._firing) < self.threshold.max_groups:
            return True
        if not self._pending:
            return False
        del self._pending[next(iter(self._pending))]
        self.evicted += 1
        return True

    def tick(self, now: datetime) -> list[Notice]:
        """Repeats, refreshes and resolves of every firing group now due."""
        notices: list[Notice] = []
        for key, tracker in list(self._firing.items()):
            notices += self._run(key, tracker, 0, None, now)
        return notices

    def _run(
        self,
        key: Key,
        tracker: AlertTracker,
        matched: int,
        latest: dict[str, Any] | None,
        now: datetime,
    ) -> list[Notice]:
        """One group's tracker fed (`matched` events, the last `latest`) or ticked, numbering
        its notices in the alert's sequence and naming the group; a resolved group is dropped."""
        tracker.sequence = self.sequence
        notices = tracker.tick(now) if latest is None else tracker.observe(matched, latest, now)
        self.sequence = tracker.sequence
        if tracker.state == "Resolved":
            del self._firing[key]
            self.resolved_at = tracker.resolved_at
        group = self._group(key)
        return [replace(notice, group=group) for notice in notices]

    def _group(self, key: Key) -> tuple[tuple[str, str], ...]:
        return tuple(
            (field, _group_text(value))
            for field, value in zip(self.threshold.group_by, key, strict=True)
        )

    def next_deadline(self) -> datetime | None:
        """When `tick` may next have something to do; None while no group fires."""
        deadlines = [
            deadline
            for tracker in self._firing.values()
            if (deadline := tracker.next_deadline()) is not None
        ]
        return min(deadlines, default=None)

    # -- reporting and persistence ----------------------------------------------------------

    def _whole(self) -> AlertTracker:
        """The alert as a whole, held as an ungrouped alert's tracker holds it (without targets:
        its groups notify), for the status and snapshot fields they share."""
        whole = AlertTracker(self._group_spec)
        whole.state, whole.total, whole.sequence = self.state, self.total, self.sequence
        whole.excepted = self.excepted
        whole.last_match_time, whole.last_event = self.last_match_time, self.last_event
        whole.fired_at, whole.resolved_at = self.fired_at, self.resolved_at
        return whole

    def status(self) -> dict[str, Any]:
        """The alert's part of an AuditAlert status: as an ungrouped alert's, plus `groups`."""
        top = sorted(self._firing.items(), key=lambda item: -item[1].total)[:TOP_GROUPS]
        return self._whole().status() | {
            "groups": {
                "firing": len(self._firing),
                "pending": len(self._pending),
                "evicted": self.evicted,
                "top": [
                    {
                        "group": dict(self._group(key)),
                        "matches": tracker.total,
                        "firedAt": tracker.status()["firedAt"],
                    }
                    for key, tracker in top
                ],
            },
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue after a restart, as JSON-ready data."""
        return self._whole().snapshot() | {
            "threshold": threshold_identity(self.spec),
            "groups": {
                "evicted": self.evicted,
                "latestTime": self._latest_time,
                "pending": [[list(key), times] for key, times in self._pending.items()],
                "firing": [
                    [list(key), tracker.snapshot()] for key, tracker in self._firing.items()
                ],
            },
        }

    @classmethod
    def restore(
        cls,
        spec: AlertSpec,
        snapshot: dict[str, Any],
        *,
        refresh_interval: timedelta = ALERTMANAGER_REFRESH_INTERVAL,
    ) -> GroupedTracker:
        """A tracker for `spec` that continues from `snapshot` where `continues` says so (and
        from its sequence number always). Raises SnapshotError when it cannot be read."""
        tracker = cls(spec, refresh_interval=refresh_interval)
        whole = AlertTracker.restore(replace(spec, threshold=None), _ungrouped(snapshot))
        tracker.sequence = whole.sequence
        if not continues(spec, snapshot):
            return tracker
        tracker.total, tracker.last_event = whole.total, whole.last_event
        tracker.excepted = whole.excepted
        tracker.last_match_time = whole.last_match_time
        tracker.fired_at, tracker.resolved_at = whole.fired_at, whole.resolved_at
        groups = snapshot.get("groups")
        if not isinstance(groups, dict):
            raise SnapshotError("groups: expected an object")
        for name in ("evicted", "latestTime"):
            value = groups.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SnapshotError(f"groups.{name}: expected a non-negative integer")
        tracker.evicted, tracker._latest_time = (
            groups.get("evicted", 0),
            groups.get("latestTime", 0),
        )
        for entry in _pairs(groups.get("pending", []), "groups.pending"):
            times = entry[1]
            if (
                not isinstance(times, list)
                or not times
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in times)
            ):
                raise SnapshotError("groups.pending: expected non-empty lists of times")
            tracker._pending[_key(entry[0], "groups.pending")] = times
        for entry in _pairs(groups.get("firing", []), "groups.firing"):
            group = AlertTracker.restore(
                tracker._group_spec, entry[1], refresh_interval=refresh_interval
            )
            if group.state == "Firing":
                tracker._firing[_key(entry[0], "groups.firing")] = group
        return tracker


def _pairs(value: Any, what: str) -> list[list[Any]]:
    if not isinstance(value, list) or not all(
        isinstance(entry, list) and len(entry) == 2 for entry in value
    ):
        raise SnapshotError(f"{what}: expected a list of [group, state] pairs")
    return value


def _ungrouped(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The alert-wide part of a grouped snapshot, as `AlertTracker.restore` reads it."""
    if not isinstance(snapshot, dict):
        raise SnapshotError(f"unknown alert state snapshot {str(snapshot)[:80]!r}")
    whole = {k: v for k, v in snapshot.items() if k not in ("threshold", "groups")}
    if whole.get("state") == "Firing":
        whole["state"] = "Resolved"  # its groups hold the firing
    return whole
