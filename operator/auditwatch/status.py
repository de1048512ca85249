"""Status of streams and alerts, in the shape of their custom resources' `.status`.

The same dicts are served at `GET /api/v1/status`, shown by `auditwatch status` and patched onto
the resources by the operator, so what a user sees does not depend on how auditwatch runs.
Conditions follow metav1.Condition and kstatus: `Ready` True/False with a CamelCase reason,
`observedGeneration` both top-level and in the condition, and a `lastTransitionTime` that moves
only when the condition's status does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from auditwatch.config.model import ConfigError, StreamSpec
from auditwatch.store import StreamStats

ALERT_STATUS_FIELDS = ("state", "matches", "excepted", "lastMatchTime", "lastMatch", "groups")
"""What an alert tracker reports that the AuditAlert status schema has room for."""

TARGET_STATUS_FIELDS = ("lastSuccess", "lastError", "lastErrorTime", "sent", "failed")


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, to the second, as Kubernetes writes metav1.Time."""
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


STREAM_KEY = "AuditStream/{}"
ALERT_KEY = "AuditAlert/{}"
"""Keys of `Conditions`, by kind, so a stream and an alert never share one."""


@dataclass
class Conditions:
    """Remembers when each resource's Ready condition last changed status."""

    _since: dict[str, tuple[bool, datetime]] = field(default_factory=dict)

    def note(self, key: str, ok: bool, now: datetime) -> datetime:
        """Record the current readiness; returns when it last changed."""
        previous = self._since.get(key)
        if previous is None or previous[0] != ok:
            self._since[key] = (ok, now)
        return self._since[key][1]

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of resources not in `keep` (deleted ones)."""
        self._since = {key: value for key, value in self._since.items() if key in keep}

    def ready(
        self, key: str, ok: bool, reason: str, message: str, generation: int, now: datetime
    ) -> list[dict[str, Any]]:
        """The `conditions` list of a status: one `Ready` condition."""
        return [
            {
                "type": "Ready",
                "status": "True" if ok else "False",
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": iso(self.note(key, ok, now)),
            }
        ]


def stream_status(
    spec: StreamSpec,
    stats: StreamStats,
    conditions: Conditions,
    now: datetime,
    storage_failure: str | None = None,
) -> dict[str, Any]:
    """An AuditStream's status: ready to receive (not while `storage_failure` says why storage
    writes fail), events kept, the newest one, the path."""
    if storage_failure is None:
        ok, reason = True, "Receiving"
        message = (
            f"POST events to /api/v1/logstream/{spec.name} or /api/v1/ingest "
            f"with X-P-Stream: {spec.name}"
        )
    else:
        ok, reason, message = False, "StorageFailing", f"storage writes fail: {storage_failure}"
    return {
        "observedGeneration": spec.generation,
        "eventsReceived": stats.events,
        "lastEventTime": iso(stats.last_received),
        "ingestPath": f"/api/v1/logstream/{spec.name}",
        "conditions": conditions.ready(
            STREAM_KEY.format(spec.name), ok, reason, message, spec.generation, now
        ),
    }


def alert_status(
    namespace: str,
    name: str,
    stream: str | None,
    generation: int,
    tracker: dict[str, Any] | None,
    deliveries: dict[str, dict[str, Any]],
    problem: ConfigError | None,
    conditions: Conditions,
    now: datetime,
) -> dict[str, Any]:
    """An AuditAlert's status, from its tracker and delivery records, or from its problem.

    With a problem the state is Invalid; `tracker` is then the state it keeps meanwhile (see
    `kept_status`), whose counts, last match and deliveries are shown, or None.
    """
    key = ALERT_KEY.format(f"{namespace}/{name}")
    status: dict[str, Any] = {"namespace": namespace, "name": name, "stream": stream}
    if tracker is not None:
        status.update({k: tracker[k] for k in ALERT_STATUS_FIELDS if tracker.get(k) is not None})
    if deliveries or problem is None:
        status["targets"] = [
            {"name": target} | {k: v for k, v in record.items() if k in TARGET_STATUS_FIELDS}
            for target, record in sorted(deliveries.items())
        ]
    if problem is not None:
        message = problem.message
        if tracker is not None:
            message += (
                f" (kept meanwhile: state {tracker['state']}, {tracker['matches']} match(es))"
            )
        if tracker is not None:
            status["keptState"] = tracker["state"]
        status.update(state="Invalid", matches=status.get("matches", 0))
        ready = conditions.ready(key, False, problem.reason, message, generation, now)
    else:
        assert tracker is not None
        message = f"rule active on stream {stream}; state {tracker['state']}"
        ready = conditions.ready(key, True, "RuleActive", message, generation, now)
    status["observedGeneration"] = generation
    status["conditions"] = ready
    return status
