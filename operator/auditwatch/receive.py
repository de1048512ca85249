"""The HTTP receiver: Parseable's ingest API, the apiserver's audit webhook, and the cloud push
deliveries of managed clusters (Firehose for EKS, Pub/Sub push for GKE: docs/sources.md), on one
port.

It only translates HTTP into calls on the engine and answers in a way senders act on correctly:
2xx once a batch is durably kept, 4xx with a JSON reason when retrying cannot help (nothing of
that body is kept), 503 with Retry-After when it might (the apiserver and Vector retry).

A replica that does not keep events itself (a follower of the leader replica) forwards ingest
requests to the receiver that does, body as received, and answers with that receiver's answer.

Senders it cannot trust to be quick or honest get bounded costs: deadlines on a request's headers
and body, a processing slot only for a body that has fully arrived, a share of the slots and of
the bytes being read per stream, and status and metrics only for clients holding the status
token (or, without one, on the loopback interface).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Literal, NoReturn, Protocol

import aiohttp
import jwt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from auditwatch.columnar import batch_from_json
from auditwatch.config.model import IngestAuth, OidcAuth, StreamSpec
from auditwatch.credentials import parse_basic
from auditwatch.decode import (
    BodyTooLarge,
    DecodeError,
    UnsupportedEncoding,
    decode_json,
    decompress,
)
from auditwatch.metrics import Metrics
from auditwatch.normalise import EventBatch, normalise
from auditwatch.schema import EVENT_JSON
from auditwatch.sources import Source, decode_source
from auditwatch.store import StorageUnavailable
from auditwatch.store.wal import batch_message, encode_table, read_table
from auditwatch.tls import client_certificate_problem
from auditwatch.workers import WorkerDied, WorkerPool

RETRY_AFTER_SECONDS = 5
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_SECONDS)}
"""What a 503 asks senders to wait (the apiserver backs off from 10 s anyway; Vector obeys)."""

FORWARDED_HEADER = "X-Auditwatch-Forwarded"
"""Marks a forwarded request: never forwarded again, so replicas that disagree for a moment on
who leads cannot pass a request around in a loop."""
FORWARDED_REQUEST_HEADERS = (
    "X-P-Stream",
    "Authorization",
    "Content-Encoding",
    "Content-Type",
    "Content-Length",
    "X-Amz-Firehose-Access-Key",
    "X-Amz-Firehose-Request-Id",
)
"""What the receiver at the other end reads of a request (the stream, credentials, the body)."""
FORWARDED_ANSWER_HEADERS = ("Content-Type", "Retry-After", "WWW-Authenticate")
"""What senders act on in an answer."""
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
"""Connecting fails fast (the leader is gone: 503, retry); a busy leader may take its time."""

MAX_IN_FLIGHT = 32
"""Batches whose body has arrived, decoding, storing or waiting to: past this, senders are told
to retry (bounded memory: each holds a body and then its table)."""
MAX_READING_BYTES = 512 << 20
"""Bytes of bodies still arriving, over all requests: the memory that senders who are slow to
finish a body can make the receiver hold."""
STREAM_SHARE = 0.75
"""The part of both limits one stream's requests may hold, so that the senders of one stream
(slow, hostile or just busy) always leave room for the others."""
CREDENTIALS_REFUSED = "no such stream, or wrong credentials for it"
CREDENTIALS_MISSING = "no such stream, or credentials required"
"""The answers to an unknown stream and to a known one without valid credentials are the same,
so that stream names cannot be found by probing."""
CHALLENGE = {"WWW-Authenticate": 'Basic realm="auditwatch", Bearer realm="auditwatch"'}
"""Every 401 offers both schemes: which one a stream takes is not revealed either."""

log = logging.getLogger("auditwatch.receive")
http_logger = logging.getLogger("auditwatch.receive.http")
"""aiohttp's connection-level log (malformed requests): see `ShortParserErrors`."""


@dataclass(frozen=True)
class ReceiverOptions:
    """What an operator tunes of the receiver (flags and environment of `serve` and `run`)."""

    header_timeout: float = 60.0
    """Seconds a connection has to send a request's headers, from its opening or from the
    previous answer (an idle keep-alive connection is closed after this too)."""
    body_timeout: float = 60.0
    """Seconds a request has to send its whole body once its headers are in: 408 past that."""
    status_token: str | None = None
    """Bearer token that `GET /api/v1/status` and `/metrics` require; None: they answer only
    clients on the loopback interface."""


class ShortParserErrors(logging.Filter):
    """Turns aiohttp's record of a request its HTTP parser refused (an ERROR with a traceback
    whose message quotes the raw bytes, up to the whole buffer: a malformed chunked body logged
    ~120 KiB each) into one WARNING line with the reason only. The sender gets its 400 anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = str(error.message).strip().splitlines()[0].rstrip(":")[:120]
            record.msg = "refused a malformed HTTP request from %s: %s"
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (remote, reason)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        return True


http_logger.addFilter(ShortParserErrors())


class Shares:
    """Amounts of a limited resource held per stream: at most `total` in all, and one stream
    at most `STREAM_SHARE` of it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.per_stream = max(1, int(total * STREAM_SHARE))
        self.used = 0
        self.by_stream: dict[str, int] = {}

    def take(self, stream: str, amount: int) -> bool:
        held = self.by_stream.get(stream, 0)
        if self.used + amount > self.total or held + amount > self.per_stream:
            return False
        self.used += amount
        self.by_stream[stream] = held + amount
        return True

    def give(self, stream: str, amount: int) -> None:
        self.used -= amount
        held = self.by_stream[stream] - amount
        if held:
            self.by_stream[stream] = held
        else:
            del self.by_stream[stream]


class Ingestor(Protocol):
    """What the receiver needs from the engine."""

    metrics: Metrics

    def stream(self, name: str) -> StreamSpec | None: ...

    def clock(self) -> datetime: ...

    async def ingest(self, stream: StreamSpec, batch: EventBatch) -> dict[str, int]: ...

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, str]: ...


class Rejected(Exception):
    """An answer other than 200, with the reason the sender sees and the metric label."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


async def close_after(request: web.Request, response: web.StreamResponse) -> None:
    """Send `response` now and close the connection: its sender stopped sending mid-body, and
    aiohttp would otherwise keep reading what it may still send for a while."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def presented_credentials(header: str | None) -> tuple[str, str]:
    """The scheme (lower case) and credentials of an Authorization header; Rejected 401 if it
    carries none (absent, a scheme alone, malformed Basic)."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if not credentials:
        raise Rejected(401, "unauthenticated", CREDENTIALS_MISSING, CHALLENGE)
    if scheme == "basic" and parse_basic(credentials) is None:
        raise Rejected(401, "unauthenticated", CREDENTIALS_MISSING, CHALLENGE)
    return scheme, credentials


def check_auth(
    auth: IngestAuth | None, header: str | None, certificate: bytes | None = None
) -> None:
    """Raise Rejected unless the Authorization header (or the TLS client `certificate`, DER)
    carries the stream's credentials: 401 without credentials, 403 with others."""
    if auth is None:
        return
    if auth.client_certificate is not None:
        problem = client_certificate_problem(auth.client_certificate, certificate)
        if problem is not None:
            if certificate is None:
                raise Rejected(401, "unauthenticated", problem)
            raise Rejected(403, "forbidden", problem)
        return
    scheme, credentials = presented_credentials(header)
    if auth.bearer_token is not None and scheme == "bearer":
        if hmac.compare_digest(credentials.encode(), auth.bearer_token.encode()):
            return
    elif auth.username is not None and scheme == "basic":
        user, password = parse_basic(credentials) or ("", "")
        user_ok = hmac.compare_digest(user.encode(), auth.username.encode())
        password_ok = hmac.compare_digest(password.encode(), (auth.password or "").encode())
        if user_ok and password_ok:
            return
    raise Rejected(403, "forbidden", CREDENTIALS_REFUSED)


UNKNOWN_STREAM_AUTH = IngestAuth(bearer_token=secrets.token_urlsafe(32))
"""What a stream that does not exist takes: a token no sender has, so that every route refuses
it exactly as it refuses wrong credentials for a stream that exists."""


def refuse_unknown_stream(authenticate: Callable[[IngestAuth | None], None]) -> NoReturn:
    """Answer a request for a stream that does not exist as `authenticate` answers one whose
    credentials the stream does not take: 401 without credentials, 403 with any. The metric's
    reason stays `unknown_stream`."""
    try:
        authenticate(UNKNOWN_STREAM_AUTH)
    except Rejected as rejected:
        raise Rejected(
            rejected.status, "unknown_stream", rejected.message, rejected.headers
        ) from None
    raise Rejected(403, "unknown_stream", CREDENTIALS_REFUSED)


def check_firehose_key(auth: IngestAuth | None, key: str | None) -> None:
    """Raise Rejected unless the Firehose access key header is the stream's bearer token (a
    stream with other credentials takes no Firehose delivery)."""
    if auth is None:
        return
    if not key:
        raise Rejected(401, "unauthenticated", CREDENTIALS_MISSING)
    if auth.bearer_token is None or not hmac.compare_digest(
        key.encode(), auth.bearer_token.encode()
    ):
        raise Rejected(403, "forbidden", CREDENTIALS_REFUSED)


def check_pubsub(auth: IngestAuth | None, token: str | None, header: str | None) -> None:
    """Raise Rejected unless a Pub/Sub push carries the stream's credentials: an OIDC ID token
    (`oidc`), or the bearer token in the push URL's `token` query parameter."""
    if auth is not None and auth.oidc is not None:
        scheme, credentials = presented_credentials(header)
        if scheme != "bearer":
            raise Rejected(403, "forbidden", CREDENTIALS_REFUSED)
        check_oidc(auth.oidc, credentials)
    elif auth is not None and auth.bearer_token is not None and token is not None:
        if not hmac.compare_digest(token.encode(), auth.bearer_token.encode()):
            raise Rejected(403, "forbidden", CREDENTIALS_REFUSED)
    else:
        check_auth(auth, header)


def check_oidc(oidc: OidcAuth, token: str) -> None:
    """Raise Rejected unless `token` is a JWT signed by a key of the stream's key set, for its
    issuer and audience, unexpired, and naming its service account (when one is set). The
    sender sees only the usual refusal; why it was refused is logged (never the token)."""
    try:
        keys = jwt.PyJWKSet.from_json(oidc.jwks)
        kid = jwt.get_unverified_header(token).get("kid")
        key = next((k for k in keys.keys if kid is None or k.key_id == kid), None)
        if key is None:
            raise jwt.InvalidTokenError(f"no key {kid!r} in the stream's key set")
        claims = jwt.decode(
            token,
            key=key.key,
            algorithms=[key.algorithm_name],
            audience=oidc.audience,
            issuer=oidc.issuer,
            options={"require": ["exp", "iss", "aud"]},
        )
    except (jwt.PyJWTError, ValueError) as error:
        log.info("OIDC token refused: %s", error)
        raise Rejected(403, "forbidden", CREDENTIALS_REFUSED) from None
    if oidc.email is not None and (
        claims.get("email") != oidc.email or claims.get("email_verified") is not True
    ):
        log.info("OIDC token refused: not for the service account %s", oidc.email)
        raise Rejected(403, "forbidden", CREDENTIALS_REFUSED)


def is_loopback(address: str | None) -> bool:
    """Whether a peer address is on this host's loopback interface (IPv4-mapped too)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def peer_certificate(request: web.Request) -> bytes | None:
    """The client's certificate (DER) if it sent one over HTTPS; the TLS layer verified it."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    return None if ssl_object is None else ssl_object.getpeercert(binary_form=True)


async def read_body(
    request: web.Request, stream: StreamSpec, deadline: float, reading: Shares
) -> bytes:
    """The request body, refused with 413 as soon as it passes the stream's limit, 408 unless it
    has all arrived within `deadline` seconds, and 503 while the stream's senders already have
    their share of `reading` (bytes of bodies still arriving)."""
    limit = stream.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Rejected(413, "too_large", f"body of {request.content_length} bytes exceeds {limit}")
    chunks: list[bytes] = []
    held = 0
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.content.iter_any():  # as received: no re-slicing copies
                if held + len(chunk) > limit:
                    raise Rejected(413, "too_large", f"body exceeds {limit} bytes")
                if not reading.take(stream.name, len(chunk)):
                    raise Rejected(
                        503, "busy", "too many bodies arriving; retry later", RETRY_HEADERS
                    )
                held += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise Rejected(
            408, "body_timeout", f"the body did not arrive within {deadline:g} s"
        ) from None
    finally:
        if held:
            reading.give(stream.name, held)
    return b"".join(chunks)


@dataclass(frozen=True)
class Limits:
    """A stream's size limits, as the decoding step needs them (picklable for worker processes)."""

    body_bytes: int
    event_bytes: int


def prepare_batch(
    body: bytes,
    encoding: str | None,
    limits: Limits,
    received_at: datetime,
    source: Source | None = None,
) -> EventBatch:
    """Decode a body into a normalised batch and enforce the size limits.

    CPU work, run off the event loop. The body limit holds after decompression too, so a small
    gzip bomb is refused as well. `source` names the cloud envelope of a push delivery.
    """
    try:
        data = decompress(body, encoding, limits.body_bytes)
        if source is not None:
            batch = normalise(decode_source(data, source, limits.body_bytes), received_at)
        else:
            fast = batch_from_json(data, received_at)
            batch = fast if fast is not None else normalise(decode_json(data), received_at)
    except BodyTooLarge as error:
        raise Rejected(413, "too_large", str(error)) from None
    except UnsupportedEncoding as error:
        raise Rejected(415, "unsupported_encoding", str(error)) from None
    except DecodeError as error:
        raise Rejected(400, "malformed", str(error)) from None
    sizes = pc.binary_length(batch.table[EVENT_JSON])
    oversized = pc.indices_nonzero(pc.greater(sizes, limits.event_bytes))
    if len(oversized):
        index = oversized[0].as_py()
        raise Rejected(
            413,
            "event_too_large",
            f"event {index} is {sizes[index].as_py()} bytes, over the limit of "
            f"{limits.event_bytes}",
        )
    return batch


_ANNOTATIONS_COMPLETE = b"auditwatch.annotations_complete"


def prepare_batch_in_worker(
    body: bytes, arguments: tuple[str | None, Limits, datetime, Source | None]
) -> pa.Buffer | tuple[int, str, str]:
    """`prepare_batch` in a worker process: the batch encoded the way the store stages it
    (`encode_table`), or the rejection (status, reason, message).

    Encoding here spares the receiving process, whose GIL the event loop needs: there the
    table is read from these bytes without a copy, and the store writes them as they are.
    `EventBatch.annotations_complete` travels in the stream's schema metadata, which the store
    does not stage (it stages the batch message alone).
    """
    try:
        batch = prepare_batch(body, *arguments)
    except Rejected as rejected:
        return rejected.status, rejected.reason, rejected.message
    complete = {_ANNOTATIONS_COMPLETE: b"1"} if batch.annotations_complete else None
    return encode_table(batch.table.replace_schema_metadata(complete))


class Decoder:
    """Runs `prepare_batch` in worker processes (`workers` > 0) or in a thread of this one.

    In worker processes, decoding uses the other cores and leaves this process's GIL to the event
    loop (and to kopf, which shares it). The batch comes back in its staging form, and its
    events are parsed again only where a rule or a notification needs them.
    """

    def __init__(self, workers: int) -> None:
        self._pool = WorkerPool(workers, prepare_batch_in_worker) if workers else None

    async def prepare(
        self,
        body: bytes,
        encoding: str | None,
        limits: Limits,
        received_at: datetime,
        source: Source | None = None,
    ) -> EventBatch:
        if self._pool is None:
            return await asyncio.to_thread(
                prepare_batch, body, encoding, limits, received_at, source
            )
        try:
            result = await self._pool.run(body, (encoding, limits, received_at, source))
        except WorkerDied:  # OOM-killed, say: the pool starts another
            raise Rejected(
                503, "decoder_restarting", "a decoding worker died; retry", RETRY_HEADERS
            ) from None
        if isinstance(result, tuple):
            raise Rejected(*result)
        stream = pa.py_buffer(result)
        table = read_table(stream)
        complete = (table.schema.metadata or {}).get(_ANNOTATIONS_COMPLETE) == b"1"
        return EventBatch(
            table.replace_schema_metadata(None),
            staged=batch_message(stream),
            annotations_complete=complete,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


class Receiver:
    """The aiohttp application around an engine.

    `forward_to`, if given, is asked on every ingest request for the URL of a receiver to hand
    the request to instead (None: ingest here). The engine itself knows nothing of forwarding,
    so it is a separate callable rather than a member of `Ingestor`.
    """

    def __init__(
        self,
        engine: Ingestor,
        *,
        decode_workers: int = 0,
        max_processing: int = 8,
        forward_to: Callable[[], str | None] | None = None,
        options: ReceiverOptions | None = None,
    ) -> None:
        self.engine = engine
        self.forward_to = forward_to
        self.options = options or ReceiverOptions()
        self._client: aiohttp.ClientSession | None = None
        self.decoder = Decoder(decode_workers)
        self.in_flight = Shares(MAX_IN_FLIGHT)
        self.reading = Shares(MAX_READING_BYTES)
        # Requests forwarded to the leader at once (a follower keeps no batches itself).
        self.forwarding = asyncio.Semaphore(MAX_IN_FLIGHT)
        # Batches being decoded and stored at once: enough that decoding workers do not wait
        # while other batches are being stored or answered (each holds a body and its table).
        self.processing = asyncio.Semaphore(max_processing)
        # Limits are per stream (read_body), and decompression is decode_body's: aiohttp's own
        # would undo gzip before the handler sees it, and without the stream's size limit.
        self.app = web.Application(client_max_size=1 << 40, handler_args={"auto_decompress": False})
        self.app.on_cleanup.append(self._close_decoder)
        self.app.on_cleanup.append(self._close_client)
        self.app.add_routes(
            [
                web.post("/api/v1/ingest", self.ingest_by_header),
                web.post("/api/v1/logstream/{stream}", self.ingest_by_path),
                web.post("/api/v1/firehose/{stream}", self.ingest_firehose),
                web.post("/api/v1/pubsub/{stream}", self.ingest_pubsub),
                web.get("/api/v1/liveness", self.liveness),
                web.get("/api/v1/readiness", self.readiness),
                web.get("/api/v1/status", self.status),
                web.get("/metrics", self.metrics),
            ]
        )

    async def ingest_by_header(self, request: web.Request) -> web.Response:
        return await self.ingest(request, request.headers.get("X-P-Stream", ""))

    async def ingest_by_path(self, request: web.Request) -> web.Response:
        return await self.ingest(request, request.match_info["stream"])

    async def ingest_firehose(self, request: web.Request) -> web.Response:
        """Amazon Data Firehose HTTP endpoint delivery: the access key header is the credential,
        and every answer is Firehose's JSON (`requestId`, `timestamp`, `errorMessage`)."""
        request_id = request.headers.get("X-Amz-Firehose-Request-Id", "")

        def answer(
            status: int, body: dict[str, Any], headers: dict[str, str] | None
        ) -> web.Response:
            reply: dict[str, Any] = {"requestId": request_id, "timestamp": int(time.time() * 1000)}
            if "error" in body:
                reply["errorMessage"] = body["error"]
            return json_response(status, reply, headers)

        return await self.ingest(
            request,
            request.match_info["stream"],
            source="firehose",
            authenticate=lambda auth: check_firehose_key(
                auth, request.headers.get("X-Amz-Firehose-Access-Key")
            ),
            answer=answer,
        )

    async def ingest_pubsub(self, request: web.Request) -> web.Response:
        """Pub/Sub push: a URL `token` or an OIDC ID token; any 2xx acknowledges the message."""
        return await self.ingest(
            request,
            request.match_info["stream"],
            source="pubsub",
            authenticate=lambda auth: check_pubsub(
                auth, request.query.get("token"), request.headers.get("Authorization")
            ),
        )

    async def ingest(
        self,
        request: web.Request,
        name: str,
        *,
        source: Literal["firehose", "pubsub"] | None = None,
        authenticate: Callable[[IngestAuth | None], None] | None = None,
        answer: Callable[[int, dict[str, Any], dict[str, str] | None], web.Response] = (
            json_response
        ),
    ) -> web.Response:
        """One ingest request; a push `source` decodes its cloud envelope, `authenticate` checks
        its credentials (default: the Authorization header) and `answer` words every answer."""
        started = time.perf_counter()
        metrics = self.engine.metrics
        label = ""  # a stream name for metrics only once it names a stream: no unbounded series
        try:
            leader = self.forward_to() if self.forward_to is not None else None
            if leader is not None:
                response = await self.forward(request, leader)  # answered by the leader
                metrics.requests_forwarded.labels(str(response.status)).inc()
                metrics.request_seconds.labels(str(response.status)).observe(
                    time.perf_counter() - started
                )
                return response
            if not name:
                raise Rejected(400, "no_stream", "missing X-P-Stream header naming the stream")
            if authenticate is None:
                authenticate = partial(
                    check_auth,
                    header=request.headers.get("Authorization"),
                    certificate=peer_certificate(request),
                )
            stream = self.engine.stream(name)
            if stream is None:
                refuse_unknown_stream(authenticate)
            label = name
            authenticate(stream.auth)
            body = await read_body(request, stream, self.options.body_timeout, self.reading)
            if not self.in_flight.take(name, 1):
                raise Rejected(
                    503, "busy", "too many batches in progress; retry later", RETRY_HEADERS
                )
            try:
                async with self.processing:
                    batch = await self.decoder.prepare(
                        body,
                        request.headers.get("Content-Encoding"),
                        Limits(stream.max_body_bytes, stream.max_event_bytes),
                        self.engine.clock(),
                        None if source is None else Source(source, stream.cluster),
                    )
                    try:
                        result = await self.engine.ingest(stream, batch)
                    except StorageUnavailable as error:
                        raise Rejected(
                            503, "storage_unavailable", str(error), RETRY_HEADERS
                        ) from None
            finally:
                self.in_flight.give(name, 1)
        except Rejected as rejected:
            metrics.requests_rejected.labels(label, rejected.reason).inc()
            metrics.request_seconds.labels(str(rejected.status)).observe(
                time.perf_counter() - started
            )
            response = answer(rejected.status, {"error": rejected.message}, rejected.headers)
            if rejected.status == 408:
                await close_after(request, response)
            return response
        metrics.request_seconds.labels("200").observe(time.perf_counter() - started)
        return answer(200, result, None)

    async def forward(self, request: web.Request, leader: str) -> web.Response:
        """The answer of the receiver at `leader` to this request, the body streamed through
        unread: that receiver checks the stream, credentials and limits, and keeps the events."""
        if FORWARDED_HEADER in request.headers:
            raise Rejected(
                503,
                "forward_loop",
                "forwarded to a replica that is not the leader either (leadership is changing); "
                "retry later",
                RETRY_HEADERS,
            )
        if self.forwarding.locked():
            raise Rejected(503, "busy", "too many batches in progress; retry later", RETRY_HEADERS)
        headers = {
            name: request.headers[name]
            for name in FORWARDED_REQUEST_HEADERS
            if name in request.headers
        }
        headers[FORWARDED_HEADER] = "1"
        if self._client is None:
            # No decompression: answers pass through as the leader sent them.
            self._client = aiohttp.ClientSession(timeout=FORWARD_TIMEOUT, auto_decompress=False)
        async with self.forwarding:
            try:
                async with self._client.post(
                    leader.rstrip("/") + str(request.rel_url),
                    data=request.content,
                    headers=headers,
                ) as answer:
                    body = await answer.read()
            except (aiohttp.ClientError, TimeoutError) as error:
                raise Rejected(
                    503,
                    "leader_unreachable",
                    f"the leader's receiver at {leader} did not answer ({error!r}); retry later",
                    RETRY_HEADERS,
                ) from None
        return web.Response(
            status=answer.status,
            body=body,
            headers={
                name: answer.headers[name]
                for name in FORWARDED_ANSWER_HEADERS
                if name in answer.headers
            },
        )

    async def _close_decoder(self, app: web.Application) -> None:
        self.decoder.close()

    async def _close_client(self, app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def runner(self, **kwargs: Any) -> web.AppRunner:
        """An AppRunner serving this receiver, with its header deadline and its log."""
        return web.AppRunner(
            self.app,
            access_log=None,
            keepalive_timeout=self.options.header_timeout,
            logger=http_logger,
            **kwargs,
        )

    def refuse_observer(self, request: web.Request) -> web.Response | None:
        """The refusal for a client that may not read status and metrics (they name alerts,
        streams and the last match's user and resource), None for one that may: with the
        status token, or, when the server has none, from the loopback interface."""
        token = self.options.status_token
        if token is None:
            if is_loopback(request.remote):
                return None
            message = (
                "status and metrics answer only loopback clients unless the server is given "
                "a status token (--status-token)"
            )
            return json_response(403, {"error": message})
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            return None
        return json_response(
            401,
            {"error": "status and metrics need the status token as a bearer token"},
            {"WWW-Authenticate": 'Bearer realm="auditwatch"'},
        )

    async def liveness(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "alive"})

    async def readiness(self, request: web.Request) -> web.Response:
        ready, reason = self.engine.readiness()
        return json_response(200 if ready else 503, {"ready": ready, "reason": reason})

    async def status(self, request: web.Request) -> web.Response:
        if (refusal := self.refuse_observer(request)) is not None:
            return refusal
        return json_response(200, self.engine.status())

    async def metrics(self, request: web.Request) -> web.Response:
        if (refusal := self.refuse_observer(request)) is not None:
            return refusal
        return web.Response(
            body=self.engine.metrics.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
