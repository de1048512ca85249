"""`auditwatch run`: kopf and the receiver in one process and one event loop.

Start-up: the receiver listens at once (liveness answers), the replica waits for the leader Lease
and meanwhile forwards ingest requests to the leader's receiver (advertised on the Lease; ready
while it knows one). As leader, it opens the data directory, lists every AuditStream and AuditAlert
(readiness turns true once that configuration is applied and storage takes writes), and starts
kopf, the engine's timers and the status writer. Shutdown (SIGTERM, kopf stopping) closes the
receiver first, stops kopf, writes the status a last time, drains deliveries, flushes storage and
releases the Lease. Losing the Lease does the same but keeps the receiver: the replica steps down
to a follower and waits for the Lease again, so two replicas never reconcile at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

from auditwatch.config.model import StreamSpec
from auditwatch.engine import Engine, utcnow
from auditwatch.kube.aio import pause
from auditwatch.kube.api import KubeApi, operator_namespace
from auditwatch.kube.handlers import Handlers, configure
from auditwatch.kube.leader import LeaderElection, LeaseSettings
from auditwatch.kube.source import KubeConfig, KubeSource
from auditwatch.kube.writer import StatusWriter
from auditwatch.metrics import Metrics
from auditwatch.normalise import EventBatch
from auditwatch.notify import Notifier
from auditwatch.notify.egress import EgressPolicy
from auditwatch.receive import RETRY_HEADERS, Receiver, ReceiverOptions, Rejected
from auditwatch.serve import trust_stream_clients
from auditwatch.tls import ServerTLS

logger = logging.getLogger(__name__)

LIST_RETRY_SECONDS = 5.0
RECEIVER_SHUTDOWN_SECONDS = 10.0
"""How long requests in flight may take to finish on shutdown (within the pod's 30 s grace)."""


class ReplicaIngestor:
    """What the receiver talks to: the leader's receiver while another replica leads, then the
    engine.

    A follower never opens the data directory: it forwards ingest requests to the receiver the
    leader advertises on the Lease, and is ready while it knows one, so a Service may route to
    any replica. Without a known leader (or while the new leader starts) it answers 503 with
    Retry-After (senders retry) and is not ready.
    """

    def __init__(self, election: LeaderElection | None = None) -> None:
        self.engine: Engine | None = None
        self.election = election
        self.metrics = Metrics()
        """One registry for the whole process: the leader's engine counts into it too."""
        self.waiting = "standby: waiting for the leader Lease"
        """Why there is no engine yet: the readiness answer until there is one."""

    def forward_to(self) -> str | None:
        """The leader's receiver, while another replica leads and advertises one."""
        if self.engine is not None or self.election is None or self.election.is_leader:
            return None
        return self.election.leader_url

    def stream(self, name: str) -> StreamSpec | None:
        if self.engine is None:
            raise Rejected(
                503,
                "standby",
                "this replica is on standby (no leader known, or leading and starting); "
                "retry later",
                RETRY_HEADERS,
            )
        return self.engine.stream(name)

    def clock(self) -> datetime:
        return utcnow() if self.engine is None else self.engine.clock()

    async def ingest(self, stream: StreamSpec, batch: EventBatch) -> dict[str, int]:
        assert self.engine is not None  # stream() answered first
        return await self.engine.ingest(stream, batch)

    def status(self) -> dict[str, Any]:
        if self.engine is not None:
            return self.engine.status()
        leader = self.forward_to()
        problem = f"follower: see the leader at {leader}" if leader else self.waiting
        return {"streams": {}, "alerts": {}, "problems": [problem]}

    def readiness(self) -> tuple[bool, str]:
        if self.engine is not None:
            return self.engine.readiness()
        leader = self.forward_to()
        if leader is not None:
            return True, f"forwarding to the leader at {leader}"
        return False, self.waiting


@dataclass
class OperatorOptions:
    """Timing and identity; the defaults suit a cluster, tests shorten them."""

    leader_election: bool = True
    lease_name: str = "auditwatch"
    lease_duration: float = 15.0
    lease_renew_deadline: float = 10.0
    lease_retry_period: float = 2.0
    status_interval: float = 2.0
    secret_refresh: float = 60.0
    """Seconds between reads of the referenced Secrets (a rotation is used within this)."""
    identity: str = field(
        default_factory=lambda: (
            os.environ.get("AUDITWATCH_POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        )
    )
    namespace: str | None = None
    """The operator's namespace (Lease, stream Secrets); default: detected."""
    advertise_url: str | None = None
    """The receiver's URL as other replicas reach it (forwarding); default: see receiver_url."""
    kopf_settings: kopf.OperatorSettings | None = None
    egress: EgressPolicy | None = None
    """Where notifications may go (default: `EgressPolicy()`)."""


@dataclass
class Running:
    """The parts of a running operator, for tests and diagnostics."""

    ingestor: ReplicaIngestor
    runner: web.AppRunner
    handlers: Handlers | None = None
    writer: StatusWriter | None = None
    source: KubeSource | None = None


async def run_operator(
    data: Path,
    *,
    host: str,
    port: int,
    namespaces: list[str],
    decode_workers: int = 0,
    receiver_options: ReceiverOptions | None = None,
    tls: ServerTLS | None = None,
    options: OperatorOptions | None = None,
    stop: asyncio.Event | None = None,
    started: asyncio.Future[Running] | None = None,
) -> None:
    """Run until SIGTERM / SIGINT or `stop`. A leader that loses the Lease steps down (state
    saved, storage flushed) and waits for it again as a follower, forwarding ingest meanwhile.

    `namespaces`: watch AuditAlerts of these only; all when empty. `started`, if
    given, gets the running parts once kopf is started (tests). With `tls`, the receiver
    serves HTTPS and follows the certificate files for rotation.
    """
    options = options or OperatorOptions()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    if options.namespace:
        namespace, where = options.namespace, "the options"
    else:
        namespace, where = operator_namespace(namespaces)
    logger.info(
        "operator namespace %r (from %s): the Lease, stream Secrets without a namespace, "
        "Events about AuditStreams",
        namespace,
        where,
    )
    ingestor = ReplicaIngestor()
    runner = Receiver(
        ingestor,
        decode_workers=decode_workers,
        forward_to=ingestor.forward_to,
        options=receiver_options,
    ).runner(shutdown_timeout=RECEIVER_SHUTDOWN_SECONDS)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=None if tls is None else tls.context).start()
    logger.info("receiving on %s://%s:%d", "http" if tls is None else "https", host, port)
    tls_task = None if tls is None else asyncio.create_task(tls.follow(stop), name="tls")
    api = KubeApi.from_environment()
    election = LeaderElection(
        api,
        LeaseSettings(
            namespace=namespace,
            identity=options.identity,
            name=options.lease_name,
            duration=options.lease_duration,
            renew_deadline=options.lease_renew_deadline,
            retry_period=options.lease_retry_period,
            receiver_url=options.advertise_url or receiver_url(host, runner.addresses[0][1]),
        ),
    )
    ingestor.election = election
    try:
        while True:
            if options.leader_election and not await election.acquire(stop):
                return
            term = asyncio.Event()
            relay = asyncio.ensure_future(_relay(stop, term))
            try:
                await _lead(
                    data,
                    namespaces,
                    namespace,
                    options,
                    api,
                    election,
                    ingestor,
                    runner,
                    term,
                    started,
                    tls,
                )
            finally:
                relay.cancel()
            if stop.is_set() or not options.leader_election or election.is_leader:
                return  # stopped, or kopf ended by itself: the process ends
            # Stepped down (state saved, storage flushed): a follower again, forwarding ingest.
            ingestor.waiting = "standby: stepped down, waiting for the leader Lease"
            logger.warning("stepped down as leader: back to standby")
    finally:
        if tls_task is not None:
            tls_task.cancel()
            await asyncio.gather(tls_task, return_exceptions=True)
        await _close_receiver(runner)
        await election.release()
        await api.close()


def receiver_url(host: str, port: int) -> str | None:
    """The URL other replicas reach this receiver at: the address it listens on, if one; when
    it listens on all, the pod's IP ($AUDITWATCH_POD_IP, from the downward API), else the
    address the host name resolves to (None if it resolves to none: nothing advertised)."""
    if host in ("", "0.0.0.0", "::"):
        try:
            host = os.environ.get("AUDITWATCH_POD_IP") or socket.gethostbyname(socket.gethostname())
        except OSError as error:
            logger.warning("no address to advertise: followers cannot forward (%s)", error)
            return None
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _relay(stop: asyncio.Event, term: asyncio.Event) -> None:
    """Ends a term of leadership when the process stops."""
    await stop.wait()
    term.set()


async def _lead(
    data: Path,
    namespaces: list[str],
    namespace: str,
    options: OperatorOptions,
    api: KubeApi,
    election: LeaderElection,
    ingestor: ReplicaIngestor,
    runner: web.AppRunner,
    stop: asyncio.Event,
    started: asyncio.Future[Running] | None,
    tls: ServerTLS | None,
) -> None:
    """Everything the leader does in one term, from opening the store to flushing it: until
    `stop` (set when the process stops), or until the Lease is lost (the receiver stays up)."""
    engine = Engine(data, notifier=Notifier(egress=options.egress))
    engine.metrics = ingestor.metrics
    writer: StatusWriter | None = None

    def apply(config: KubeConfig) -> None:
        trust_stream_clients(tls, config.streams)
        engine.apply(
            config.streams,
            config.alerts,
            config.invalid_alerts,
            config.problems,
            config.namespace_labels,
            config.created,
        )
        if writer is not None:
            writer.poke()

    source = KubeSource(namespace, api.get_secret, apply)
    writer = StatusWriter(
        api,
        source,
        engine,
        reporter=options.identity,
        interval=options.status_interval,
    )
    handlers = Handlers(source)
    tasks: list[asyncio.Task[Any]] = []
    kopf_task: asyncio.Task[None] | None = None
    kopf_stop = asyncio.Event()
    ingestor.waiting = "leader: listing AuditStreams and AuditAlerts"
    try:
        if not await _initial_listing(api, source, namespaces, stop):
            return
        ingestor.engine = engine
        logger.info(
            "configuration: %d stream(s), %d alert(s) applied",
            len(source.config.streams) if source.config else 0,
            len(source.config.alerts) if source.config else 0,
        )
        # Created before kopf starts: kopf cancels, when it stops, every task created after it.
        tasks = [
            asyncio.create_task(engine.run(stop), name="engine"),
            asyncio.create_task(writer.run(stop), name="status writer"),
            asyncio.create_task(
                source.follow_secrets(stop, options.secret_refresh), name="secrets"
            ),
        ]
        if options.leader_election:
            tasks.append(asyncio.create_task(election.keep(stop), name="leader lease"))
        kopf_task = asyncio.create_task(
            kopf.operator(
                registry=handlers.registry,
                settings=configure(options.kopf_settings or kopf.OperatorSettings()),
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                stop_flag=kopf_stop,
            ),
            name="kopf",
        )
        tasks.append(kopf_task)
        if started is not None and not started.done():
            started.set_result(Running(ingestor, runner, handlers, writer, source))
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait([waiting, *tasks], return_when="FIRST_COMPLETED")
        waiting.cancel()
        for task in tasks:
            if not task.done():
                continue
            if not task.cancelled() and task.exception() is not None:
                logger.error("%s failed", task.get_name(), exc_info=task.exception())
            else:
                logger.info("%s ended: stopping", task.get_name())
    finally:
        # Intake first, then timers, deliveries and storage, and kopf last: kopf's shutdown
        # cancels tasks it did not start, deliveries in flight among them.
        stopping = election.is_leader or not options.leader_election
        stop.set()
        if stopping:
            await _close_receiver(runner)
        await asyncio.gather(*(t for t in tasks if t is not kopf_task), return_exceptions=True)
        ingestor.engine = None
        await engine.close()
        kopf_stop.set()
        if kopf_task is not None:
            await asyncio.gather(kopf_task, return_exceptions=True)


async def _initial_listing(
    api: KubeApi, source: KubeSource, namespaces: list[str], stop: asyncio.Event
) -> bool:
    """List both kinds and apply them; retried until it works (CRDs not installed yet, say)."""
    while not stop.is_set():
        try:
            streams = await api.list_resources("AuditStream", namespaces)
            alerts = await api.list_resources("AuditAlert", namespaces)
            await source.load([*streams, *alerts])
            return True
        except Exception as error:  # any failure: not ready, try again
            logger.warning("listing AuditStreams and AuditAlerts failed (retrying): %s", error)
            await pause(stop, LIST_RETRY_SECONDS)
    return False


async def _close_receiver(runner: web.AppRunner) -> None:
    if runner.server is not None:
        await runner.cleanup()
