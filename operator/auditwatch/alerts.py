"""The life of one AuditAlert: Listening -> Firing -> Resolved, and the notices that go out.

Plain Python, no I/O and no clock: every call takes `now`, so the scheduler, the tests and a
restart all see the same behaviour. The tracker decides *what* to send and *when*; delivering
it is the job of `auditwatch.notify`.

Rules, and how they differ from Parseable's:
- The first match (for a column rule with `repeats: N`, the N-th match within one `resolve_after`
  window) fires the alert and every target gets a "firing" notice at once.
- While firing, a target gets a "repeat" notice once `repeat.interval` has passed since its last
  notice *and* new events matched since then (a repeat says "more of this happened": it carries
  the latest matching event and how many matched since the last notice). At most `repeat.times`
  notices per firing, the first included.
- `resolve_after` without a match resolves the alert (composite rules too) and every target gets
  one "resolved" notice, even when its repeats were used up. Nothing is sent after that.
- After a resolve the state stays `Resolved` until the next firing; `Listening` means the alert
  has not fired since it was created or its rule changed. Non-matching events are never seen
  here, so they cannot resolve anything (Parseable's column rules flap on them).
- Alertmanager targets also get "refresh" notices every `refresh_interval` while firing: not a
  user-visible notification but the periodic re-send Alertmanager expects of a client
  (Prometheus does it every minute), so it neither auto-resolves the alert nor counts toward
  `repeat.times`.
- State survives a restart (`snapshot` / `restore`): a restored firing alert does not notify
  again as new, and repeat counts continue. A spec change keeps the state when the stream and
  the rule text are unchanged (a new message or new targets need no fresh start), and starts
  from `Listening` otherwise: matches of the old rule say nothing about the new one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from auditwatch.config.model import AlertSpec, TargetSpec, TargetType
from auditwatch.paths import lookup

AlertState = Literal["Listening", "Firing", "Resolved"]
NoticeKind = Literal["firing", "repeat", "resolved", "refresh"]

ALERTMANAGER_REFRESH_INTERVAL = timedelta(seconds=60)
"""How often an active alert is re-sent to Alertmanager (Prometheus' resend delay)."""

SNAPSHOT_VERSION = 1

_PLACEHOLDER = re.compile(r"\{([^{}\s]+)\}")


class SnapshotError(ValueError):
    """A saved alert state that cannot be read back (corrupt, or from an unknown version)."""


def _text(value: Any) -> str:
    """One template value as text: JSON spelling for booleans and objects, as-is otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def render_message(template: str, event: dict[str, Any]) -> str:
    """`template` with every `{field}` replaced by that field's value in `event`.

    Fields are dotted (`objectRef.name`) or flattened the Parseable way (`objectRef_name`); several
    values (a list, or a path through a list) are joined with ", "; a missing field is empty.
    """
    return _PLACEHOLDER.sub(
        lambda match: ", ".join(_text(value) for value in lookup(event, match.group(1))), template
    )


def _first_text(event: dict[str, Any], name: str) -> str | None:
    values = lookup(event, name)
    return _text(values[0]) if values else None


@dataclass(frozen=True)
class EventSummary:
    """What a notice and the status say about a matching event, without its whole body."""

    audit_id: str | None = None
    user: str | None = None
    verb: str | None = None
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    code: int | None = None
    stage_timestamp: str | None = None
    source_ips: tuple[str, ...] = ()

    @classmethod
    def of(cls, event: dict[str, Any]) -> EventSummary:
        codes = [
            code
            for code in lookup(event, "responseStatus.code")
            if isinstance(code, int) and not isinstance(code, bool)
        ]
        return cls(
            audit_id=_first_text(event, "auditID"),
            user=_first_text(event, "user.username"),
            verb=_first_text(event, "verb"),
            resource=_first_text(event, "objectRef.resource"),
            subresource=_first_text(event, "objectRef.subresource"),
            namespace=_first_text(event, "objectRef.namespace"),
            name=_first_text(event, "objectRef.name"),
            code=codes[0] if codes else None,
            stage_timestamp=_first_text(event, "stageTimestamp")
            or _first_text(event, "requestReceivedTimestamp")
            or _first_text(event, "timestamp"),
            source_ips=tuple(_text(ip) for ip in lookup(event, "sourceIPs")),
        )

    def as_status(self) -> dict[str, str | None]:
        """The short form for an AuditAlert's `status.lastMatch`."""
        return {
            "user": self.user,
            "verb": self.verb,
            "resource": self.resource,
            "namespace": self.namespace,
            "name": self.name,
            "auditID": self.audit_id,
        }

    def as_json(self) -> dict[str, Any]:
        """The full form, in audit-event spelling, for notification bodies."""
        return {
            "auditID": self.audit_id,
            "user": self.user,
            "verb": self.verb,
            "resource": self.resource,
            "subresource": self.subresource,
            "namespace": self.namespace,
            "name": self.name,
            "code": self.code,
            "stageTimestamp": self.stage_timestamp,
            "sourceIPs": list(self.source_ips),
        }


@dataclass(frozen=True)
class Notice:
    """One notification for one target, ready for `auditwatch.notify` to deliver."""

    alert: str
    """The alert's key, `namespace/name`."""
    target: str
    """The target's name within the alert (`TargetSpec.name`)."""
    target_type: TargetType
    kind: NoticeKind
    message: str
    """`spec.message` rendered with the latest matching event."""
    count: int
    """Events that matched since the previous notice to this target (for "firing": so far)."""
    total: int
    """Events that matched since the alert was created (or its rule last changed)."""
    event: EventSummary
    """The latest matching event."""
    fired_at: datetime
    resolved_at: datetime | None
    sequence: int
    """Increases with every notice of this alert, across restarts: a receiver can de-duplicate."""
    group: tuple[tuple[str, str], ...] = ()
    """With a grouped threshold: the group this notice is about, (field, value) in `groupBy`
    order; `count`, `total` and the times are then the group's own."""

    @property
    def state(self) -> Literal["firing", "resolved"]:
        return "resolved" if self.kind == "resolved" else "firing"


@dataclass
class _TargetState:
    """Per-target bookkeeping of the current firing."""

    notices: int = 0
    """User-visible notices (firing + repeats) sent in this firing."""
    last_notice: datetime | None = None
    unreported: int = 0
    """Matches since the last notice."""
    last_sent: datetime | None = None
    """Last notice of any kind, refreshes included."""


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"alert times must be timezone-aware, got {now.isoformat()}")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _parse_time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SnapshotError(f"{what}: expected an ISO time string, got {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise SnapshotError(f"{what}: {err}") from None
    if moment.tzinfo is None:
        raise SnapshotError(f"{what}: time {value!r} has no timezone")
    return moment


def _parse_required_time(value: Any, what: str) -> datetime:
    moment = _parse_time(value, what)
    if moment is None:
        raise SnapshotError(f"{what}: a time is missing")
    return moment


def _parse_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SnapshotError(f"{what}: expected a non-negative integer, got {value!r}")
    return value


def threshold_identity(spec: AlertSpec) -> list[Any] | None:
    """What of a threshold its saved counts depend on (None without one), as JSON."""
    threshold = spec.threshold
    if threshold is None:
        return None
    return [threshold.count, threshold.window.total_seconds(), list(threshold.columns)]


def continues(spec: AlertSpec, snapshot: dict[str, Any]) -> bool:
    """Whether a tracker restored from `snapshot` keeps its matches: same stream, rule and
    threshold."""
    return (
        snapshot.get("stream") == spec.stream
        and snapshot.get("ruleType") == spec.rule_type
        and snapshot.get("ruleText") == spec.rule_text
        and snapshot.get("threshold") == threshold_identity(spec)
    )


class AlertTracker:
    """The state of one alert, fed with its matching events and with the passing of time."""

    def __init__(
        self, spec: AlertSpec, *, refresh_interval: timedelta = ALERTMANAGER_REFRESH_INTERVAL
    ) -> None:
        self.spec = spec
        """Read-only: a changed spec is applied with `restore(new_spec, tracker.snapshot())`."""
        self.refresh_interval = refresh_interval
        self.state: AlertState = "Listening"
        self.total = 0
        self.excepted = 0
        """Events the rule matched that the alert's exceptions excepted (not in `total`)."""
        self.last_match_time: datetime | None = None
        self.last_event: dict[str, Any] | None = None
        self.fired_at: datetime | None = None
        self.resolved_at: datetime | None = None
        self.sequence = 0
        self._recent: list[datetime] = []
        """Times of matches not yet enough to fire (column rules with repeats > 1)."""
        self._targets: dict[str, _TargetState] = {}
        """While firing: one entry per target of `spec`, by name."""

    # -- feeding ----------------------------------------------------------------------------

    def observe(self, count: int, latest: dict[str, Any], now: datetime) -> list[Notice]:
        """Take in `count` events that matched the rule at `now`, the last of them `latest`.

        Returns the notices now due. Only the count and the latest event matter (a repeat says
        how many matched and shows the latest), so the caller need not materialise the others.
        A firing whose quiet period ended before `now` is resolved first, so a match after a long
        silence yields "resolved" for the old firing and then "firing" for the new one.
        """
        notices = self.tick(now)
        if count <= 0:
            return notices
        if not isinstance(latest, dict):
            raise TypeError(f"a matching event must be a JSON object, got {type(latest)}")
        self.total += count
        self.last_event = latest
        self.last_match_time = now
        unreported = count
        if self.state != "Firing":
            window_start = now - self.spec.resolve_after
            recent = [t for t in self._recent if t > window_start]
            missing = max(self.spec.rule.repeats, 1) - len(recent)
            if count < missing:
                self._recent = recent + [now] * count
                return notices
            self._fire(now, len(recent) + missing)
            unreported = count - missing
        for target in self._targets.values():
            target.unreported += unreported
        return notices + self._due(now)

    def tick(self, now: datetime) -> list[Notice]:
        """Notices that time alone makes due at `now`: repeats, refreshes, the resolve."""
        _require_aware(now)
        return self._due(now)

    def next_deadline(self) -> datetime | None:
        """When `tick` may next have something to do; None while not firing."""
        if self.state != "Firing" or self.last_match_time is None or self.fired_at is None:
            return None
        deadlines = [self.last_match_time + self.spec.resolve_after]
        for wanted in self.spec.targets:
            target = self._targets[wanted.name]
            if target.notices == 0:
                deadlines.append(self.fired_at)
                continue
            assert target.last_notice is not None and target.last_sent is not None
            if target.unreported and target.notices < max(wanted.repeat.times, 1):
                deadlines.append(target.last_notice + wanted.repeat.interval)
            if wanted.type == "alertmanager":
                deadlines.append(target.last_sent + self.refresh_interval)
        return min(deadlines)

    # -- transitions ------------------------------------------------------------------------

    def _fire(self, now: datetime, matched: int) -> None:
        self.state = "Firing"
        self.fired_at = now
        self.resolved_at = None
        self._recent = []
        self._targets = {
            wanted.name: _TargetState(unreported=matched) for wanted in self.spec.targets
        }

    def _due(self, now: datetime) -> list[Notice]:
        if self.state != "Firing":
            return []
        assert self.last_match_time is not None
        resolve_at = self.last_match_time + self.spec.resolve_after
        if now >= resolve_at:
            return self._resolve(resolve_at)
        notices = []
        for wanted in self.spec.targets:
            target = self._targets[wanted.name]
            kind: NoticeKind | None = None
            if target.notices == 0:
                kind = "firing"
            elif (
                target.unreported
                and target.notices < max(wanted.repeat.times, 1)
                and target.last_notice is not None
                and now >= target.last_notice + wanted.repeat.interval
            ):
                kind = "repeat"
            elif (
                wanted.type == "alertmanager"
                and target.last_sent is not None
                and now >= target.last_sent + self.refresh_interval
            ):
                kind = "refresh"
            if kind is None:
                continue
            notices.append(self._notice(wanted, kind, target.unreported))
            target.last_sent = now
            if kind != "refresh":
                target.notices += 1
                target.last_notice = now
                target.unreported = 0
        return notices

    def _resolve(self, resolved_at: datetime) -> list[Notice]:
        self.state = "Resolved"
        self.resolved_at = resolved_at
        notices = [
            self._notice(wanted, "resolved", self._targets[wanted.name].unreported)
            for wanted in self.spec.targets
        ]
        self._targets = {}
        return notices

    def _notice(self, target: TargetSpec, kind: NoticeKind, count: int) -> Notice:
        assert self.last_event is not None and self.fired_at is not None
        self.sequence += 1
        return Notice(
            alert=self.spec.key,
            target=target.name,
            target_type=target.type,
            kind=kind,
            message=render_message(self.spec.message, self.last_event),
            count=count,
            total=self.total,
            event=EventSummary.of(self.last_event),
            fired_at=self.fired_at,
            resolved_at=self.resolved_at,
            sequence=self.sequence,
        )

    # -- reporting and persistence ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The alert's part of an AuditAlert status (camelCase, JSON-ready)."""
        return {
            "state": self.state,
            "matches": self.total,
            "excepted": self.excepted,
            "lastMatchTime": _iso(self.last_match_time),
            "lastMatch": None
            if self.last_event is None
            else EventSummary.of(self.last_event).as_status(),
            "firedAt": _iso(self.fired_at),
            "resolvedAt": _iso(self.resolved_at),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue after a restart, as JSON-ready data.

        The latest matching event is kept whole: repeats and the resolve render the message
        template from it, and the template may name any field.
        """
        return {
            "version": SNAPSHOT_VERSION,
            "stream": self.spec.stream,
            "ruleType": self.spec.rule_type,
            "ruleText": self.spec.rule_text,
            "state": self.state,
            "matches": self.total,
            "excepted": self.excepted,
            "lastMatchTime": _iso(self.last_match_time),
            "lastEvent": self.last_event,
            "firedAt": _iso(self.fired_at),
            "resolvedAt": _iso(self.resolved_at),
            "sequence": self.sequence,
            "recent": [moment.isoformat() for moment in self._recent],
            "targets": {
                name: {
                    "notices": target.notices,
                    "lastNotice": _iso(target.last_notice),
                    "unreported": target.unreported,
                    "lastSent": _iso(target.last_sent),
                }
                for name, target in self._targets.items()
            },
        }

    @classmethod
    def restore(
        cls,
        spec: AlertSpec,
        snapshot: dict[str, Any],
        *,
        refresh_interval: timedelta = ALERTMANAGER_REFRESH_INTERVAL,
    ) -> AlertTracker:
        """A tracker for `spec` that continues from `snapshot` (see the module doc for when not).

        Also the way to apply a changed spec to a live tracker: `restore(new, old.snapshot())`.
        Raises SnapshotError when the snapshot cannot be read.
        """
        tracker = cls(spec, refresh_interval=refresh_interval)
        if not isinstance(snapshot, dict) or snapshot.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"unknown alert state snapshot version in {str(snapshot)[:80]!r}")
        same_rule = continues(spec, snapshot)
        state = snapshot.get("state")
        if state not in ("Listening", "Firing", "Resolved"):
            raise SnapshotError(f"state: unknown alert state {state!r}")
        last_event = snapshot.get("lastEvent")
        if last_event is not None and not isinstance(last_event, dict):
            raise SnapshotError("lastEvent: expected a JSON object")
        tracker.sequence = _parse_int(snapshot.get("sequence", 0), "sequence")
        if not same_rule:
            return tracker
        tracker.state = state
        tracker.total = _parse_int(snapshot.get("matches", 0), "matches")
        tracker.excepted = _parse_int(snapshot.get("excepted", 0), "excepted")
        tracker.last_match_time = _parse_time(snapshot.get("lastMatchTime"), "lastMatchTime")
        tracker.last_event = last_event
        tracker.fired_at = _parse_time(snapshot.get("firedAt"), "firedAt")
        tracker.resolved_at = _parse_time(snapshot.get("resolvedAt"), "resolvedAt")
        recent = snapshot.get("recent", [])
        if not isinstance(recent, list):
            raise SnapshotError("recent: expected a list of times")
        tracker._recent = [_parse_required_time(moment, "recent") for moment in recent]
        targets = snapshot.get("targets", {})
        if not isinstance(targets, dict):
            raise SnapshotError("targets: expected an object")
        saved_targets = {}
        for name, saved in targets.items():
            if not isinstance(saved, dict):
                raise SnapshotError(f"targets.{name}: expected an object")
            saved_targets[name] = restored = _TargetState(
                notices=_parse_int(saved.get("notices", 0), f"targets.{name}.notices"),
                last_notice=_parse_time(saved.get("lastNotice"), f"targets.{name}.lastNotice"),
                unreported=_parse_int(saved.get("unreported", 0), f"targets.{name}.unreported"),
                last_sent=_parse_time(saved.get("lastSent"), f"targets.{name}.lastSent"),
            )
            if restored.notices and (restored.last_notice is None or restored.last_sent is None):
                raise SnapshotError(f"targets.{name}: notices were sent but their time is missing")
        if state == "Firing" and (
            tracker.last_match_time is None or tracker.fired_at is None or last_event is None
        ):
            raise SnapshotError("a firing alert needs lastMatchTime, firedAt and lastEvent")
        if state == "Firing":
            # Targets added since are told about the ongoing firing; removed ones are dropped.
            tracker._targets = {
                target.name: saved_targets.get(target.name) or _TargetState()
                for target in spec.targets
            }
        return tracker


__all__ = [
    "ALERTMANAGER_REFRESH_INTERVAL",
    "AlertState",
    "AlertTracker",
    "EventSummary",
    "Notice",
    "NoticeKind",
    "SnapshotError",
    "continues",
    "render_message",
]


def kept_status(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the status of an alert that is Invalid for now shows of the state it keeps (from
    its snapshot): the state it continues in, its matches and its last match. None if none."""
    if not isinstance(snapshot, dict) or snapshot.get("state") not in (
        "Listening",
        "Firing",
        "Resolved",
    ):
        return None
    last_event = snapshot.get("lastEvent")
    matches = snapshot.get("matches")
    excepted = snapshot.get("excepted")
    return {
        "state": snapshot["state"],
        "matches": matches if isinstance(matches, int) and not isinstance(matches, bool) else 0,
        "excepted": excepted if isinstance(excepted, int) and not isinstance(excepted, bool) else 0,
        "lastMatchTime": snapshot.get("lastMatchTime"),
        "lastMatch": EventSummary.of(last_event).as_status()
        if isinstance(last_event, dict)
        else None,
    }
