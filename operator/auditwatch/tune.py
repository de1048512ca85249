"""`auditwatch tune`: an alert replayed over stored events, before it is applied.

Answers "what would this alert, with its exceptions, have done last week?": how many stored
events its rule matches, how many its exceptions except, how often it would have fired (its
own resolveAfter and repeats, through the real `AlertTracker`), and who caused the rest, each
top principal with the `spec.exceptions` entry that would silence it. The entry is as narrow as
the traffic allows: the principal, and the namespaces it acted in when they are few.

Evaluation is the engine's: the alert's rule, namespace scope and exceptions in one `StreamPlan`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import yaml

from auditwatch.alerts import AlertTracker
from auditwatch.config.model import AlertSpec
from auditwatch.normalise import normalise
from auditwatch.rules.plan import PlanAlert, StreamPlan
from auditwatch.schema import EVENT_TIME
from auditwatch.store import query

MAX_SUGGESTED_NAMESPACES = 5
"""Up to this many namespaces, a suggested exception names them; beyond, the principal alone."""

NO_USER = "(no user)"


@dataclass(frozen=True)
class Principal:
    """Who caused reported matches, and where."""

    username: str
    events: int
    namespaces: tuple[str, ...]
    """The namespaces of the objects acted on, most frequent first ("" for cluster-scoped)."""


@dataclass(frozen=True)
class TuneReport:
    """What the alert would have done over the stored events."""

    matched: int
    """Events the rule matched in the alert's scope, excepted ones included."""
    excepted: int
    firings: int
    principals: tuple[Principal, ...]
    """Principals of the reported (not excepted) matches, most events first."""

    @property
    def reported(self) -> int:
        return self.matched - self.excepted


def tune(
    data_dir: Path,
    alert: AlertSpec,
    since: datetime | None = None,
    until: datetime | None = None,
) -> TuneReport:
    """Replay `alert` (as `check_stream` left it: scope and trust lists resolved) over the stored
    events of its stream within [since, until)."""
    events = list(query(data_dir, alert.stream, since=since, until=until))
    batch = normalise(events, received_at=datetime.now(UTC))
    plan = StreamPlan(
        [PlanAlert(alert.key, alert.rule.condition, scope=alert.scope, unless=alert.unless)]
    )
    results = plan.evaluate(batch) if len(batch) else []
    if not results:
        return TuneReport(0, 0, 0, ())
    (result,) = results
    if result.error is not None:
        raise ValueError(f"the alert cannot be evaluated: {result.error}")
    rows = result.rows()
    times = pc.fill_null(batch.table[EVENT_TIME], batch.table["p_timestamp"]).to_pylist()
    tracker = AlertTracker(replace(alert, targets=()))
    firings = 0
    by_user: Counter[str] = Counter()
    namespaces: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        event = batch.event(row)
        fired_at = tracker.fired_at
        tracker.observe(1, event, times[row])
        firings += tracker.fired_at is not fired_at
        user = (event.get("user") or {}).get("username") or NO_USER
        by_user[user] += 1
        namespaces[user][(event.get("objectRef") or {}).get("namespace") or ""] += 1
    principals = tuple(
        Principal(user, count, tuple(ns for ns, _ in namespaces[user].most_common()))
        for user, count in by_user.most_common()
    )
    return TuneReport(len(rows) + result.excepted, result.excepted, firings, principals)


def exception_name(username: str) -> str:
    """A `spec.exceptions` key for a principal: a DNS label from its name."""
    short = username.removeprefix("system:serviceaccount:")
    label = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")[:55].strip("-")
    return f"tuned-{label or 'user'}"


def suggested_exception(principal: Principal) -> dict[str, Any]:
    """The `spec.exceptions` entry that silences `principal` where it acted, and no more."""
    spaces = principal.namespaces
    if 0 < len(spaces) <= MAX_SUGGESTED_NAMESPACES and "" not in spaces:
        return {
            "fields": ["user.username", "objectRef.namespace"],
            "comps": ["=", "in"],
            "values": [[principal.username, sorted(spaces)]],
        }
    return {"fields": ["user.username"], "values": [[principal.username]]}


def render(report: TuneReport, alert: AlertSpec, top: int) -> str:
    """The report as text: totals, principals, and an exception YAML for each of the top ones."""
    lines = [
        f"alert {alert.key} on stream {alert.stream}: {report.matched} matching event(s), "
        f"{report.excepted} excepted, {report.reported} reported, "
        f"{report.firings} firing(s) (resolveAfter {alert.resolve_after})",
    ]
    if not report.principals:
        lines.append("nothing would have been reported")
        return "\n".join(lines) + "\n"
    width = max(len(p.username) for p in report.principals[:top])
    lines.append("")
    lines.append(f"{'PRINCIPAL':<{width}}  {'EVENTS':>7}  NAMESPACES")
    for principal in report.principals[:top]:
        spaces = ", ".join(ns or "(cluster)" for ns in principal.namespaces[:4])
        more = len(principal.namespaces) - 4
        spaces += f" (+{more})" if more > 0 else ""
        lines.append(f"{principal.username:<{width}}  {principal.events:>7}  {spaces}")
    rest = report.principals[top:]
    if rest:
        lines.append(f"... {len(rest)} more principal(s), {sum(p.events for p in rest)} event(s)")
    for principal in report.principals[:top]:
        if principal.username == NO_USER:
            continue
        name = exception_name(principal.username)
        entry = {"spec": {"exceptions": {name: suggested_exception(principal)}}}
        lines.append("")
        lines.append(f"# silences {principal.username} ({principal.events} event(s)):")
        lines.append(yaml.safe_dump(entry, sort_keys=False, default_flow_style=None).rstrip())
    return "\n".join(lines) + "\n"
