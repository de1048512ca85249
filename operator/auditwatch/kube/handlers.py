"""The kopf handlers: thin adapters that hand resources and Secrets to the KubeSource.

Create, update and resume of AuditStreams and AuditAlerts cache the resource and rebuild the
configuration; deletion is noticed on the watch (no finalizer: deleting an alert never waits for
the operator, and the operator lists everything afresh when it starts anyway). Secrets are not
watched at all (the source reads the referenced ones by name). Namespaces are watched for their
labels, which may decide what a stream grants the alerts in them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import kopf

from auditwatch.kube.api import GROUP, PLURALS, VERSION
from auditwatch.kube.source import KubeSource, resource_key

PREFIX = "auditwatch.dev"
"""Prefix of kopf's annotations on the resources, and of its finalizer name."""

RETRY_BACKOFF = 5.0
"""Seconds before kopf retries a handler that failed (an API error while reading a Secret)."""


WATCH_HANDLERS = ("deleted",)
"""Handlers kopf runs for every watch event of their kind (not per change to reconcile)."""


class QuietWatchHandlers(logging.Filter):
    """Drops kopf's "Handler 'deleted' succeeded." lines of the watch-event handlers: they run
    for every watch event of every resource, so the lines say nothing and flood the log. Their
    failures are still logged."""

    QUIET = frozenset(f"Handler {name!r} succeeded." for name in WATCH_HANDLERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.getMessage() not in self.QUIET


QUIET_WATCH_HANDLERS = QuietWatchHandlers()


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """kopf's bookkeeping in annotations under auditwatch.dev/: never in `.status`, whose
    schema holds only what auditwatch reports (a real apiserver would prune kopf's fields)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    logging.getLogger("kopf.objects").addFilter(QUIET_WATCH_HANDLERS)  # added once only
    return settings


class Handlers:
    """A kopf registry whose handlers feed `source`; `calls` counts them per resource."""

    def __init__(self, source: KubeSource) -> None:
        self.source = source
        self.registry = kopf.OperatorRegistry()
        self.calls: Counter[tuple[str, str, str]] = Counter()
        """(handler, kind, key) -> invocations: a create handler runs once per object."""
        # kopf's default login (in-cluster service account, else KUBECONFIG / ~/.kube/config):
        # a registry of one's own starts without login handlers.
        kopf.on.login(registry=self.registry, id="login")(kopf.login_via_client)
        for plural in PLURALS.values():
            self._register(plural)
        kopf.on.event("v1", "namespaces", registry=self.registry, id="namespace")(self.namespace)

    def _register(self, plural: str) -> None:
        for reason, decorator in (
            ("create", kopf.on.create),
            ("update", kopf.on.update),
            ("resume", kopf.on.resume),
        ):
            decorator(
                GROUP,
                VERSION,
                plural,
                registry=self.registry,
                id=reason,
                backoff=RETRY_BACKOFF,
                param=reason,
            )(self.changed)
        kopf.on.event(GROUP, VERSION, plural, registry=self.registry, id="deleted")(self.deleted)

    async def changed(self, body: kopf.Body, param: Any = None, **_: Any) -> None:
        kind, key = resource_key(body)
        self.calls[(param, kind, key)] += 1
        await self.source.upsert(body)

    async def deleted(self, event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if event["type"] == "DELETED":
            kind, key = resource_key(body)
            self.calls[("delete", kind, key)] += 1
            await self.source.delete(body)

    async def namespace(self, event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        await self.source.namespace_event(str(event["type"]), body)
