"""The Kubernetes configuration source: cached resource dicts -> the engine's configuration.

kopf (or a test) hands this cache every AuditStream / AuditAlert as it is created, changed or
deleted. After each change the whole configuration is built again
with `config.build`, exactly as standalone mode builds it from files, and handed to `apply`; a
resource whose body and Secrets did not change is not rebuilt (its spec is memoised), so a
rebuild costs little even with many alerts.

Secrets are never listed or watched (that would read every Secret of the cluster, and needs RBAC
to match): building a resource records which Secrets it looks up, those are read by name (GET),
and `follow_secrets` reads the referenced ones again every so often to notice a rotation, a
deletion or a creation. docs/operator.md says why this and not a watch per Secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from auditwatch.config.build import (
    DEFAULT_NAMESPACE,
    SecretMissing,
    build_alert,
    build_stream,
    invalid_alert,
)
from auditwatch.config.model import AlertSpec, ConfigError, InvalidAlert, StreamSpec
from auditwatch.config.schema import KINDS
from auditwatch.kube.aio import pause

logger = logging.getLogger(__name__)

SecretKey = tuple[str, str]
"""(namespace, name) of a Secret."""

SecretFetch = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
"""Reads a Secret from the API: (namespace, name) -> its body, or None when it does not exist."""

MAX_FETCH_ROUNDS = 8
"""A resource names its Secrets one after another (the first missing one stops the build), so
resolving takes a few rounds; a Secret that stays missing is cached as missing and ends them."""


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (kopf hands out read-only Mapping views)."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def secret_values(secret: Mapping[str, Any]) -> dict[str, str]:
    """A v1 Secret's `data` decoded (base64 of UTF-8); undecodable keys are left out, logged."""
    values: dict[str, str] = {}
    metadata = secret.get("metadata") or {}
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[str(key)] = base64.b64decode(str(encoded), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            logger.warning(
                "Secret %s/%s: key %r is not base64 of UTF-8 text; ignored",
                metadata.get("namespace"),
                metadata.get("name"),
                key,
            )
    values.update({str(k): str(v) for k, v in (secret.get("stringData") or {}).items()})
    return values


def resource_key(resource: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, key): a stream's key is its name, an alert's `namespace/name` (as AlertSpec.key)."""
    kind = resource.get("kind")
    metadata = resource.get("metadata") or {}
    name = metadata.get("name")
    if kind not in KINDS or not isinstance(name, str):
        raise ValueError(f"not an AuditStream or AuditAlert with a name: {kind!r} {name!r}")
    if kind == "AuditStream":
        return kind, name
    return kind, f"{metadata.get('namespace') or DEFAULT_NAMESPACE}/{name}"


def essence(resource: Mapping[str, Any]) -> dict[str, Any]:
    """What `config.build` reads of a resource: other changes (status, resourceVersion,
    annotations) need no rebuild."""
    metadata = resource.get("metadata") or {}
    essential = {
        key: plain(resource[key]) for key in ("apiVersion", "kind", "spec") if key in resource
    }
    essential["metadata"] = {
        key: plain(metadata[key]) for key in ("name", "namespace", "generation") if key in metadata
    }
    return essential


@dataclass(frozen=True)
class Observed:
    """A resource's identity and status as the API last showed them."""

    uid: str
    status: dict[str, Any]


@dataclass(frozen=True)
class KubeConfig:
    """What the cached resources define, ready for `Engine.apply`, and what is wrong with it."""

    streams: dict[str, StreamSpec]
    alerts: dict[str, AlertSpec]
    invalid_alerts: dict[str, InvalidAlert]
    invalid_streams: dict[str, ConfigError]
    """AuditStreams that cannot receive (a missing Secret, say), by name."""
    unknown_secrets: frozenset[SecretKey]
    """Secrets some resource looked up that were never fetched: resolve them and build again."""
    namespace_labels: dict[str, dict[str, str]]
    """Every namespace's labels, for streams that admit alerts by namespace selector."""
    created: dict[str, datetime]
    """metadata.creationTimestamp of the streams (by name) and alerts (by key)."""

    @property
    def problems(self) -> list[str]:
        """One line per unusable stream, for the engine's status."""
        return [
            f"AuditStream/{name}: {error.reason}: {error.message}"
            for name, error in sorted(self.invalid_streams.items())
        ]


@dataclass
class _Built:
    """A resource's last build: its body, the Secrets it read, and the spec or the error."""

    body: dict[str, Any]
    secrets: frozenset[SecretKey]
    spec: StreamSpec | AlertSpec | None
    error: ConfigError | None


class ResourceCache:
    """AuditStream / AuditAlert bodies and the Secrets they reference; builds the configuration."""

    def __init__(self, default_namespace: str) -> None:
        self.default_namespace = default_namespace
        """Where a stream's Secret lives when its secretRef names no namespace."""
        self._bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self._secrets: dict[SecretKey, dict[str, str] | None] = {}
        """Fetched Secrets' values; None = known not to exist (kept, so its creation is seen)."""
        self._built: dict[tuple[str, str], _Built] = {}
        self.referenced: frozenset[SecretKey] = frozenset()
        """The Secrets the last `build` looked up."""
        self.observed: dict[tuple[str, str], Observed] = {}
        """Each resource's uid and status as last received, for the status writer."""
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.created: dict[str, datetime] = {}
        """Streams' (by name) and alerts' (by key) metadata.creationTimestamp."""

    def put(self, resource: Mapping[str, Any]) -> bool:
        """Cache a created / changed / resumed resource; True if its meaning may have changed."""
        kind_key = resource_key(resource)
        metadata = resource.get("metadata") or {}
        self.observed[kind_key] = Observed(
            str(metadata.get("uid") or ""), plain(resource.get("status") or {})
        )
        with contextlib.suppress(KeyError, TypeError, ValueError):
            self.created[kind_key[1]] = datetime.fromisoformat(
                str(metadata["creationTimestamp"]).replace("Z", "+00:00")
            )
        body = essence(resource)
        if self._bodies.get(kind_key) == body:
            return False
        self._bodies[kind_key] = body
        self._built.pop(kind_key, None)
        return True

    def remove(self, resource: Mapping[str, Any]) -> bool:
        """Forget a deleted resource; True if it was cached."""
        kind_key = resource_key(resource)
        self._built.pop(kind_key, None)
        self.observed.pop(kind_key, None)
        self.created.pop(kind_key[1], None)
        return self._bodies.pop(kind_key, None) is not None

    def bodies(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(kind, key, essence) of every cached resource."""
        for (kind, key), body in sorted(self._bodies.items()):
            yield kind, key, body

    def body(self, kind: str, key: str) -> dict[str, Any] | None:
        return self._bodies.get((kind, key))

    def set_secret(self, namespace: str, name: str, secret: Mapping[str, Any] | None) -> bool:
        """Record a Secret's current content (None: it does not exist).

        Only Secrets some resource looked up are kept; True if a kept one changed, and the
        resources that read it are built again on the next `build`.
        """
        secret_key = (namespace, name)
        if secret_key not in self.referenced:
            return False
        values = None if secret is None else secret_values(secret)
        if secret_key in self._secrets and self._secrets[secret_key] == values:
            return False
        self._secrets[secret_key] = values
        for kind_key, built in list(self._built.items()):
            if secret_key in built.secrets:
                del self._built[kind_key]
        return True

    def set_namespace(self, name: str, labels: Mapping[str, str] | None) -> bool:
        """Record a namespace's labels (None: it is gone); True if they changed."""
        before = self.namespace_labels.get(name)
        if labels is None:
            self.namespace_labels.pop(name, None)
        else:
            self.namespace_labels[name] = {str(k): str(v) for k, v in labels.items()}
        return self.namespace_labels.get(name) != before

    def build(self) -> KubeConfig:
        """The configuration of every cached resource (memoised per resource)."""
        unknown: set[SecretKey] = set()
        streams: dict[str, StreamSpec] = {}
        alerts: dict[str, AlertSpec] = {}
        invalid_alerts: dict[str, InvalidAlert] = {}
        invalid_streams: dict[str, ConfigError] = {}
        for kind_key, body in sorted(self._bodies.items()):
            built = self._built.get(kind_key)
            if built is None:
                built = self._build_one(kind_key[0], body)
                self._built[kind_key] = built
            unknown |= {key for key in built.secrets if key not in self._secrets}
            kind, key = kind_key
            if isinstance(built.spec, StreamSpec):
                streams[key] = built.spec
            elif isinstance(built.spec, AlertSpec):
                alerts[key] = built.spec
            elif built.error is not None and kind == "AuditStream":
                invalid_streams[key] = built.error
            elif built.error is not None:
                invalid_alerts[key] = invalid_alert(body, built.error)
        self.referenced = frozenset().union(*(built.secrets for built in self._built.values()))
        self._secrets = {
            key: value for key, value in self._secrets.items() if key in self.referenced
        }
        return KubeConfig(
            streams,
            alerts,
            invalid_alerts,
            invalid_streams,
            frozenset(unknown),
            dict(self.namespace_labels),
            dict(self.created),
        )

    def _build_one(self, kind: str, body: dict[str, Any]) -> _Built:
        used: set[SecretKey] = set()

        def lookup(namespace: str | None, name: str, key: str) -> str | None:
            secret_key = (namespace or self.default_namespace, name)
            used.add(secret_key)
            values = self._secrets.get(secret_key)
            if values is None or key not in values:
                note = "" if namespace else " (the operator's namespace: the reference names none)"
                raise SecretMissing.of(*secret_key, key, values, note)
            return values[key]

        try:
            spec: StreamSpec | AlertSpec = (
                build_stream(body, lookup, self.default_namespace)
                if kind == "AuditStream"
                else build_alert(body, lookup)
            )
        except ConfigError as error:
            return _Built(body, frozenset(used), None, error)
        return _Built(body, frozenset(used), spec, None)


class KubeSource:
    """The cache plus the async side: fetch what resources reference, apply every change.

    Changes are serialised by a lock, so `apply` sees configurations in the order of the
    changes, and a Secret fetched for one change is there for the next.
    """

    def __init__(
        self,
        default_namespace: str,
        fetch_secret: SecretFetch,
        apply: Callable[[KubeConfig], None],
    ) -> None:
        self.cache = ResourceCache(default_namespace)
        self._fetch_secret = fetch_secret
        self._apply = apply
        self._lock = asyncio.Lock()
        self.config: KubeConfig | None = None
        """The configuration last applied (None before the first)."""

    async def load(self, resources: list[Mapping[str, Any]]) -> KubeConfig:
        """The initial listing: cache all, then build and apply once."""
        async with self._lock:
            for resource in resources:
                self._put_or_remove(resource)
            return await self._refresh()

    async def upsert(self, resource: Mapping[str, Any]) -> KubeConfig:
        """A resource was created, changed or resumed (or is being deleted: then removed)."""
        async with self._lock:
            changed = self._put_or_remove(resource)
            if changed or self.config is None:
                return await self._refresh()
            return self.config

    async def delete(self, resource: Mapping[str, Any]) -> KubeConfig:
        """A resource is gone: its alert stops matching with this apply."""
        async with self._lock:
            if self.cache.remove(resource) or self.config is None:
                return await self._refresh()
            return self.config

    async def reread_secrets(self) -> int:
        """Read every referenced Secret again (by name); resources reading one that changed
        (rotated, deleted, created) are rebuilt and applied. The number that changed."""
        changed = 0
        for namespace, name in sorted(self.cache.referenced):
            try:
                secret = await self._fetch_secret(namespace, name)
            except Exception as error:  # the apiserver is away: keep what is known, retry later
                logger.warning("Secret %s/%s not read again: %s", namespace, name, error)
                continue
            async with self._lock:
                if self.cache.set_secret(namespace, name, secret):
                    logger.info("Secret %s/%s changed: rebuilding what reads it", namespace, name)
                    changed += 1
                    await self._refresh()
        return changed

    async def follow_secrets(self, stop: asyncio.Event, interval: float) -> None:
        """`reread_secrets` every `interval` seconds until `stop`."""
        while not await pause(stop, interval):
            await self.reread_secrets()

    async def namespace_event(self, event_type: str, namespace: Mapping[str, Any]) -> None:
        """A watch event of a Namespace: its labels may change which alerts a stream admits."""
        metadata = namespace.get("metadata") or {}
        name = metadata.get("name")
        if not isinstance(name, str):
            return
        labels = None if event_type == "DELETED" else (metadata.get("labels") or {})
        async with self._lock:
            if self.cache.set_namespace(name, labels):
                await self._refresh()

    def _put_or_remove(self, resource: Mapping[str, Any]) -> bool:
        if (resource.get("metadata") or {}).get("deletionTimestamp"):
            return self.cache.remove(resource)
        return self.cache.put(resource)

    async def _refresh(self) -> KubeConfig:
        config = self.cache.build()
        for _ in range(MAX_FETCH_ROUNDS):
            if not config.unknown_secrets:
                break
            for namespace, name in sorted(config.unknown_secrets):
                secret = await self._fetch_secret(namespace, name)
                self.cache.set_secret(namespace, name, secret)
            config = self.cache.build()
        self.config = config
        self._apply(config)
        return config
