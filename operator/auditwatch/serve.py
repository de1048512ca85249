"""Standalone mode: `auditwatch serve --resources DIR`, no cluster needed.

The resources directory plays the apiserver's part: its AuditStream / AuditAlert / Secret YAML
is read at start and followed while running, and every change is applied to the engine without
a restart and without dropping events (the receiver keeps serving throughout).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from pathlib import Path

from aiohttp import web

from auditwatch.config.files import ConfigSet, DirectorySource
from auditwatch.engine import Engine
from auditwatch.notify import Notifier
from auditwatch.notify.egress import EgressPolicy
from auditwatch.receive import Receiver, ReceiverOptions

logger = logging.getLogger(__name__)


def apply_config_set(engine: Engine, config: ConfigSet) -> None:
    """Put what a resources directory defines in force; log what is wrong with it."""
    for error in config.errors:
        logger.error("%s", error)
    problems = [str(error) for error in config.errors]
    engine.apply(
        config.streams, config.alerts, config.invalid_alerts, problems, config.namespace_labels
    )
    logger.info(
        "configuration: %d stream(s), %d alert(s), %d invalid, %d problem(s)",
        len(config.streams),
        len(config.alerts),
        len(config.invalid_alerts),
        len(config.errors),
    )


async def start_receiver(
    engine: Engine,
    host: str,
    port: int,
    *,
    decode_workers: int = 0,
    options: ReceiverOptions | None = None,
) -> web.AppRunner:
    """The receiver listening on host:port (port 0: any free port; see runner.addresses)."""
    runner = Receiver(engine, decode_workers=decode_workers, options=options).runner()
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def follow(source: DirectorySource, engine: Engine, stop: asyncio.Event) -> None:
    """Apply every new configuration the directory yields until `stop`."""
    async for config in source.watch(stop_event=stop):
        apply_config_set(engine, config)


async def serve(
    resources: Path,
    data: Path,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    decode_workers: int = 0,
    options: ReceiverOptions | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    egress: EgressPolicy | None = None,
) -> None:
    """Run until SIGTERM / SIGINT (or `stop`), then drain deliveries and flush storage.

    `decode_workers` > 0 decodes request bodies in that many worker processes (see
    `receive.Decoder`); 0 decodes in threads of this process. `egress`: where notifications may
    go (default: `EgressPolicy()`).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    source = DirectorySource(resources)
    engine = Engine(data, notifier=Notifier(egress=egress))
    try:
        apply_config_set(engine, source.reload())
        runner = await start_receiver(
            engine, host, port, decode_workers=decode_workers, options=options
        )
    except BaseException:
        await engine.close()
        raise
    logger.info("receiving on http://%s:%d, data in %s", host, port, data)
    tasks = [
        asyncio.create_task(engine.run(stop), name="engine"),
        asyncio.create_task(follow(source, engine, stop), name="config"),
    ]
    gc.freeze()  # start-up objects (config, modules) need no more scans by the cycle collector
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
