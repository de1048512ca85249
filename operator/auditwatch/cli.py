"""The `auditwatch` command line: thin wrappers that turn flags into calls on the core.

Exit codes: 0 success; 1 the command ran and found a problem (lint findings, an unreadable
file, a refused replay); 2 bad usage, a bad rule included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from auditwatch import __version__

if TYPE_CHECKING:
    from auditwatch.notify.egress import EgressPolicy

ExistingFile = click.Path(exists=True, dir_okay=False, path_type=Path)

DEFAULT_DECODE_WORKERS = max(1, min(4, len(os.sched_getaffinity(0))))
"""Decoding holds the GIL: worker processes put the other cores to work. One per core this
process may run on (on two cores, two workers ingest about 15 % more than one: the main process
leaves a core idle while it waits on the disk and the network; bench/README.md)."""

DECODE_WORKERS = click.option(
    "--decode-workers",
    default=DEFAULT_DECODE_WORKERS,
    type=click.IntRange(min=0),
    show_default=True,
    help="Processes that decode request bodies (0: threads of the main process).",
)


STATUS_TOKEN_ENV = "AUDITWATCH_STATUS_TOKEN"


def receiver_flags(command: Callable[..., None]) -> Callable[..., None]:
    """The receiver's deadlines and status token, for `serve` and `run` (each also from the
    environment, so the token need not appear in the process's arguments)."""
    for option in reversed(
        [
            click.option(
                "--header-timeout",
                default=60.0,
                type=click.FloatRange(min=0, min_open=True),
                envvar="AUDITWATCH_HEADER_TIMEOUT",
                show_default=True,
                help="Seconds a connection has to send a request's headers (also the idle "
                "keep-alive time).",
            ),
            click.option(
                "--body-timeout",
                default=60.0,
                type=click.FloatRange(min=0, min_open=True),
                envvar="AUDITWATCH_BODY_TIMEOUT",
                show_default=True,
                help="Seconds a request has to send its whole body (408 past that).",
            ),
            click.option(
                "--status-token",
                default=None,
                envvar=STATUS_TOKEN_ENV,
                help="Bearer token for GET /api/v1/status and /metrics (default: "
                f"${STATUS_TOKEN_ENV}; without one they answer loopback clients only).",
            ),
        ]
    ):
        command = option(command)
    return command


def receiver_options(header_timeout: float, body_timeout: float, status_token: str | None) -> Any:
    """The ReceiverOptions of the flags above (an empty token counts as none)."""
    from auditwatch.receive import ReceiverOptions

    return ReceiverOptions(header_timeout, body_timeout, status_token or None)


EGRESS_ALLOW = click.option(
    "--egress-allow",
    multiple=True,
    metavar="CIDR",
    envvar="AUDITWATCH_EGRESS_ALLOW",
    help="Networks notifications may go to (repeat, or comma-separated in "
    "$AUDITWATCH_EGRESS_ALLOW); default: every network not denied.",
)
EGRESS_DENY = click.option(
    "--egress-deny",
    multiple=True,
    metavar="CIDR",
    envvar="AUDITWATCH_EGRESS_DENY",
    help="Networks notifications may never go to, besides link-local and cloud metadata "
    "addresses and, in a pod, the pod itself ($AUDITWATCH_POD_IP, loopback). "
    "The most specific network wins.",
)


def egress_policy(allow: tuple[str, ...], deny: tuple[str, ...]) -> EgressPolicy:
    """The EgressPolicy of the flags and the pod's IP (a bad network exits 2)."""
    from auditwatch.notify.egress import EgressPolicy

    try:
        policy = EgressPolicy.build(allow, deny, os.environ.get("AUDITWATCH_POD_IP"))
    except ValueError as error:
        raise click.UsageError(f"egress policy: {error}") from None
    logging.getLogger("auditwatch.notify").info("%s", policy.describe())
    return policy


TLS_CERT = click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Serve HTTPS with this certificate (PEM; e.g. tls.crt of a mounted kubernetes.io/tls "
    "Secret), reloaded when the file changes. Needs --tls-key.",
)
TLS_KEY = click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The certificate's private key (PEM; tls.key), reloaded with it.",
)


def server_tls(cert: Path | None, key: Path | None) -> Any:
    """The receiver's ServerTLS for --tls-cert / --tls-key (None: plain HTTP); exit 2 if only
    one is given or they do not load."""
    from auditwatch.tls import ServerTLS, TLSError

    if cert is None and key is None:
        return None
    if cert is None or key is None:
        fail("--tls-cert and --tls-key go together", 2)
        return None
    try:
        return ServerTLS(cert, key)
    except TLSError as error:
        fail(str(error), 2)
        return None


def fail(message: str, code: int = 1) -> None:
    click.echo(f"auditwatch: {message}", err=True)
    sys.exit(code)


def parse_rule_or_exit(rule: str, rule_type: str) -> Any:
    """The parsed rule, or exit 2 with the error under a caret."""
    from auditwatch.rules.errors import RuleError
    from auditwatch.rules.parse import parse_rule

    try:
        return parse_rule(rule_type, rule)
    except RuleError as error:
        click.echo(error.pretty(), err=True)
        sys.exit(2)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="auditwatch")
def main() -> None:
    """Kubernetes audit events in, alerts out."""


@main.command("test-rule")
@click.argument("rule")
@click.argument("files", nargs=-1, required=True, type=ExistingFile)
@click.option(
    "--type",
    "rule_type",
    type=click.Choice(["composite", "column"]),
    default="composite",
    show_default=True,
    help="composite: RULE is rule text; column: RULE is a Parseable column config as JSON.",
)
@click.option("--count", is_flag=True, help="Print only the number of matching events.")
def test_rule(rule: str, files: tuple[Path, ...], rule_type: str, count: bool) -> None:
    """Print the events of audit log FILES that RULE matches, as JSON lines.

    FILES may be in any shape the receiver accepts (one event per line, EventList, JSON array,
    Vector or AKS envelopes, gzip). A bad rule exits 2 with the error and its position.
    """
    from auditwatch.decode import DecodeError, decode_file
    from auditwatch.normalise import normalise
    from auditwatch.rules.evaluate import compile_rule

    compiled = compile_rule(parse_rule_or_exit(rule, rule_type).condition)
    matched = 0
    out = sys.stdout.buffer
    for file in files:
        try:
            events = decode_file(file)
        except (DecodeError, OSError) as error:
            fail(f"{file}: {error}")
        hits = (batch := normalise(events, received_at=datetime.now(UTC))).filter(
            compiled.evaluate(batch)
        )
        matched += len(hits)
        if not count:
            for event in hits.events:
                out.write(orjson.dumps(event) + b"\n")
    if count:
        click.echo(str(matched))


@main.command()
@click.option(
    "--resources",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of AuditStream, AuditAlert and Secret YAML (followed while running).",
)
@click.option("--data", default=Path("data"), type=click.Path(path_type=Path), show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, type=int, show_default=True)
@DECODE_WORKERS
@receiver_flags
@EGRESS_ALLOW
@EGRESS_DENY
@TLS_CERT
@TLS_KEY
@click.option("--log-level", default="info", show_default=True)
def serve(
    resources: Path,
    data: Path,
    host: str,
    port: int,
    decode_workers: int,
    header_timeout: float,
    body_timeout: float,
    status_token: str | None,
    egress_allow: tuple[str, ...],
    egress_deny: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    log_level: str,
) -> None:
    """Standalone: receive, store and alert with resources from YAML files, no cluster.

    Plain HTTP unless --tls-cert / --tls-key are given (the apiserver's audit webhook sends its
    credentials only over HTTPS).
    """
    from auditwatch.serve import serve as run_serve
    from auditwatch.store import StoreLocked

    setup_logging(log_level)
    options = receiver_options(header_timeout, body_timeout, status_token)
    egress = egress_policy(egress_allow, egress_deny)
    tls = server_tls(tls_cert, tls_key)
    try:
        asyncio.run(
            run_serve(
                resources,
                data,
                host=host,
                port=port,
                decode_workers=decode_workers,
                options=options,
                egress=egress,
                tls=tls,
            )
        )
    except StoreLocked as error:
        fail(str(error))
    except OSError as error:  # the port is taken, the data directory cannot be created, ...
        fail(f"cannot serve on {host}:{port} with data in {data}: {error}")


@main.command()
@click.option("--data", default=Path("/data"), type=click.Path(path_type=Path), show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, type=int, show_default=True)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch AuditAlerts of these only (default: all). The first is the "
    "operator's namespace (its Lease, the stream Secrets, Events about streams) unless "
    "$AUDITWATCH_NAMESPACE is set; without either, the kubeconfig's current context "
    "namespace, else the pod's service account namespace, else default.",
)
@DECODE_WORKERS
@receiver_flags
@EGRESS_ALLOW
@EGRESS_DENY
@TLS_CERT
@TLS_KEY
@click.option(
    "--secret-refresh",
    default=60.0,
    type=click.FloatRange(min=1),
    show_default=True,
    help="Seconds between reads (GET by name) of the Secrets resources reference: a rotated, "
    "deleted or created Secret takes effect within this. Secrets are never listed or watched.",
)
@click.option("--log-level", default="info", show_default=True)
def run(
    data: Path,
    host: str,
    port: int,
    namespaces: tuple[str, ...],
    decode_workers: int,
    header_timeout: float,
    body_timeout: float,
    status_token: str | None,
    egress_allow: tuple[str, ...],
    egress_deny: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    secret_refresh: float,
    log_level: str,
) -> None:
    """The operator: kopf reconciling AuditStreams/AuditAlerts, plus the receiver.

    In a cluster, serve HTTPS (--tls-cert / --tls-key from a mounted kubernetes.io/tls Secret):
    the apiserver's audit webhook sends its token or client certificate only over TLS.
    """
    from auditwatch.kube.operator import OperatorOptions, run_operator

    setup_logging(log_level)
    egress = egress_policy(egress_allow, egress_deny)
    tls = server_tls(tls_cert, tls_key)
    asyncio.run(
        run_operator(
            data,
            host=host,
            port=port,
            namespaces=list(namespaces),
            decode_workers=decode_workers,
            receiver_options=receiver_options(header_timeout, body_timeout, status_token),
            options=OperatorOptions(egress=egress, secret_refresh=secret_refresh),
            tls=tls,
        )
    )


@main.command()
@click.option("--data", default=Path("data"), type=click.Path(path_type=Path), show_default=True)
@click.option("--stream", required=True)
@click.option("--rule", default=None, help="Only events this rule (composite text) matches.")
@click.option(
    "--since",
    default=None,
    help="Events whose event time (stageTimestamp, else requestReceivedTimestamp; not the time "
    "auditwatch received them) is at or after this: a duration back from now (1h) or an RFC 3339 "
    "time.",
)
@click.option(
    "--until",
    default=None,
    help="Events whose event time is before this: a duration back from now or an RFC 3339 time.",
)
def query(data: Path, stream: str, rule: str | None, since: str | None, until: str | None) -> None:
    """Print stored events of a stream as JSON lines, oldest first."""
    from auditwatch.store import parse_time_bound
    from auditwatch.store import query as run_query

    condition = None if rule is None else parse_rule_or_exit(rule, "composite").condition
    try:
        bounds = [None if b is None else parse_time_bound(b) for b in (since, until)]
        events = run_query(data, stream, condition=condition, since=bounds[0], until=bounds[1])
        out = sys.stdout.buffer
        for event in events:
            out.write(orjson.dumps(event) + b"\n")
    except ValueError as error:
        fail(str(error), 2)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--alert", "name", required=True, help="The AuditAlert: NAME or NAMESPACE/NAME.")
@click.option("--data", default=Path("data"), type=click.Path(path_type=Path), show_default=True)
@click.option("--since", default="7d", show_default=True, help="As for `query`.")
@click.option("--until", default=None, help="As for `query`.")
@click.option("--top", default=10, type=click.IntRange(min=1), show_default=True)
def tune(
    paths: tuple[Path, ...], name: str, data: Path, since: str, until: str | None, top: int
) -> None:
    """Replay an AuditAlert, with its exceptions, over stored events: what it would have fired,
    by principal, and the exception YAML that would silence each top principal.

    PATHS are YAML files or folders holding the AuditAlert and, for its trust lists and
    namespace grant, its AuditStream (Secrets are not needed).
    """
    from auditwatch.config.model import ConfigError
    from auditwatch.lint import resources_for_tuning
    from auditwatch.store import parse_time_bound
    from auditwatch.tune import render
    from auditwatch.tune import tune as run_tune

    try:
        alert = resources_for_tuning(list(paths), name)
        bounds = [None if b is None else parse_time_bound(b) for b in (since, until)]
        report = run_tune(data, alert, since=bounds[0], until=bounds[1])
    except ConfigError as error:
        fail(f"{name}: {error.reason}: {error.message}", 2)
    except ValueError as error:
        fail(str(error), 2)
    click.echo(render(report, alert, top), nl=False)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def lint(paths: tuple[Path, ...]) -> None:
    """Check AuditStream / AuditAlert YAML: schema (from crds/) and rule syntax."""
    from auditwatch.lint import Tally
    from auditwatch.lint import lint as run_lint

    tally = Tally()
    problems = run_lint(list(paths), tally)
    for problem in problems:
        click.echo(problem)
    if problems:
        sys.exit(1)
    click.echo(tally.summary())


@main.command()
@click.argument("files", nargs=-1, required=True, type=ExistingFile)
@click.option("--to", "url", required=True, help="Receiver base URL, e.g. http://127.0.0.1:8000")
@click.option("--stream", required=True)
@click.option("--gzip", "compress", is_flag=True, help="gzip each batch, as Vector can.")
@click.option("--batch-size", default=400, show_default=True, help="Events per EventList.")
@click.option("--user", default=None, help="Basic auth as USER:PASSWORD.")
@click.option("--token", default=None, help="Bearer token.")
def replay(
    files: tuple[Path, ...],
    url: str,
    stream: str,
    compress: bool,
    batch_size: int,
    user: str | None,
    token: str | None,
) -> None:
    """Send audit log FILES the way the apiserver's webhook backend does (EventList batches)."""
    from tqdm import tqdm

    from auditwatch.credentials import basic_authorization, bearer_authorization
    from auditwatch.decode import DecodeError, decode_file
    from auditwatch.replay import ReplayError
    from auditwatch.replay import replay as run_replay

    events: list[dict[str, Any]] = []
    for file in files:
        try:
            events.extend(decode_file(file))
        except (DecodeError, OSError) as error:
            fail(f"{file}: {error}")
    authorization = None
    if user is not None:
        name, _, password = user.partition(":")
        authorization = basic_authorization(name, password)
    elif token is not None:
        authorization = bearer_authorization(token)
    with tqdm(total=len(events), unit="event", file=sys.stderr) as bar:
        try:
            result = asyncio.run(
                run_replay(
                    events,
                    url,
                    stream=stream,
                    batch_size=batch_size,
                    compress=compress,
                    authorization=authorization,
                    on_batch=bar.update,
                )
            )
        except ReplayError as error:
            fail(str(error))
    click.echo(
        f"sent {result.events} events in {result.batches} batches ({result.retries} retries)"
    )


@main.command()
@click.argument("file", type=ExistingFile)
@click.option("--stream", required=True, help="The AuditStream the alerts watch.")
@click.option("--namespace", default=None, help="Namespace of the AuditAlerts.")
def convert(file: Path, stream: str, namespace: str | None) -> None:
    """Turn a Parseable alerts document into AuditAlert YAML (and Secrets for credentials)."""
    from auditwatch.convert import ConvertError, convert_alerts

    try:
        conversion = convert_alerts(file.read_text(), stream=stream, namespace=namespace)
    except ConvertError as error:
        fail(f"{file}: {error}", 2)
    for warning in conversion.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(conversion.yaml(), nl=False)


@main.command()
@click.option("--server", default="http://127.0.0.1:8000", show_default=True)
@click.option("--streams", is_flag=True, help="Show streams instead of alerts.")
@click.option(
    "--token",
    default=None,
    envvar=STATUS_TOKEN_ENV,
    help=f"The server's status token (default: ${STATUS_TOKEN_ENV}).",
)
def status(server: str, streams: bool, token: str | None) -> None:
    """The table `kubectl get auditalerts` would show, from a running auditwatch."""
    from auditwatch.status_table import StatusUnavailable, alerts_table, fetch_status, streams_table

    try:
        current = asyncio.run(fetch_status(server, token or None))
    except StatusUnavailable as error:
        fail(str(error))
    now = datetime.now(UTC)
    click.echo(streams_table(current, now) if streams else alerts_table(current, now))


@main.command()
@click.option("--port", default=0, type=int, help="Receiver port (default: any free one).")
def demo(port: int) -> None:
    """The seed scenario end to end: events in, the right alert fires, then resolves."""
    from auditwatch.demo import run_demo

    sys.exit(asyncio.run(run_demo(port=port, echo=click.echo)))
