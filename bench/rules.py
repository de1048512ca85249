"""Benchmark: decode + normalise, and rule evaluation over decoded batches.

    python bench/rules.py [--events 300000] [--batch 10000] [--alerts 42,100,1000,5000]

Generates a deterministic stream of realistic audit events (the real samples of
tests/data/audit-samples, varied in user, verb, resource, namespace,
name, code and auditID), then reports events/s for:
  - pyarrow.json.read_json of the same NDJSON bytes (the raw parse rate, for scale),
  - auditwatch's decode_body + normalise of those bytes (the general path), and the fast path
    (columnar.batch_from_json) over the same events as JSON arrays,
  - evaluating 1, 10 and 100 Parseable-style rules over the decoded batches,
  - evaluating the detection library (examples/detections, 42 alerts) plus tenants' copies, up to
    5,000 alerts, on 400-event batches (the apiserver's): one alert at a time (`compile_rule`,
    as before the stream plan) and all of a stream's alerts at once (`rules.plan.StreamPlan`).
Everything runs in this one process on one core (pyarrow's thread pool is limited to 1).
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pajson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from auditwatch.columnar import batch_from_json  # noqa: E402
from auditwatch.decode import decode_body, decode_file  # noqa: E402
from auditwatch.normalise import EventBatch, normalise  # noqa: E402
from auditwatch.rules.evaluate import compile_rule  # noqa: E402
from auditwatch.rules.parse import parse_expression, parse_rule  # noqa: E402
from auditwatch.rules.plan import PlanAlert, StreamPlan  # noqa: E402

SAMPLES = ROOT / "tests" / "data" / "audit-samples"
DETECTIONS = ROOT / "examples" / "detections"
ALERT_BATCH = 400
"""Events per batch for the alert-count measurements: the kube-apiserver's webhook maximum."""

USERS = [
    "system:serviceaccount:default:authorized-user",
    "system:serviceaccount:default:unauthorized-user",
    "system:serviceaccount:kube-system:replicaset-controller",
    "system:kube-controller-manager",
    "system:node:worker-1",
    "kubernetes-admin",
    "alice@example.com",
    "system:anonymous",
]
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]
RESOURCES = ["secrets", "pods", "configmaps", "leases", "deployments", "roles", "clusterroles"]
NAMESPACES = ["default", "kube-system", "prod", "monitoring", "kube-public"]
CODES = [200, 200, 200, 201, 403, 404, 409]

RULE_TEMPLATES = [
    'verb = "{verb}" and objectRef_resource = "{resource}"',
    '(verb =% "list" or verb =% "get") and (objectRef_resource = "{resource}" and '
    'user_username !% "authorized-user")',
    "responseStatus_code >= {code}",
    'objectRef_subresource = "exec" and objectRef_namespace = "{namespace}"',
    'user_username ~ "^system:serviceaccount:{namespace}:"',
    'verb = "delete" and objectRef_resource = "namespaces"',
    'objectRef_namespace = "{namespace}" and verb = "create"',
    'user_username = "system:anonymous"',
    'responseStatus_code = 403 and objectRef_resource = "{resource}"',
    'verb != "watch" and objectRef_resource =% "role" and !(user_username = "{user}")',
]


STRING = pa.string()
RAW_SCHEMA = pa.schema(
    [(name, STRING) for name in ("auditID", "stage", "level", "verb", "requestURI", "userAgent")]
    + [
        ("user", pa.struct([("username", STRING), ("uid", STRING), ("groups", pa.list_(STRING))])),
        ("sourceIPs", pa.list_(STRING)),
        (
            "objectRef",
            pa.struct(
                [(k, STRING) for k in ("resource", "subresource", "namespace", "name", "apiGroup")]
            ),
        ),
        ("responseStatus", pa.struct([("code", pa.int64())])),
        ("stageTimestamp", STRING),
    ]
)
"""What pyarrow.json reads of each event for the raw rate. Without an explicit schema it cannot
read real audit logs at all: `responseObject.status` is a string in one event and an object in
the next. Everything else in the event is skipped, so this is the rate of parsing the JSON."""


def templates() -> list[dict[str, Any]]:
    """Real events to vary: the audit samples the tests use (tests/data/audit-samples)."""
    files = sorted(SAMPLES.glob("*.log"))
    events: list[dict[str, Any]] = []
    for file in files:
        events.extend(decode_file(file))
    return events


def generate(count: int, seed: int = 7, namespaces: Sequence[str] = NAMESPACES) -> bytes:
    """`count` varied events as NDJSON bytes (deterministic for a seed).

    A tenant's namespace (`team-N`, see `tenant_alerts`) gets a third of its events from the
    tenant's own deployer account.
    """
    rng = random.Random(seed)
    base = templates()
    out = io.BytesIO()
    for i in range(count):
        event = orjson.loads(orjson.dumps(rng.choice(base)))
        event["auditID"] = f"{seed:08x}-{i:012x}-4000-8000-000000000000"
        event["verb"] = rng.choice(VERBS)
        event.setdefault("user", {})["username"] = rng.choice(USERS)
        ref = event.setdefault("objectRef", {})
        ref["resource"] = rng.choice(RESOURCES)
        ref["namespace"] = namespace = rng.choice(namespaces)
        if namespace.startswith("team-") and rng.random() < 1 / 3:
            event["user"]["username"] = deployer(namespace)
        ref["name"] = f"object-{rng.randrange(1000)}"
        event.setdefault("responseStatus", {})["code"] = rng.choice(CODES)
        out.write(orjson.dumps(event))
        out.write(b"\n")
    return out.getvalue()


def rules(count: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        template = RULE_TEMPLATES[i % len(RULE_TEMPLATES)]
        texts.append(
            template.format(
                verb=rng.choice(VERBS),
                resource=rng.choice(RESOURCES),
                code=rng.choice([400, 403, 404, 500]),
                namespace=rng.choice(NAMESPACES),
                user=rng.choice(USERS),
            )
        )
    return texts


def library_documents() -> list[dict[str, Any]]:
    """The shipped detection library (examples/detections): its AuditAlert documents."""
    documents = [yaml.safe_load(path.read_text()) for path in sorted(DETECTIONS.glob("*.yaml"))]
    return [document for document in documents if document.get("kind") == "AuditAlert"]


def deployer(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:deployer"


def tenant_documents(tenants: int) -> list[dict[str, Any]]:
    """Per tenant `team-N`, a copy of the library's composite detections in namespace `team-N`
    that only looks at that namespace and leaves out the tenant's own deployer account."""
    documents = []
    for tenant in range(tenants):
        namespace = f"team-{tenant}"
        for shipped in library_documents():
            rule = shipped["spec"]["rule"]
            if rule["type"] != "composite":
                continue
            document = copy.deepcopy(shipped)
            document["metadata"]["namespace"] = namespace
            document["spec"]["rule"]["config"] = (
                f'objectRef.namespace = "{namespace}" and not user.username = '
                f'"{deployer(namespace)}" and ({rule["config"]})'
            )
            documents.append(document)
    return documents


def tenant_count(alerts: int) -> int:
    """Tenants whose copies of the library, after the library itself, make `alerts` alerts."""
    shipped = library_documents()
    per_tenant = sum(document["spec"]["rule"]["type"] == "composite" for document in shipped)
    return max(0, math.ceil((alerts - len(shipped)) / per_tenant))


def tenant_alerts(count: int) -> list[PlanAlert]:
    """The library, then its tenants' copies: `count` alerts in all."""
    alerts = []
    for document in [*library_documents(), *tenant_documents(tenant_count(count))][:count]:
        rule = document["spec"]["rule"]
        name = f"{document['metadata'].get('namespace', '')}/{document['metadata']['name']}"
        alerts.append(PlanAlert(name, parse_rule(rule["type"], rule["config"]).condition))
    return alerts


def alert_batches(alerts: int, events: int) -> list[EventBatch]:
    """400-event batches as the fast path builds them (events parsed only when asked), spread
    over the base namespaces and those of the tenants of `alerts` alerts."""
    namespaces = [*NAMESPACES, *(f"team-{n}" for n in range(tenant_count(alerts)))]
    lines = generate(events, seed=13, namespaces=namespaces).splitlines()
    now = datetime.now(UTC)
    batches = []
    for start in range(0, len(lines), ALERT_BATCH):
        batch = batch_from_json(b"[" + b",".join(lines[start : start + ALERT_BATCH]) + b"]", now)
        assert batch is not None, "fast path not taken"
        batches.append(batch)
    return batches


def fresh(batches: list[EventBatch]) -> list[EventBatch]:
    """The same tables without the events parsed by an earlier run."""
    return [
        EventBatch(batch.table, annotations_complete=batch.annotations_complete)
        for batch in batches
    ]


def measure_alerts(
    count: int, events: int, runs: int, per_alert_events: int, grouped: bool = False
) -> None:
    """µs/event for `count` alerts: one at a time, and as one stream plan (same answers);
    `grouped`: also the plan with every alert grouped by user (a threshold's keys and times)."""
    alerts = tenant_alerts(count)
    batches = alert_batches(count, events)
    plan = StreamPlan(alerts)
    compiled = [compile_rule(alert.condition) for alert in alerts]
    few = batches[: max(1, per_alert_events // ALERT_BATCH)]
    for batch in fresh(few):
        expected = [rule.evaluate(batch).true_count for rule in compiled]
        counts = [0] * len(alerts)
        for result in plan.evaluate(batch):
            counts[result.alert] = result.count
        assert counts == expected, "the plan and the alerts one at a time disagree"

    def one_at_a_time() -> None:
        for batch in fresh(few):
            for rule in compiled:
                rule.evaluate(batch)

    def planned() -> None:
        for batch in fresh(batches):
            plan.evaluate(batch)

    before = best_of(runs, one_at_a_time) / (len(few) * ALERT_BATCH) * 1e6
    after = best_of(runs, planned) / (len(batches) * ALERT_BATCH) * 1e6
    print(
        f"{count:>6,} alerts  one at a time {before:>8.1f} µs/event   "
        f"stream plan {after:>6.1f} µs/event = {1e6 / after:>9,.0f} events/s   "
        f"({before / after:.0f} x)"
    )
    if grouped:
        by_user = StreamPlan([replace(alert, group_by=("user_username",)) for alert in alerts])

        def planned_by_user() -> None:
            for batch in fresh(batches):
                by_user.evaluate(batch)

        cost = best_of(runs, planned_by_user) / (len(batches) * ALERT_BATCH) * 1e6
        print(f"{'':>6}  every alert grouped by user: stream plan {cost:>6.1f} µs/event")


def rate(events: int, seconds: float) -> str:
    return f"{events / seconds:>12,.0f} events/s  ({seconds:.3f} s)"


def best_of(runs: int, fn: Any) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per decoded batch")
    parser.add_argument("--runs", type=int, default=3, help="best of N runs per measurement")
    parser.add_argument(
        "--alerts",
        default="42,100,1000,5000",
        help="alert counts for the library + tenants measurement ('' to skip)",
    )
    parser.add_argument(
        "--alert-events", type=int, default=40_000, help="events for the stream plan"
    )
    parser.add_argument(
        "--per-alert-events",
        type=int,
        default=4_000,
        help="events for the one-at-a-time evaluation (slow with many alerts)",
    )
    parser.add_argument("--only-alerts", action="store_true", help="skip the other stages")
    parser.add_argument(
        "--grouped", action="store_true", help="also the plan with every alert grouped by user"
    )
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    counts = [int(count) for count in args.alerts.split(",") if count]
    if counts:
        print(f"library + tenants' alerts, batches of {ALERT_BATCH}, one core")
    for count in counts:
        measure_alerts(count, args.alert_events, args.runs, args.per_alert_events, args.grouped)
    if args.only_alerts:
        return

    body = generate(args.events)
    lines = body.splitlines(keepends=True)
    chunks = [
        b"".join(lines[start : start + args.batch]) for start in range(0, len(lines), args.batch)
    ]
    mib = len(body) / 2**20
    print(f"{args.events:,} events, {mib:.1f} MiB NDJSON, batches of {args.batch:,}, one core")

    read_options = pajson.ReadOptions(use_threads=False, block_size=1 << 24)
    parse_options = pajson.ParseOptions(
        explicit_schema=RAW_SCHEMA, unexpected_field_behavior="ignore"
    )
    raw = best_of(
        args.runs,
        lambda: [pajson.read_json(io.BytesIO(c), read_options, parse_options) for c in chunks],
    )
    print(f"pyarrow.json.read_json      {rate(args.events, raw)}")

    now = datetime.now(UTC)
    batches: list[EventBatch] = []

    def decode_all() -> None:
        batches.clear()
        batches.extend(normalise(decode_body(c), received_at=now) for c in chunks)

    decoded = best_of(args.runs, decode_all)
    print(
        f"decode_body + normalise     {rate(args.events, decoded)}  = {raw / decoded:.2f} x pyarrow"
    )
    arrays = [b"[" + b",".join(c.splitlines()) + b"]" for c in chunks]
    fast = best_of(args.runs, lambda: [batch_from_json(a, now) for a in arrays])
    assert all(batch_from_json(a, now) is not None for a in arrays[:1]), "fast path not taken"
    print(f"batch_from_json (arrays)    {rate(args.events, fast)}  = {raw / fast:.2f} x pyarrow")

    for count in (1, 10, 100):
        compiled = [compile_rule(parse_expression(text)) for text in rules(count)]

        def evaluate_all(compiled: list[Any] = compiled) -> None:
            for batch in batches:
                for rule in compiled:
                    rule.evaluate(batch)

        seconds = best_of(args.runs, evaluate_all)
        print(f"evaluate {count:>3} rule(s)          {rate(args.events, seconds)}")


if __name__ == "__main__":
    main()
