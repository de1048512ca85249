"""Benchmark: decoding each cloud source's deliveries into a normalised batch.

    python bench/sources.py [--events 100000] [--batch 500]

The events are bench/rules.py's (real samples, varied). Each is delivered the way its cloud does:
EKS as Firehose requests of gzip-compressed CloudWatch Logs payloads (`--batch` events per
record, 10 records per request), GKE as Pub/Sub push requests (one LogEntry each, the events
turned into Cloud Audit Logs entries), AKS as `{"records": [...]}` bodies (`--batch` records);
the webhook's NDJSON body of the same events is there for scale. Reported: events/s through
`receive.prepare_batch` (decompress, unwrap, map, normalise), on one core, and the GKE mapping
alone (per-event Python).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "bench"))

from auditwatch.receive import Limits, prepare_batch  # noqa: E402
from auditwatch.sources import Source, gke_event  # noqa: E402
from rules import best_of, generate, rate  # noqa: E402

LIMITS = Limits(body_bytes=1 << 30, event_bytes=1 << 24)
NOW = datetime(2026, 12, 5, tzinfo=UTC)


def firehose(events: list[dict[str, Any]], per_record: int) -> list[bytes]:
    records = []
    for start in range(0, len(events), per_record):
        payload = {
            "messageType": "DATA_MESSAGE",
            "owner": "123456789012",
            "logGroup": "/aws/eks/bench/cluster",
            "logStream": "kube-apiserver-audit-0",
            "subscriptionFilters": ["auditwatch"],
            "logEvents": [
                {"id": str(i), "timestamp": 1733400000000, "message": orjson.dumps(e).decode()}
                for i, e in enumerate(events[start : start + per_record])
            ],
        }
        records.append(base64.b64encode(gzip.compress(orjson.dumps(payload), 1)).decode())
    return [
        orjson.dumps({"requestId": "r", "timestamp": 0, "records": [{"data": d} for d in chunk]})
        for chunk in (records[i : i + 10] for i in range(0, len(records), 10))
    ]


def log_entry(event: dict[str, Any], index: int) -> dict[str, Any]:
    """The Cloud Audit Logs entry GKE would write for `event`."""
    ref = event.get("objectRef", {})
    parts = [ref.get("apiGroup") or "core", ref.get("apiVersion", "v1")]
    if ref.get("namespace"):
        parts += ["namespaces", ref["namespace"]]
    parts += [p for p in (ref.get("resource"), ref.get("name"), ref.get("subresource")) if p]
    code = event.get("responseStatus", {}).get("code", 200)
    return {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "authenticationInfo": {"principalEmail": event["user"]["username"]},
            "methodName": f"io.k8s.core.v1.{ref.get('resource', 'pods')}.{event['verb']}",
            "resourceName": "/".join(parts),
            "requestMetadata": {"callerIp": "203.0.113.24", "callerSuppliedUserAgent": "kubectl"},
            "status": {} if code < 400 else {"code": 7},
            "request": event.get("requestObject"),
        },
        "insertId": f"bench-{index}",
        "timestamp": event.get("stageTimestamp", "2026-12-05T14:00:00Z"),
        "resource": {"type": "k8s_cluster", "labels": {"cluster_name": "bench"}},
        "labels": {"authorization.k8s.io/decision": "allow"},
    }


def pubsub(events: list[dict[str, Any]]) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "message": {
                    "data": base64.b64encode(orjson.dumps(log_entry(e, i))).decode(),
                    "messageId": str(i),
                    "publishTime": "2026-12-05T14:00:00Z",
                },
                "subscription": "projects/p/subscriptions/s",
            }
        )
        for i, e in enumerate(events)
    ]


def aks(events: list[dict[str, Any]], per_body: int) -> list[bytes]:
    resource = "/SUBSCRIPTIONS/0/RESOURCEGROUPS/RG/PROVIDERS/MICROSOFT.CONTAINERSERVICE/"
    resource += "MANAGEDCLUSTERS/BENCH"
    return [
        orjson.dumps(
            {
                "records": [
                    {
                        "category": "kube-audit",
                        "resourceId": resource,
                        "properties": {"log": orjson.dumps(e).decode()},
                    }
                    for e in events[start : start + per_body]
                ]
            }
        )
        for start in range(0, len(events), per_body)
    ]


def measure(name: str, bodies: list[bytes], count: int, runs: int, source: Source | None) -> None:
    def run() -> None:
        total = sum(len(prepare_batch(b, None, LIMITS, NOW, source)) for b in bodies)
        assert total == count, (name, total)

    print(f"{name:<34}{rate(count, best_of(runs, run))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="events per record / body")
    parser.add_argument("--runs", type=int, default=3, help="best of N runs per measurement")
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    body = generate(args.events)
    events = [orjson.loads(line) for line in body.splitlines()]
    print(f"{args.events:,} events, one core")
    ndjson = [
        b"\n".join(orjson.dumps(e) for e in events[i : i + args.batch])
        for i in range(0, len(events), args.batch)
    ]
    cases: list[tuple[str, Callable[[], list[bytes]], Source | None]] = [
        ("webhook NDJSON (for scale)", lambda: ndjson, None),
        (
            "EKS Firehose (gzip CloudWatch)",
            lambda: firehose(events, args.batch),
            Source("firehose"),
        ),
        ("GKE Pub/Sub push (1 entry/request)", lambda: pubsub(events), Source("pubsub")),
        ("AKS records", lambda: aks(events, args.batch), None),
    ]
    for name, make, source in cases:
        measure(name, make(), len(events), args.runs, source)
    # Pub/Sub pushes one message per request: the fixed cost per batch dominates the line above.
    entries = [log_entry(e, i) for i, e in enumerate(events)]
    mapping = best_of(args.runs, lambda: [gke_event(entry) for entry in entries])
    print(f"{'GKE mapping alone (gke_event)':<34}{rate(len(events), mapping)}")


if __name__ == "__main__":
    main()
