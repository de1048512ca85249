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
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from auditwatch.config.files import ConfigSet, DirectorySource
from auditwatch.config.model import StreamSpec
from auditwatch.engine import Engine
from auditwatch.notify import Notifier
from auditwatch.notify.egress import EgressPolicy
from auditwatch.receive import Receiver, ReceiverOptions
from auditwatch.tls import ServerTLS

logger = logging.getLogger(__name__)


def trust_stream_clients(tls: ServerTLS | None, streams: Mapping[str, StreamSpec]) -> None:
    """Let the TLS layer accept the client certificates of streams that authenticate by them."""
    if tls is not None:
        tls.trust_clients(
            s.auth.client_certificate
            for s in streams.values()
            if s.auth is not None and s.auth.client_certificate is not None
        )


def apply_config_set(engine: Engine, config: ConfigSet, tls: ServerTLS | None = None) -> None:
    """Put what a resources directory defines in force; log what is wrong with it."""
    for error in config.errors:
        logger.error("%s", error)
    problems = [str(error) for error in config.errors]
    trust_stream_clients(tls, config.streams)
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
    tls: ServerTLS | None = None,
) -> web.AppRunner:
    """The receiver listening on host:port (port 0: any free port; see runner.addresses),
    over HTTPS with `tls`."""
    runner = Receiver(engine, decode_workers=decode_workers, options=options).runner()
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=None if tls is None else tls.context).start()
    return runner


async def follow(
    source: DirectorySource, engine: Engine, stop: asyncio.Event, tls: ServerTLS | None = None
) -> None:
    """Apply every new configuration the directory yields until `stop`."""
    async for config in source.watch(stop_event=stop):
        apply_config_set(engine, config, tls)


async def serve(
    resources: Path,
    data: Path,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    decode_workers: int = 0,
    options: ReceiverOptions | None = None,
    tls: ServerTLS | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    egress: EgressPolicy | None = None,
) -> None:
    """Run until SIGTERM / SIGINT (or `stop`), then drain deliveries and flush storage.

    `decode_workers` > 0 decodes request bodies in that many worker processes (see
    `receive.Decoder`); 0 decodes in threads of this process. `egress`: where notifications may
    go (default: `EgressPolicy()`). With `tls`, HTTPS (its files
    followed for rotation).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    source = DirectorySource(resources)
    engine = Engine(data, notifier=Notifier(egress=egress))
    try:
        apply_config_set(engine, source.reload(), tls)
        runner = await start_receiver(
            engine, host, port, decode_workers=decode_workers, options=options, tls=tls
        )
    except BaseException:
        await engine.close()
        raise
    scheme = "http" if tls is None else "https"
    logger.info("receiving on %s://%s:%d, data in %s", scheme, host, port, data)
    tasks = [
        asyncio.create_task(engine.run(stop), name="engine"),
        asyncio.create_task(follow(source, engine, stop, tls), name="config"),
    ]
    if tls is not None:
        tasks.append(asyncio.create_task(tls.follow(stop), name="tls"))
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
