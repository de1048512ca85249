"""`auditwatch status`: a running auditwatch's status as the tables kubectl would print."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp

from auditwatch.credentials import bearer_authorization


class StatusUnavailable(Exception):
    """The server could not be reached or did not answer with a status."""


async def fetch_status(server: str, token: str | None = None) -> dict[str, Any]:
    """The server's /api/v1/status; `token`: its status token, if it has one."""
    url = server.rstrip("/") + "/api/v1/status"
    headers = {} if token is None else {"Authorization": bearer_authorization(token)}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url, headers=headers) as response,
        ):
            if response.status != 200:
                raise StatusUnavailable(f"{url} answered {response.status}")
            body: dict[str, Any] = await response.json()
            return body
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise StatusUnavailable(f"cannot read {url}: {error}") from None


def age(iso_time: str | None, now: datetime) -> str:
    """kubectl's compact age: 45s, 12m, 3h, 5d; <none> when unknown."""
    if not iso_time:
        return "<none>"
    seconds = int((now - datetime.fromisoformat(iso_time.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by three spaces, as kubectl prints them."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def alerts_table(status: dict[str, Any], now: datetime) -> str:
    """NAMESPACE NAME STREAM STATE MATCHES LAST MATCH AGE, one row per alert."""
    rows = [
        [
            alert.get("namespace", ""),
            alert.get("name", ""),
            alert.get("stream") or "",
            alert.get("state", ""),
            str(alert.get("matches", 0)),
            age(alert.get("lastMatchTime"), now),
            age(alert.get("since"), now),
        ]
        for alert in status.get("alerts", {}).values()
    ]
    header = ["NAMESPACE", "NAME", "STREAM", "STATE", "MATCHES", "LAST MATCH", "AGE"]
    return table(header, rows)


def streams_table(status: dict[str, Any], now: datetime) -> str:
    """NAME READY EVENTS LAST EVENT AGE, one row per stream."""
    rows = []
    for name, stream in status.get("streams", {}).items():
        ready = next(
            (c["status"] for c in stream.get("conditions", []) if c["type"] == "Ready"), ""
        )
        rows.append(
            [
                name,
                ready,
                str(stream.get("eventsReceived", 0)),
                age(stream.get("lastEventTime"), now),
                age(stream.get("since"), now),
            ]
        )
    return table(["NAME", "READY", "EVENTS", "LAST EVENT", "AGE"], rows)
