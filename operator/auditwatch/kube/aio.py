"""A pause that ends early when a stop flag is set, and survives kopf's shutdown.

kopf, when it stops, cancels every task created after it started (it cannot tell its own from
others'). `asyncio.wait_for(stop.wait(), t)` would then raise CancelledError in whoever waits;
here a cancelled helper task merely ends the pause early.
"""

from __future__ import annotations

import asyncio


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, less if `stop` is set; True if it is set."""
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(seconds, 0.0))
    finally:
        waiter.cancel()
    return stop.is_set()
