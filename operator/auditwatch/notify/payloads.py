"""The bodies each target type expects, built from a Notice (pure functions, no I/O).

Webhook receivers get structured JSON (Parseable sends plain text); Slack gets a readable line;
Alertmanager gets its v2 alert array with a label set that is the same for every send of one
alert, so a resolve really clears what the firing raised (Parseable's resolve does not).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from auditwatch.alerts import ALERTMANAGER_REFRESH_INTERVAL, Notice
from auditwatch.config.model import AlertSpec

ALERTMANAGER_ENDS_AFTER = 4 * ALERTMANAGER_REFRESH_INTERVAL
"""How far ahead an active alert's `endsAt` lies: a few missed refreshes end it (as Prometheus
does), so an alert whose sender died does not stay active forever."""

_KIND_TITLES = {
    "firing": "FIRING",
    "repeat": "FIRING (repeat)",
    "resolved": "RESOLVED",
    "refresh": "FIRING",
}


_NOT_IN_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _timestamp(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with a `Z`, the spelling Alertmanager and most tools print."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def webhook_body(spec: AlertSpec, notice: Notice, sent_at: datetime) -> dict[str, Any]:
    """The JSON document a generic webhook receives."""
    return {
        "alert": spec.name,
        "namespace": spec.namespace,
        "stream": spec.stream,
        "severity": spec.severity,
        "state": notice.state,
        "kind": notice.kind,
        "message": notice.message,
        "count": notice.count,
        "total": notice.total,
        "sequence": notice.sequence,
        "event": notice.event.as_json(),
        "firedAt": _timestamp(notice.fired_at),
        "resolvedAt": _timestamp(notice.resolved_at),
        "sentAt": _timestamp(sent_at),
    } | ({"group": dict(notice.group)} if notice.group else {})


def slack_text(spec: AlertSpec, notice: Notice) -> str:
    """One readable Slack message: what, where, how many, and who did it last."""
    event = notice.event
    target = "/".join(part for part in (event.namespace, event.resource, event.name) if part)
    group = ", ".join(f"{field}={value}" for field, value in notice.group)
    lines = [
        f"[{_KIND_TITLES[notice.kind]}] {spec.key}{f' [{group}]' if group else ''} "
        f"(stream {spec.stream}): {notice.message}",
        f"{notice.count} matching event(s) since the last notice, {notice.total} in all.",
        f"Latest: {event.user or '?'} {event.verb or '?'} {target or '?'}"
        + (f" (auditID {event.audit_id})" if event.audit_id else ""),
    ]
    if notice.kind == "resolved":
        lines[1] = f"No match since {_timestamp(notice.resolved_at)}; {notice.total} in all."
    return "\n".join(lines)


def slack_body(spec: AlertSpec, notice: Notice) -> dict[str, Any]:
    """An incoming-webhook payload."""
    return {"text": slack_text(spec, notice)}


def alertmanager_labels(spec: AlertSpec, group: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """The label set identifying this alert (of a grouped threshold: this group of it) in
    Alertmanager; ours win over the group's, which win over `spec.labels`.

    A group field becomes a label name with every character a label name cannot have replaced
    by `_` (`user.username` -> `user_username`)."""
    labels = dict(spec.labels)
    labels.update({_NOT_IN_LABEL_NAME.sub("_", field): value for field, value in group})
    labels.update(
        {
            "alertname": spec.name,
            "namespace": spec.namespace,
            "stream": spec.stream,
            "source": "auditwatch",
        }
    )
    if spec.severity:
        labels["severity"] = spec.severity
    return labels


def alertmanager_body(
    spec: AlertSpec, notice: Notice, sent_at: datetime, generator_url: str | None = None
) -> list[dict[str, Any]]:
    """The `POST /api/v2/alerts` array: one alert, ending in the future unless resolved."""
    ends_at = (
        notice.resolved_at
        if notice.kind == "resolved" and notice.resolved_at is not None
        else sent_at + ALERTMANAGER_ENDS_AFTER
    )
    event = notice.event
    alert: dict[str, Any] = {
        "labels": alertmanager_labels(spec, notice.group),
        "annotations": {
            "summary": notice.message,
            "description": (
                f"{notice.total} matching audit event(s) on stream {spec.stream}; latest: "
                f"{event.user or '?'} {event.verb or '?'} {event.resource or '?'}"
                f" {event.namespace or ''}/{event.name or ''}"
            ),
            "auditID": event.audit_id or "",
            "matches": str(notice.total),
        },
        "startsAt": _timestamp(notice.fired_at),
        "endsAt": _timestamp(ends_at),
    }
    if generator_url:
        alert["generatorURL"] = generator_url
    return [alert]


def alertmanager_url(endpoint: str) -> str:
    """The alerts API under an Alertmanager base URL (a full API URL is taken as it is)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/api/v2/alerts") else f"{base}/api/v2/alerts"
