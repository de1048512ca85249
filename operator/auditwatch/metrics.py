"""Prometheus metrics of one auditwatch process, served at `GET /metrics`.

Each `Metrics` has its own registry, so several engines (tests, or one per process) never collide
in prometheus-client's global registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    """The counters and histograms the receiver, rules and notifiers update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events_received = Counter(
            "auditwatch_events_received",
            "Audit events in accepted request bodies, duplicates included.",
            ["stream"],
            registry=self.registry,
        )
        self.events_stored = Counter(
            "auditwatch_events_stored",
            "Audit events durably kept (after de-duplication on auditID and stage).",
            ["stream"],
            registry=self.registry,
        )
        self.events_duplicate = Counter(
            "auditwatch_events_duplicate",
            "Audit events received again (same auditID and stage) and not kept twice.",
            ["stream"],
            registry=self.registry,
        )
        self.requests_rejected = Counter(
            "auditwatch_requests_rejected",
            "Ingest requests answered with an error, by reason.",
            ["stream", "reason"],
            registry=self.registry,
        )
        self.requests_forwarded = Counter(
            "auditwatch_requests_forwarded",
            "Ingest requests a non-leader replica forwarded to the leader, by the leader's "
            "HTTP status code.",
            ["code"],
            registry=self.registry,
        )
        self.rule_matches = Counter(
            "auditwatch_rule_matches",
            "Stored audit events that matched an alert's rule.",
            ["alert"],
            registry=self.registry,
        )
        self.groups_evicted = Counter(
            "auditwatch_alert_groups_evicted",
            "Groups of an alert's grouped threshold dropped at its maxGroups cap (the pending "
            "group updated longest ago, or a new group when every kept one is firing).",
            ["alert"],
            registry=self.registry,
        )
        self.rule_excepted = Counter(
            "auditwatch_rule_excepted",
            "Stored audit events that matched an alert's rule and that its exceptions excepted "
            "(not reported, not in auditwatch_rule_matches).",
            ["alert"],
            registry=self.registry,
        )
        self.notifications_sent = Counter(
            "auditwatch_notifications_sent",
            "Notifications a target accepted.",
            ["alert", "target"],
            registry=self.registry,
        )
        self.notifications_failed = Counter(
            "auditwatch_notifications_failed",
            "Notifications given up on after retries.",
            ["alert", "target"],
            registry=self.registry,
        )
        self.background_failures = Counter(
            "auditwatch_background_failures",
            "Failed runs of a background duty (state_save, flush, retention, storage_probe, "
            "alert_timers, delivery); each is retried and never stops the others.",
            ["duty"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "auditwatch_ingest_request_seconds",
            "Time to answer an ingest request, by HTTP status code.",
            ["code"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
