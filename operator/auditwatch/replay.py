"""Send audit log files to a receiver the way the kube-apiserver's webhook backend does.

Events go out as `EventList` batches of at most 400 items without their own kind/apiVersion
(as the apiserver batches them); a batch answered 429/5xx or lost in transport is sent again
after a backoff, as the apiserver would, so a replay tests the receiver's de-duplication too.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

APISERVER_BATCH_SIZE = 400
"""The apiserver webhook backend's default --audit-webhook-batch-max-size."""

RETRYABLE = frozenset({429, 500, 502, 503, 504})


class ReplayError(Exception):
    """The receiver refused a batch for good (4xx), or kept failing past the retries."""


@dataclass
class ReplayResult:
    events: int
    batches: int
    retries: int


def event_lists(events: Sequence[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Slices of `size` events with kind/apiVersion stripped, as EventList items carry none."""
    for start in range(0, len(events), size):
        yield [
            {k: v for k, v in event.items() if k not in ("kind", "apiVersion")}
            for event in events[start : start + size]
        ]


def encode_event_list(items: list[dict[str, Any]], compress: bool) -> bytes:
    body = orjson.dumps(
        {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": items}
    )
    return gzip.compress(body, compresslevel=1) if compress else body


async def replay(
    events: Sequence[dict[str, Any]],
    url: str,
    *,
    stream: str,
    batch_size: int = APISERVER_BATCH_SIZE,
    compress: bool = False,
    authorization: str | None = None,
    attempts: int = 5,
    backoff: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> ReplayResult:
    """POST `events` to `url` (a receiver base URL) into `stream`; returns what was sent.

    `authorization` is the Authorization header value (see `auditwatch.credentials`).
    """
    headers = {"Content-Type": "application/json", "X-P-Stream": stream}
    if compress:
        headers["Content-Encoding"] = "gzip"
    if authorization:
        headers["Authorization"] = authorization
    endpoint = url.rstrip("/") + "/api/v1/ingest"
    result = ReplayResult(events=0, batches=0, retries=0)
    timeout = aiohttp.ClientTimeout(total=30)  # the apiserver's per-request timeout
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for items in event_lists(events, batch_size):
            body = encode_event_list(items, compress)
            for attempt in range(1, attempts + 1):
                try:
                    async with session.post(endpoint, data=body, headers=headers) as response:
                        text = await response.text()
                        if response.status < 300:
                            break
                        if response.status not in RETRYABLE:
                            raise ReplayError(f"receiver answered {response.status}: {text}")
                        problem = f"receiver answered {response.status}: {text}"
                except aiohttp.ClientError as error:
                    problem = f"transport error: {error}"
                if attempt == attempts:
                    raise ReplayError(f"gave up after {attempts} attempts: {problem}")
                result.retries += 1
                await asyncio.sleep(backoff * 1.5 ** (attempt - 1))
            result.events += len(items)
            result.batches += 1
            if on_batch is not None:
                on_batch(len(items))
    return result
