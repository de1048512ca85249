"""Sending notices: HTTP POSTs with timeouts, retries and a per-target delivery record.

Parseable ignores non-2xx answers and never retries; here transport errors, timeouts, 5xx and
429 are retried with exponential backoff and jitter (429 and 503 honour `Retry-After`), while other
4xx answers are final (the request itself is wrong: retrying cannot help) and are recorded so the
user sees them in the alert's status. Notices to one target are delivered one after the other, so
a resolve never overtakes the firing it ends.

A target's URL may be a credential (a Slack webhook, `user:password@`) and its answer is under a
tenant's control, so neither ever reaches status, logs or metrics: a target is named by its
`name`, and a failure by a short reason of our own (`HTTP 500 Internal Server Error from target`,
`connection refused`, `address 169.254.169.254 denied by egress policy`). Redirects are never
followed (a 3xx is a final failure), and connections go only where the egress policy allows.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from auditwatch.alerts import Notice
from auditwatch.config.model import AlertSpec, TargetSpec
from auditwatch.credentials import basic_authorization
from auditwatch.notify.egress import EgressDenied, EgressPolicy, PolicyResolver
from auditwatch.notify.payloads import (
    alertmanager_body,
    alertmanager_url,
    slack_body,
    webhook_body,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` in all, waits growing by `factor` from `initial` (seconds)."""

    attempts: int = 5
    initial: float = 1.0
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.2
    """Each wait is scaled by a random factor in [1 - jitter, 1 + jitter]."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        backoff = min(self.initial * self.factor ** (attempt - 1), self.max_delay)
        return backoff * random.uniform(1 - self.jitter, 1 + self.jitter)


class DeliveryError(Exception):
    """A failed attempt; `retryable` says whether trying again may succeed."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class DeliveryRecord:
    """What happened to the notices of one target: for the alert's status and for metrics."""

    sent: int = 0
    failed: int = 0
    """Notices given up on (after the retries, or at once on a final error)."""
    retries: int = 0
    last_success: datetime | None = None
    last_error: str | None = None
    last_error_time: datetime | None = None

    def as_status(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "retries": self.retries,
            "lastSuccess": None if self.last_success is None else self.last_success.isoformat(),
            "lastError": self.last_error,
            "lastErrorTime": (
                None if self.last_error_time is None else self.last_error_time.isoformat()
            ),
        }


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((moment - datetime.now(UTC)).total_seconds(), 0.0)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Notifier:
    """Delivers notices of any alert to its targets; one per process, shared by all alerts.

    Use as `async with Notifier() as notifier:`. Every connection goes through `egress` (the
    defaults when not given); `resolver` replaces the system's name resolution (tests).
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        generator_url: str | None = None,
        clock: Callable[[], datetime] = _utcnow,
        egress: EgressPolicy | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.retry = retry or RetryPolicy()
        self.generator_url = generator_url
        self.clock = clock
        self.egress = egress or EgressPolicy()
        self._resolver = resolver
        self._records: dict[tuple[str, str], DeliveryRecord] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        """The session, created on first use: connections only to what the policy allows, and
        no proxy from the environment (it would connect on our behalf, unchecked)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=PolicyResolver(self.egress, self._resolver))
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    # -- records ----------------------------------------------------------------------------

    def record(self, alert: str, target: str) -> DeliveryRecord:
        """The delivery record of one target of one alert (created empty if new)."""
        return self._records.setdefault((alert, target), DeliveryRecord())

    def status(self, alert: str) -> dict[str, dict[str, Any]]:
        """Per-target delivery results of an alert, keyed by target name, for its status."""
        return {
            target: record.as_status()
            for (key, target), record in self._records.items()
            if key == alert
        }

    def forget(self, alert: str) -> None:
        """Drop the records of a deleted alert."""
        for key in [key for key in self._records if key[0] == alert]:
            del self._records[key]
            self._locks.pop(key, None)

    # -- delivery ---------------------------------------------------------------------------

    async def deliver_all(self, spec: AlertSpec, notices: Iterable[Notice]) -> None:
        """Deliver notices to their targets concurrently (in order per target)."""
        await asyncio.gather(*(self.deliver(spec, notice) for notice in notices))

    async def deliver(self, spec: AlertSpec, notice: Notice) -> bool:
        """Deliver one notice, retrying as the policy allows; True once the target accepted it."""
        target = next((t for t in spec.targets if t.name == notice.target), None)
        if target is None:
            logger.warning(
                "alert %s: notice for target %r dropped: the alert has no such target any more",
                notice.alert,
                notice.target,
            )
            return False
        key = (notice.alert, target.name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            return await self._deliver(spec, target, notice, self.record(*key))

    async def _deliver(
        self, spec: AlertSpec, target: TargetSpec, notice: Notice, record: DeliveryRecord
    ) -> bool:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._send(spec, target, notice)
            except DeliveryError as err:
                final = not err.retryable or attempt >= self.retry.attempts
                logger.log(
                    logging.WARNING if final else logging.INFO,
                    "alert %s: %s notice to %s target %r failed (attempt %d): %s",
                    notice.alert,
                    notice.kind,
                    target.type,
                    target.name,
                    attempt,
                    err,
                )
                record.last_error = str(err)
                record.last_error_time = self.clock()
                if final:
                    record.failed += 1
                    return False
                record.retries += 1
                await asyncio.sleep(self.retry.delay(attempt, err.retry_after))
            else:
                record.sent += 1
                record.last_success = self.clock()
                return True

    async def _send(self, spec: AlertSpec, target: TargetSpec, notice: Notice) -> None:
        """One POST; raises DeliveryError with a reason of our own on anything but 2xx."""
        sent_at = self.clock()
        endpoint = target.endpoint
        headers: dict[str, str] = {}
        body: Any
        if target.type == "webhook":
            body = webhook_body(spec, notice, sent_at)
            headers.update(target.headers)
        elif target.type == "slack":
            body = slack_body(spec, notice)
        else:
            body = alertmanager_body(spec, notice, sent_at, self.generator_url)
            endpoint = alertmanager_url(target.endpoint)
            headers.update(target.headers)
            if target.username is not None:
                headers["Authorization"] = basic_authorization(
                    target.username, target.password or ""
                )
        seconds = target.timeout.total_seconds()
        try:
            url = URL(endpoint)
            self.egress.check_host(url.host)
            async with self._client().post(
                url,
                json=body,
                headers=headers,
                ssl=not target.skip_tls_check,
                timeout=aiohttp.ClientTimeout(total=seconds),
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return
                raise _answer_error(response.status, response.headers.get("Retry-After"))
        except EgressDenied as error:
            raise DeliveryError(str(error), retryable=False) from None
        except TimeoutError:
            raise DeliveryError(f"no answer within {seconds:g} s", retryable=True) from None
        except (aiohttp.ClientError, ValueError) as error:
            raise DeliveryError(_failure_reason(error), retryable=True) from None


def _answer_error(status: int, retry_after: str | None) -> DeliveryError:
    """A non-2xx answer as our own words: its status code and phrase, never its body."""
    try:
        phrase = f" {HTTPStatus(status).phrase}"
    except ValueError:
        phrase = ""
    message = f"HTTP {status}{phrase} from target"
    if 300 <= status < 400:
        return DeliveryError(f"{message} (redirects are not followed)", retryable=False)
    return DeliveryError(
        message,
        retryable=status >= 500 or status in (408, 429),
        retry_after=_retry_after(retry_after),
    )


def _failure_reason(error: Exception) -> str:
    """Why a request got no answer, without the URL or host aiohttp puts in its messages."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate of the target not trusted"
    if isinstance(error, aiohttp.ClientSSLError):
        return "TLS handshake with the target failed"
    if isinstance(error, aiohttp.ClientConnectorError):
        if isinstance(error.os_error, socket.gaierror):
            return "host name not resolved"
        if error.os_error.errno == errno.ECONNREFUSED:
            return "connection refused"
        if error.os_error.errno:
            return f"cannot connect: {os.strerror(error.os_error.errno).lower()}"
        return "cannot connect"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the target closed the connection without answering"
    if isinstance(error, aiohttp.InvalidURL | ValueError):
        return "the endpoint is not a valid URL"
    return f"request failed ({error.__class__.__name__})"
