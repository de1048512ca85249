"""Benchmark: sustained ingest through the HTTP receiver, with 10 alerts on the stream.

    python bench/ingest.py [--seconds 30] [--warmup 5] [--connections 8] [--json FILE]

Starts `auditwatch serve` as a subprocess on a generated resources directory (one AuditStream
with basic auth, 10 AuditAlerts of varying selectivity, webhook targets pointing at a sink in
this process), then drives it from separate load-generator processes that POST pre-encoded
400-event EventList bodies (the apiserver's webhook batch size) over N keep-alive connections.
Every post gets fresh auditIDs (a fixed-width placeholder stamped with the post number), so
nothing is a duplicate and every acknowledged event must end up stored.

Reported: sustained events/s (events in 2xx answers / measured seconds, after the warm-up),
p50/p99 request latency, non-2xx answers by code, alert latency (a rare "canary" event posted
every few seconds: its post's 2xx -> the webhook's arrival at the sink), the server's peak RSS
(VmHWM) and CPU, and "nothing lost": after SIGTERM the stored Parquet files must hold exactly
the acknowledged events. In the same run, for scale: pyarrow.json.read_json of the same bodies'
items as NDJSON on one core, and the ratio of the two rates.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import itertools
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.json as pajson
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT))

from bench.rules import (  # noqa: E402
    NAMESPACES,
    RAW_SCHEMA,
    generate,
    library_documents,
    tenant_documents,
)

from auditwatch.decode import decode_body  # noqa: E402
from auditwatch.normalise import normalise  # noqa: E402
from auditwatch.rules.evaluate import compile_rule  # noqa: E402
from auditwatch.rules.parse import parse_rule  # noqa: E402

STREAM = "bench"
USERNAME, PASSWORD = "bench", "bench-password"
EVENTS_PER_POST = 400
"""The kube-apiserver's audit webhook sends at most 400 events per batch."""

POST_ID = b"#POSTID#"
"""Fixed-width placeholder in every auditID of a body template, stamped with the post number
(8 hex digits), so every post carries new auditIDs at the cost of one bytes.replace."""

CANARY_NAME = "auditwatch-bench-canary"
CANARY_TEMPLATE = 0xFFFF
FLOOR_EVENTS_PER_SECOND = 50_000
TARGET_EVENTS_PER_SECOND = 100_000
TARGET_RAW_RATIO = 0.6


@dataclass(frozen=True)
class AlertDef:
    name: str
    rule_type: str
    config: str | dict[str, Any]
    resolve_after: str = "1m"


ALERTS = [
    # The rare rule: only the canary event matches it; a short resolveAfter re-arms it, so every
    # canary yields a new "firing" notice whose latency is measured.
    AlertDef("canary", "composite", f'objectRef_name = "{CANARY_NAME}"', resolve_after="1s"),
    AlertDef(
        "secret-read",
        "composite",
        '(verb =% "list" or verb =% "get") and (objectRef_resource = "secrets" and '
        'user_username !% "authorized-user")',
    ),
    AlertDef(
        "denied-burst",
        "column",
        {"column": "responseStatus_code", "operator": "=", "value": 403, "repeats": 5},
    ),
    AlertDef(
        "exec-kube-system",
        "composite",
        'objectRef_subresource = "exec" and objectRef_namespace = "kube-system"',
    ),
    AlertDef("anonymous", "composite", 'user_username = "system:anonymous"'),
    AlertDef(
        "namespace-deleted", "composite", 'verb = "delete" and objectRef_resource = "namespaces"'
    ),
    AlertDef(
        "kube-system-sa", "composite", 'user_username ~ "^system:serviceaccount:kube-system:"'
    ),
    AlertDef(
        "role-changes",
        "composite",
        'verb in ("create", "update", "patch", "delete") and objectRef.resource =% "role" '
        'and not user.username = "kubernetes-admin"',
    ),
    AlertDef("client-errors", "composite", "responseStatus_code >= 400"),
    AlertDef(
        "prod-kubectl-create",
        "composite",
        'objectRef_namespace = "prod" and verb = "create" and userAgent =% "KUBECTL"i',
    ),
]


# -- workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Pre-encoded EventList templates (with POST_ID placeholders) and their items as NDJSON."""

    bodies: list[bytes]
    canary_body: bytes
    ndjson: list[bytes]


def event_list(items: Iterable[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": list(items)}
    )


def build_workload(templates: int, tenants: int = 0) -> Workload:
    """`templates` bodies of varied real events (bench/rules.py's generator), as the apiserver
    posts them: EventList items carry no kind/apiVersion of their own. With tenants, events
    are spread over their namespaces too."""
    namespaces = [*NAMESPACES, *(f"team-{tenant}" for tenant in range(tenants))]
    lines = generate(templates * EVENTS_PER_POST, namespaces=namespaces).splitlines()
    bodies, ndjson = [], []
    canary_items: list[dict[str, Any]] = []
    for index in range(templates):
        items = []
        for position, line in enumerate(
            lines[index * EVENTS_PER_POST : (index + 1) * EVENTS_PER_POST]
        ):
            event = orjson.loads(line)
            event.pop("kind", None)
            event.pop("apiVersion", None)
            event["auditID"] = f"{POST_ID.decode()}-{index:04x}-4000-8000-{position:012x}"
            items.append(event)
        bodies.append(event_list(items))
        ndjson.append(b"\n".join(orjson.dumps(item) for item in items) + b"\n")
        if index == 0:
            canary_items = [dict(item) for item in items]
    canary = dict(canary_items[EVENTS_PER_POST // 2])
    canary["objectRef"] = {**canary.get("objectRef", {}), "name": CANARY_NAME}
    canary_items[EVENTS_PER_POST // 2] = canary
    for position, item in enumerate(canary_items):
        item["auditID"] = f"{POST_ID.decode()}-{CANARY_TEMPLATE:04x}-4000-8000-{position:012x}"
    workload = Workload(bodies, event_list(canary_items), ndjson)
    for body in [*workload.bodies, workload.canary_body]:
        assert body.count(POST_ID) == EVENTS_PER_POST, "placeholder collides with event content"
    return workload


@functools.cache
def _pieces(template: bytes) -> list[bytes]:
    return template.split(POST_ID)


def stamp(template: bytes, post: int) -> bytes:
    """The template with its placeholders replaced by the post number (one join: a replace
    searched 400 KiB per post, a visible share of the generator's CPU)."""
    return (b"%08x" % post).join(_pieces(template))


def selectivity(workload: Workload) -> dict[str, float]:
    """Share of the workload's events each alert's rule matches (auditwatch's own evaluator)."""
    now = datetime.now(UTC)
    batches = [normalise(decode_body(stamp(body, 0)), received_at=now) for body in workload.bodies]
    total = sum(len(batch) for batch in batches)
    shares = {}
    for alert in ALERTS:
        rule = compile_rule(parse_rule(alert.rule_type, alert.config).condition)
        shares[alert.name] = sum(rule.evaluate(batch).true_count for batch in batches) / total
    return shares


# -- resources -----------------------------------------------------------------------------


def detection_alerts(tenants: int) -> list[dict[str, Any]]:
    """The shipped library and `tenants` tenants' copies of it, on the bench stream."""
    documents = [*library_documents(), *tenant_documents(tenants)]
    for document in documents:
        document["metadata"].setdefault("namespace", "auditwatch")
        document["spec"]["stream"] = STREAM
    return documents


def extra_alerts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The alerts `--library` / `--tenants` add to the 10."""
    return detection_alerts(args.tenants) if args.library or args.tenants else []


GROUPED_THRESHOLD = {"count": 5, "window": "1m", "groupBy": ["user.username"]}
"""What `--grouped` gives alerts: 5 matches per user within a minute of event time."""


def grouped(alert: AlertDef) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rule and threshold of `alert` as a grouped alert: per user, 5 within a minute (the
    canary 1, so that every canary still fires); a column rule's `repeats` gives way to it."""
    config = alert.config
    if isinstance(config, dict):
        config = {key: value for key, value in config.items() if key != "repeats"}
    count = 1 if alert.name == "canary" else GROUPED_THRESHOLD["count"]
    return {"type": alert.rule_type, "config": config}, GROUPED_THRESHOLD | {"count": count}


def library_trust_lists() -> dict[str, Any]:
    """The trust lists of the stream the library is written for (examples/cluster)."""
    path = ROOT / "examples" / "cluster" / "kube-audit-stream.yaml"
    for document in yaml.safe_load_all(path.read_text()):
        if document.get("kind") == "AuditStream":
            lists: dict[str, Any] = document["spec"].get("trustLists", {})
            return lists
    return {}


def write_resources(
    directory: Path, sink_url: str, extra: list[dict[str, Any]], grouped_alerts: int = 0
) -> None:
    """The AuditStream (basic auth, as the apiserver's kubeconfig or Vector would use), its
    Secret, the 10 AuditAlerts, each with a webhook target at the sink, and `extra` alerts.
    The first `grouped_alerts` of the 10 get a threshold per user (`grouped`)."""
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bench-ingest"},
            "type": "kubernetes.io/basic-auth",
            "stringData": {"username": USERNAME, "password": PASSWORD},
        },
        {
            "apiVersion": "auditwatch.dev/v1alpha1",
            "kind": "AuditStream",
            "metadata": {"name": STREAM},
            # Every alert sees the whole stream, as before tenancy scoped alerts to their own
            # namespace's events by default.
            "spec": {
                "auth": {"basic": {"secretRef": {"name": "bench-ingest"}}},
                "allowedAlerts": {"clusterWide": {"from": "All"}},
                # The library's detections name the shipped stream's trust lists
                # (k8s-secret-read: `infrastructure`); without them that alert is Invalid.
                "trustLists": library_trust_lists(),
            },
        },
    ]
    for number, alert in enumerate(ALERTS):
        canary = alert.name == "canary"
        rule: dict[str, Any] = {"type": alert.rule_type, "config": alert.config}
        threshold: dict[str, Any] = {}
        if number < grouped_alerts:
            rule, threshold = grouped(alert)
        documents.append(
            {
                "apiVersion": "auditwatch.dev/v1alpha1",
                "kind": "AuditAlert",
                "metadata": {"name": alert.name, "namespace": "bench"},
                "spec": {
                    "stream": STREAM,
                    "message": "{user_username} {verb} {objectRef_resource} {objectRef_name}",
                    "rule": rule,
                    "targets": [
                        {
                            "type": "webhook",
                            "endpoint": f"{sink_url}/hook/{alert.name}",
                            "repeat": {
                                "interval": "1s" if canary else "10s",
                                "times": 1 if canary else 3,
                            },
                        }
                    ],
                    "resolveAfter": alert.resolve_after,
                    "severity": "high" if canary else "medium",
                }
                | ({"threshold": threshold} if threshold else {}),
            }
        )
    documents += extra
    (directory / "bench.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))


# -- load generator (runs in its own process) ----------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    url: str
    process: int
    processes: int
    connections: int
    timeout: float
    canary_every: float


@dataclass
class LoadResult:
    posts: list[tuple[float, float, int, int]] = field(default_factory=list)
    """(monotonic time answered, latency s, HTTP status or 0 for a transport error, post number)"""
    canaries: list[tuple[int, float]] = field(default_factory=list)
    """(post number, monotonic time of its 2xx) for bodies carrying the canary event"""
    errors: Counter[str] = field(default_factory=Counter)
    cpu_seconds: float = 0.0


async def drive(plan: LoadPlan, workload: Workload, start: float, stop: float) -> LoadResult:
    """Post from `start` to `stop` (monotonic) over plan.connections keep-alive connections."""
    result = LoadResult()
    numbers = itertools.count()
    next_canary = start + plan.canary_every
    token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {token}"}

    async def connection(session: aiohttp.ClientSession) -> None:
        nonlocal next_canary
        while (now := time.monotonic()) < stop:
            post = next(numbers) * plan.processes + plan.process
            canary = plan.process == 0 and now >= next_canary
            if canary:
                next_canary += plan.canary_every
                template = workload.canary_body
            else:
                template = workload.bodies[post % len(workload.bodies)]
            body = stamp(template, post)
            sent = time.monotonic()
            try:
                async with session.post(plan.url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as error:
                status = 0
                result.errors[type(error).__name__] += 1
            answered = time.monotonic()
            result.posts.append((answered, answered - sent, status, post))
            if canary and 200 <= status < 300:
                result.canaries.append((post, answered))
            if status == 503:  # the receiver asks to back off; don't spin on it
                await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=plan.connections)
    timeout = aiohttp.ClientTimeout(total=plan.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu = time.process_time()
        await asyncio.gather(*(connection(session) for _ in range(plan.connections)))
        result.cpu_seconds = time.process_time() - cpu
    return result


def load_process(plan: LoadPlan, workload: Workload, pipe: Connection) -> None:
    """Entry point of a load-generator process: wait for (start, stop), drive, send results."""
    pipe.send("ready")
    start, stop = pipe.recv()
    result = asyncio.run(drive(plan, workload, start, stop))
    pipe.send(result)
    pipe.close()


# -- webhook sink, server process, measurements ----------------------------------------------


@dataclass
class Sink:
    """Receives the alerts' webhooks; notes when each arrived."""

    notices: list[tuple[float, str, str, str]] = field(default_factory=list)
    """(monotonic arrival, alert, notice kind, auditID of the event it reports)"""

    async def hook(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        body = orjson.loads(await request.read())
        event = body.get("event") or {}
        self.notices.append(
            (arrived, request.match_info["alert"], body.get("kind", ""), event.get("auditID") or "")
        )
        return web.Response(text="ok")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


async def wait_ready(
    base_url: str, server: subprocess.Popen[bytes], log: Path, alerts: int
) -> dict[str, Any]:
    """Wait for readiness; return the status, refusing to run unless all alerts are live."""
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}; see {log}")
            try:
                async with session.get(f"{base_url}/api/v1/readiness") as response:
                    if response.status == 200:
                        async with session.get(f"{base_url}/api/v1/status") as status:
                            data: dict[str, Any] = await status.json()
                            break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        else:
            raise SystemExit(f"server not ready after 60 s; see {log}")
    invalid = {k: a for k, a in data["alerts"].items() if a.get("state") == "Invalid"}
    if invalid or len(data["alerts"]) != alerts or data.get("problems"):
        raise SystemExit(f"configuration not fully live: {invalid or data}")
    return data


def stored_counts(data_dir: Path) -> tuple[int, int, dict[int, int], int]:
    """(rows, distinct auditIDs, rows per post number, staged segment files left) on disk."""
    files = [
        str(path)
        for path in (data_dir / STREAM).rglob("*.parquet")
        if not any(part.startswith(".") for part in path.relative_to(data_dir).parts)
    ]
    staged = [
        path
        for path in (data_dir / STREAM).rglob("*")
        if path.is_file() and any(p.startswith(".") for p in path.relative_to(data_dir).parts)
    ]
    if not files:
        return 0, 0, {}, len(staged)
    ids = ds.dataset(files, format="parquet").to_table(columns=["auditID"])["auditID"]
    posts = pc.value_counts(pc.utf8_slice_codeunits(ids, 0, 8))
    per_post = {
        int(value, 16): count
        for value, count in zip(
            posts.field("values").to_pylist(), posts.field("counts").to_pylist(), strict=True
        )
    }
    return len(ids), pc.count_distinct(ids).as_py(), per_post, len(staged)


def raw_parse_rate(workload: Workload, seconds: float = 2.0) -> float:
    """pyarrow.json.read_json over the bodies' items as NDJSON, one core: events/s (best pass).

    Same definition as bench/rules.py: the typed fields with an explicit schema, the rest skipped.
    """
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    read_options = pajson.ReadOptions(use_threads=False)
    parse_options = pajson.ParseOptions(
        explicit_schema=RAW_SCHEMA, unexpected_field_behavior="ignore"
    )
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        started = time.perf_counter()
        for body in workload.ndjson:
            pajson.read_json(io.BytesIO(body), read_options, parse_options)
        best = min(best, time.perf_counter() - started)
    return len(workload.ndjson) * EVENTS_PER_POST / best


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def py_spy() -> list[str]:
    """py-spy recording only the thread holding the GIL: where the server's Python time goes."""
    beside = Path(sys.executable).parent / "py-spy"
    binary = str(beside) if beside.exists() else "py-spy"
    return [binary, "record", "--gil", "--rate", "100", "--format", "raw", "--nonblocking"]


def summarise_profile(path: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, inclusive %, self %) of a py-spy `--format raw` profile, busiest first."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first entry names the thread
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    if not total:
        return []
    return [
        (frame, 100 * samples / total, 100 * own[frame] / total)
        for frame, samples in inclusive.most_common(top)
    ]


# -- the run -------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workload: Workload, work: Path) -> dict[str, Any]:
    resources, data_dir, log_path = work / "resources", work / "data", work / "server.log"
    resources.mkdir()
    sink = Sink()
    sink_app = web.Application()
    sink_app.add_routes([web.post("/hook/{alert}", sink.hook)])
    sink_runner = web.AppRunner(sink_app, access_log=None)
    await sink_runner.setup()
    sink_port = free_port()
    await web.TCPSite(sink_runner, "127.0.0.1", sink_port).start()
    write_resources(resources, f"http://127.0.0.1:{sink_port}", extra_alerts(args), args.grouped)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "operator"), os.environ.get("PYTHONPATH")])
        ),
    }
    command = [
        sys.executable,
        "-m",
        "auditwatch",
        "serve",
        "--resources",
        str(resources),
        "--data",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if args.decode_workers is not None:
        command += ["--decode-workers", str(args.decode_workers)]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        return await measure(args, workload, sink, server, base_url, data_dir, log_path, work)
    finally:
        if server.poll() is None:
            server.kill()
        await sink_runner.cleanup()


async def measure(
    args: argparse.Namespace,
    workload: Workload,
    sink: Sink,
    server: subprocess.Popen[bytes],
    base_url: str,
    data_dir: Path,
    log_path: Path,
    work: Path,
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    workers = []
    per_process = [
        args.connections // args.processes + (i < args.connections % args.processes)
        for i in range(args.processes)
    ]
    for index, connections in enumerate(per_process):
        ours, theirs = context.Pipe()
        plan = LoadPlan(
            f"{base_url}/api/v1/logstream/{STREAM}",
            index,
            args.processes,
            connections,
            args.timeout,
            args.canary_every,
        )
        process = context.Process(target=load_process, args=(plan, workload, theirs))
        process.start()
        workers.append((process, ours))
    await wait_ready(base_url, server, log_path, len(ALERTS) + len(extra_alerts(args)))
    for _, pipe in workers:
        await asyncio.to_thread(pipe.recv)  # "ready"

    start = time.monotonic() + 0.5
    window_start = start + args.warmup
    stop = window_start + args.seconds
    for _, pipe in workers:
        pipe.send((start, stop))
    await asyncio.sleep(window_start - time.monotonic())
    server_cpu, machine = cpu_seconds(server.pid), machine_busy()
    profiler = None
    if args.profile:
        profiler = subprocess.Popen(
            [*py_spy(), "--pid", str(server.pid), "--duration", str(int(args.seconds)),
             "--output", str(args.profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
    await asyncio.sleep(stop - time.monotonic())
    server_cpu = cpu_seconds(server.pid) - server_cpu
    busy, total = (now - then for now, then in zip(machine_busy(), machine, strict=True))
    results: list[LoadResult] = [await asyncio.to_thread(pipe.recv) for _, pipe in workers]
    for process, _ in workers:
        process.join()
    if profiler is not None:
        await asyncio.to_thread(profiler.wait)
    await asyncio.sleep(args.settle)  # let the last notices arrive
    rss = peak_rss_mib(server.pid)
    stopping = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.wait, 300)
    shutdown = time.monotonic() - stopping
    if code != 0:
        raise SystemExit(f"server exited with {code} on SIGTERM; see {log_path}")

    posts = [post for result in results for post in result.posts]
    in_window = [p for p in posts if window_start <= p[0] < stop]
    ok_window = [p for p in in_window if 200 <= p[2] < 300]
    acknowledged = {p[3] for p in posts if 200 <= p[2] < 300}
    uncertain = {p[3] for p in posts if p[2] == 0}  # a transport error: maybe kept, maybe not
    rows, distinct, per_post, staged = stored_counts(data_dir)
    lost = sum(EVENTS_PER_POST - per_post.get(post, 0) for post in acknowledged)
    answered_or_unsure = acknowledged | uncertain
    unexpected = sum(count for post, count in per_post.items() if post not in answered_or_unsure)

    canary_sent = dict(p for result in results for p in result.canaries)
    firing = {
        int(audit_id[:8], 16): arrived
        for arrived, alert, kind, audit_id in sink.notices
        if alert == "canary" and kind == "firing"
    }
    alert_latencies = [firing[post] - sent for post, sent in canary_sent.items() if post in firing]
    codes = Counter(
        str(p[2]) if p[2] else "transport error" for p in posts if not 200 <= p[2] < 300
    )
    raw_rate = raw_parse_rate(workload)
    rate = len(ok_window) * EVENTS_PER_POST / args.seconds
    body_bytes = sum(map(len, workload.bodies)) / len(workload.bodies)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "connections": args.connections,
        "processes": args.processes,
        "events_per_post": EVENTS_PER_POST,
        "body_bytes_mean": body_bytes,
        "events_per_second": rate,
        "mib_per_second": len(ok_window) * body_bytes / args.seconds / 2**20,
        "latency_p50_ms": 1000 * percentile([p[1] for p in ok_window], 0.50),
        "latency_p99_ms": 1000 * percentile([p[1] for p in ok_window], 0.99),
        "latency_max_ms": 1000 * max((p[1] for p in ok_window), default=float("nan")),
        "non_2xx": dict(codes),
        "transport_errors": dict(sum((r.errors for r in results), Counter())),
        "canaries_acknowledged": len(canary_sent),
        "canaries_alerted": len(alert_latencies),
        "alert_latency_p50_ms": 1000 * percentile(alert_latencies, 0.50),
        "alert_latency_max_ms": 1000 * max(alert_latencies, default=float("nan")),
        "notices_received": dict(Counter(f"{a}/{k}" for _, a, k, _ in sink.notices)),
        "server_peak_rss_mib": rss,
        "server_cpu_cores": server_cpu / args.seconds,
        "events_per_server_cpu_second": rate * args.seconds / server_cpu if server_cpu else 0,
        "load_generator_cpu_cores": sum(r.cpu_seconds for r in results)
        / (args.warmup + args.seconds),
        "machine_busy_cores": (os.cpu_count() or 1) * busy / total if total else 0.0,
        "load_average_1m": os.getloadavg()[0],
        "shutdown_seconds": shutdown,
        "acknowledged_events": len(acknowledged) * EVENTS_PER_POST,
        "uncertain_events": len(uncertain) * EVENTS_PER_POST,
        "stored_events": rows,
        "stored_distinct_audit_ids": distinct,
        "lost_events": lost,
        "unexpected_events": unexpected,
        "staged_files_left": staged,
        "nothing_lost": lost == 0 and rows == distinct and unexpected == 0,
        "raw_pyarrow_events_per_second": raw_rate,
        "ratio_to_raw": rate / raw_rate,
        "floor_met": rate >= FLOOR_EVENTS_PER_SECOND,
        "target_met": rate >= TARGET_EVENTS_PER_SECOND or rate >= TARGET_RAW_RATIO * raw_rate,
        "workdir": str(work),
    }
    if args.profile:
        report["profile"] = [
            {"function": f, "inclusive_percent": i, "self_percent": s}
            for f, i, s in summarise_profile(Path(args.profile), args.profile_top)
        ]
    return report


def print_report(report: dict[str, Any], shares: dict[str, float]) -> None:
    r = report
    rows = [
        ("sustained ingest", f"{r['events_per_second']:>12,.0f} events/s "
         f"({r['mib_per_second']:.1f} MiB/s of EventList JSON)"),
        ("raw pyarrow.json.read_json", f"{r['raw_pyarrow_events_per_second']:>12,.0f} events/s "
         "(same bodies' items as NDJSON, one core)"),
        ("ratio ingest / raw", f"{r['ratio_to_raw']:>12.2f}"),
        ("request latency p50 / p99", f"{r['latency_p50_ms']:>9.1f} ms / "
         f"{r['latency_p99_ms']:.1f} ms (max {r['latency_max_ms']:.1f} ms)"),
        ("non-2xx answers", str(r["non_2xx"] or "none")),
        ("alert latency p50 / max", f"{r['alert_latency_p50_ms']:>9.1f} ms / "
         f"{r['alert_latency_max_ms']:.1f} ms ({r['canaries_alerted']} of "
         f"{r['canaries_acknowledged']} canaries alerted)"),
        ("server peak RSS (VmHWM)", f"{r['server_peak_rss_mib']:>9.0f} MiB"),
        ("server CPU", f"{r['server_cpu_cores']:>12.2f} cores "
         f"({r['events_per_server_cpu_second']:,.0f} events per CPU-second)"),
        ("load generator CPU", f"{r['load_generator_cpu_cores']:>12.2f} cores"),
        ("whole machine busy", f"{r['machine_busy_cores']:>12.2f} of {os.cpu_count()} cores "
         f"(load average {r['load_average_1m']:.1f}: other work shares this machine)"),
        ("acknowledged / stored", f"{r['acknowledged_events']:>12,} / {r['stored_events']:,} "
         f"(distinct {r['stored_distinct_audit_ids']:,}, lost {r['lost_events']}, "
         f"unexpected {r['unexpected_events']})"),
        ("shutdown (SIGTERM -> exit)", f"{r['shutdown_seconds']:>9.1f} s"),
    ]  # fmt: skip
    print()
    for label, value in rows:
        print(f"  {label:<28} {value}")
    print("\n  alerts on the stream (share of events matched):")
    for name, share in shares.items():
        print(f"    {name:<22} {100 * share:6.2f} %")
    print("\n  notices received by the sink:", r["notices_received"])
    floor = "met" if r["floor_met"] else "NOT met"
    target = "met" if r["target_met"] else "NOT met"
    lost = "yes" if r["nothing_lost"] else "NO"
    print(f"\n  floor (>= {FLOOR_EVENTS_PER_SECOND:,} events/s): {floor}; target (>= "
          f"{TARGET_EVENTS_PER_SECOND:,} events/s or >= {TARGET_RAW_RATIO} x raw): {target}; "
          f"nothing lost: {lost}")  # fmt: skip
    if "profile" in r:
        print("\n  server profile (py-spy, inclusive % / self % of samples):")
        for entry in r["profile"]:
            print(f"    {entry['inclusive_percent']:5.1f} {entry['self_percent']:5.1f}  "
                  f"{entry['function']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=5.0, help="load before measuring")
    parser.add_argument("--connections", type=int, default=8, help="concurrent posts in total")
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes")
    parser.add_argument("--templates", type=int, default=32, help="distinct body templates")
    parser.add_argument("--canary-every", type=float, default=2.5, help="seconds between canaries")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--settle", type=float, default=2.0, help="wait for late notices (s)")
    parser.add_argument("--workdir", type=Path, help="keep resources, data and server log here")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the server to FILE")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument(
        "--decode-workers", type=int, help="the server's --decode-workers (default: its own)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to FILE")
    parser.add_argument(
        "--library", action="store_true", help="also load the detection library (examples/)"
    )
    parser.add_argument(
        "--tenants", type=int, default=0, help="and N tenants' copies of it (implies --library)"
    )
    parser.add_argument(
        "--grouped",
        type=int,
        default=0,
        choices=range(len(ALERTS) + 1),
        metavar=f"0..{len(ALERTS)}",
        help="give the first N of the 10 alerts a threshold: 5 per user.username within 1m",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    workload = build_workload(args.templates, args.tenants)
    shares = selectivity(workload)
    print(f"{args.templates} bodies of {EVENTS_PER_POST} events "
          f"(mean {sum(map(len, workload.bodies)) / len(workload.bodies) / 1024:.0f} KiB) "
          f"generated in {time.perf_counter() - started:.1f} s; "
          f"{len(ALERTS)} alerts ({args.grouped} grouped)"
          f"{' + the library' if args.library or args.tenants else ''}"
          f"{f' and {args.tenants} tenants' if args.tenants else ''}; "
          f"{args.connections} connection(s) from {args.processes} process(es); "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s measured")  # fmt: skip
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=False)
        report = asyncio.run(run(args, workload, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="auditwatch-bench-") as work:
            report = asyncio.run(run(args, workload, Path(work)))
    print_report(report, shares)
    if args.json:
        args.json.write_bytes(
            orjson.dumps({**report, "selectivity": shares}, option=orjson.OPT_INDENT_2)
        )
    if not report["nothing_lost"] or report["canaries_alerted"] < report["canaries_acknowledged"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
