"""The HTTP receiver: Parseable's ingest API, the apiserver's audit webhook, and the cloud push
deliveries of managed clusters (Firehose for EKS, Pub/Sub push for GKE: docs/sources.md), on one
port.

It only translates HTTP into calls on the engine and answers in a way senders act on correctly:
2xx once a batch is durably kept, 4xx with a JSON reason when retrying cannot help (nothing of
that body is kept), 503 with Retry-After when it might (the apiserver and Vector retry).

A replica that does not keep events itself (a follower of the leader replica) forwards ingest
requests to the receiver that does, body as received, and answers with that receiver's answer.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import aiohttp
import jwt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import web

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


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def check_auth(auth: IngestAuth | None, header: str | None) -> None:
    """Raise Rejected unless the Authorization header carries the stream's credentials."""
    if auth is None:
        return
    scheme_name = "Bearer" if auth.bearer_token is not None else "Basic"
    challenge = {"WWW-Authenticate": f'{scheme_name} realm="auditwatch"'}
    if not header:
        raise Rejected(401, "unauthenticated", "credentials required", challenge)
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if auth.bearer_token is not None and scheme == "bearer":
        if hmac.compare_digest(credentials.strip().encode(), auth.bearer_token.encode()):
            return
    elif auth.username is not None and scheme == "basic":
        parsed = parse_basic(credentials)
        if parsed is None:
            raise Rejected(401, "unauthenticated", "malformed basic credentials", challenge)
        user, password = parsed
        user_ok = hmac.compare_digest(user.encode(), auth.username.encode())
        password_ok = hmac.compare_digest(password.encode(), (auth.password or "").encode())
        if user_ok and password_ok:
            return
    raise Rejected(403, "forbidden", "wrong credentials for this stream")


def check_firehose_key(auth: IngestAuth | None, key: str | None) -> None:
    """Raise Rejected unless the Firehose access key header is the stream's bearer token."""
    if auth is None:
        return
    if auth.bearer_token is None:
        raise Rejected(
            403, "forbidden", "this stream takes no Firehose access key (give it a bearer token)"
        )
    if not key:
        raise Rejected(401, "unauthenticated", "missing X-Amz-Firehose-Access-Key")
    if not hmac.compare_digest(key.encode(), auth.bearer_token.encode()):
        raise Rejected(403, "forbidden", "wrong access key for this stream")


def check_pubsub(auth: IngestAuth | None, token: str | None, header: str | None) -> None:
    """Raise Rejected unless a Pub/Sub push carries the stream's credentials: an OIDC ID token
    (`oidc`), or the bearer token in the push URL's `token` query parameter."""
    if auth is not None and auth.oidc is not None:
        scheme, _, credentials = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            challenge = {"WWW-Authenticate": 'Bearer realm="auditwatch"'}
            raise Rejected(401, "unauthenticated", "OIDC token required", challenge)
        check_oidc(auth.oidc, credentials.strip())
    elif auth is not None and auth.bearer_token is not None and token is not None:
        if not hmac.compare_digest(token.encode(), auth.bearer_token.encode()):
            raise Rejected(403, "forbidden", "wrong credentials for this stream")
    else:
        check_auth(auth, header)


def check_oidc(oidc: OidcAuth, token: str) -> None:
    """Raise Rejected unless `token` is a JWT signed by a key of the stream's key set, for its
    issuer and audience, unexpired, and naming its service account (when one is set)."""
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
        raise Rejected(403, "forbidden", f"OIDC token refused: {error}") from None
    if oidc.email is not None and (
        claims.get("email") != oidc.email or claims.get("email_verified") is not True
    ):
        raise Rejected(403, "forbidden", "OIDC token is not for this stream's service account")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise Rejected(413, "too_large", f"body of {request.content_length} bytes exceeds {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():  # as received: no re-slicing copies
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
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


def prepare_batch_in_worker(
    body: bytes, arguments: tuple[str | None, Limits, datetime, Source | None]
) -> pa.Buffer | tuple[int, str, str]:
    """`prepare_batch` in a worker process: the batch encoded the way the store stages it
    (`encode_table`), or the rejection (status, reason, message).

    Encoding here spares the receiving process, whose GIL the event loop needs: there the
    table is read from these bytes without a copy, and the store writes them as they are.
    """
    try:
        table = prepare_batch(body, *arguments).table
    except Rejected as rejected:
        return rejected.status, rejected.reason, rejected.message
    return encode_table(table)


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
        return EventBatch(read_table(stream), staged=batch_message(stream))

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
        max_in_flight: int = 32,
        max_processing: int = 8,
        forward_to: Callable[[], str | None] | None = None,
    ) -> None:
        self.engine = engine
        self.forward_to = forward_to
        self._client: aiohttp.ClientSession | None = None
        self.decoder = Decoder(decode_workers)
        # Requests being read or processed; past this, senders are told to retry (bounded memory).
        self.in_flight = asyncio.Semaphore(max_in_flight)
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
            authenticate=lambda stream: check_firehose_key(
                stream.auth, request.headers.get("X-Amz-Firehose-Access-Key")
            ),
            answer=answer,
        )

    async def ingest_pubsub(self, request: web.Request) -> web.Response:
        """Pub/Sub push: a URL `token` or an OIDC ID token; any 2xx acknowledges the message."""
        return await self.ingest(
            request,
            request.match_info["stream"],
            source="pubsub",
            authenticate=lambda stream: check_pubsub(
                stream.auth, request.query.get("token"), request.headers.get("Authorization")
            ),
        )

    async def ingest(
        self,
        request: web.Request,
        name: str,
        *,
        source: Literal["firehose", "pubsub"] | None = None,
        authenticate: Callable[[StreamSpec], None] | None = None,
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
            stream = self.engine.stream(name)
            if stream is None:
                raise Rejected(404, "unknown_stream", f"no AuditStream named {name!r}")
            label = name
            if authenticate is None:
                check_auth(stream.auth, request.headers.get("Authorization"))
            else:
                authenticate(stream)
            if self.in_flight.locked():
                raise Rejected(
                    503,
                    "busy",
                    "too many batches in progress; retry later",
                    RETRY_HEADERS,
                )
            async with self.in_flight:
                body = await read_body(request, stream.max_body_bytes)
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
        except Rejected as rejected:
            metrics.requests_rejected.labels(label, rejected.reason).inc()
            metrics.request_seconds.labels(str(rejected.status)).observe(
                time.perf_counter() - started
            )
            return answer(rejected.status, {"error": rejected.message}, rejected.headers)
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
        if self.in_flight.locked():
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
        async with self.in_flight:
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

    async def liveness(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "alive"})

    async def readiness(self, request: web.Request) -> web.Response:
        ready, reason = self.engine.readiness()
        return json_response(200 if ready else 503, {"ready": ready, "reason": reason})

    async def status(self, request: web.Request) -> web.Response:
        return json_response(200, self.engine.status())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.engine.metrics.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
