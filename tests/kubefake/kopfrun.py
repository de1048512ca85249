"""Running a real kopf operator in-process against a KubeFake."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING, Any

import kopf

if TYPE_CHECKING:
    from tests.kubefake.server import KubeFake


class _LoginTarget:
    """Where a registry's login handler points; re-pointed when the registry meets another fake."""

    url = ""


_login_targets: weakref.WeakKeyDictionary[kopf.OperatorRegistry, _LoginTarget] = (
    weakref.WeakKeyDictionary()
)


def fast_settings() -> kopf.OperatorSettings:
    """Settings that keep an operator under test quick to react and quick to stop."""
    settings = kopf.OperatorSettings()
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.watching.reconnect_backoff = 0.05
    settings.persistence.consistency_timeout = 2.0
    settings.background.instant_exit_timeout = 0.5
    settings.process.ultimate_exiting_timeout = 5.0
    return settings


def _point_login_at(registry: kopf.OperatorRegistry, url: str) -> None:
    """Make the registry log in to `url`, registering the login handler only once per registry."""
    target = _login_targets.get(registry)
    if target is None:
        target = _login_targets[registry] = _LoginTarget()

        @kopf.on.login(registry=registry, id="kubefake-login")
        def login_to_kubefake(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(
                server=target.url, insecure=True, default_namespace="default"
            )

    target.url = url


@contextlib.asynccontextmanager
async def run_kopf(
    fake: KubeFake,
    registry: kopf.OperatorRegistry,
    *,
    namespaces: Collection[str] = (),
    settings: kopf.OperatorSettings | None = None,
    memo: Any = None,
    ready_timeout: float = 10.0,
    stop_timeout: float = 10.0,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run `registry`'s handlers in a kopf operator (standalone, no peering) talking to `fake`.

    Cluster-wide unless `namespaces` are given. Entered once kopf's startup handlers are done;
    on exit kopf is stopped via its stop flag, and a failure of the operator is re-raised.
    """
    _point_login_at(registry, fake.url)
    stop_flag = asyncio.Event()
    ready_flag = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings or fast_settings(),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=memo,
        ),
        name="kopf operator under test",
    )
    ready = asyncio.create_task(ready_flag.wait())
    try:
        await asyncio.wait({task, ready}, timeout=ready_timeout, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()  # re-raise why the operator ended before being ready
            raise RuntimeError("the kopf operator exited before it became ready")
        if not ready.done():
            raise TimeoutError(f"the kopf operator was not ready within {ready_timeout}s")
        yield task
    finally:
        ready.cancel()
        stop_flag.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), stop_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
