"""The fake apiserver's HTTP side: discovery, CRUD, watch-streams and a request log on 127.0.0.1.

Built on aiohttp.web rather than on kmock: kmock 0.8 parses every request path itself before
any handler runs, and that parser raises on `/api/v1/namespaces` and reads
`/api/v1/namespaces/{name}` as an empty namespace; its emulator also changes state before routing
and has none of the versioning kopf depends on. The routing here is small, and the semantics live
in `store.Store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp.web
import kopf
import yaml
from tests.kubefake import kopfrun
from tests.kubefake.store import (
    Body,
    KubeApiError,
    ResourceType,
    Store,
    WatchEvent,
)

RESOURCE_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
Handler = Callable[[aiohttp.web.Request], Awaitable[aiohttp.web.StreamResponse]]


@dataclasses.dataclass
class RecordedRequest:
    """One request as the fake received it, for assertions on what a client sent."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes
    status: int | None = None  # set once answered (for a watch: once its stream has ended)

    @property
    def json(self) -> Any:
        """The parsed body, or None if it was empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a resource URL points to."""

    resource: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


class KubeFake:
    """An in-process Kubernetes apiserver on a free 127.0.0.1 port; `async with` runs it."""

    def __init__(
        self,
        store: Store | None = None,
        *,
        bookmark_interval: float = 1.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.store = store or Store()
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # unexpected server-side failures (fake's bugs)
        self.bookmark_interval = bookmark_interval
        self._host = host
        self._port: int | None = None
        self._closing = False
        self._runner: aiohttp.web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the fake apiserver is not running")
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        app = aiohttp.web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = aiohttp.web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self._host, 0))
        self._port = sock.getsockname()[1]
        await aiohttp.web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """End every open watch-stream, then stop listening."""
        self._closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- helpers for tests ----------------------------------------------------------------------

    def requests_matching(
        self, method: str | None = None, path: str | re.Pattern[str] | None = None
    ) -> list[RecordedRequest]:
        """Recorded requests by method and by exact path or a regex searched in the path."""
        return [
            request
            for request in self.requests
            if (method is None or request.method == method.upper())
            and (
                path is None
                or (request.path == path if isinstance(path, str) else path.search(request.path))
            )
        ]

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig pointing at this fake, for clients that read KUBECONFIG."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubefake", "cluster": {"server": self.url}}],
            "users": [{"name": "kubefake", "user": {"token": "kubefake"}}],
            "contexts": [
                {
                    "name": "kubefake",
                    "context": {"cluster": "kubefake", "user": "kubefake", "namespace": namespace},
                }
            ],
            "current-context": "kubefake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def run_kopf(
        self,
        registry: kopf.OperatorRegistry,
        *,
        namespaces: Collection[str] = (),
        settings: kopf.OperatorSettings | None = None,
        memo: Any = None,
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Task[None]]:
        """A kopf operator with `registry`'s handlers, logged in to this fake (see kopfrun)."""
        return kopfrun.run_kopf(self, registry, namespaces=namespaces, settings=settings, memo=memo)

    # --- request plumbing -----------------------------------------------------------------------

    @aiohttp.web.middleware
    async def _middleware(
        self, request: aiohttp.web.Request, handler: Handler
    ) -> aiohttp.web.StreamResponse:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            content_type=request.content_type,
            body=await request.read(),
        )
        self.requests.append(record)
        try:
            response = await handler(request)
        except KubeApiError as exc:
            response = aiohttp.web.json_response(exc.status(), status=exc.code)
        except Exception as exc:  # a bug in the fake: answer like the apiserver, keep it for tests
            self.errors.append(exc)
            failure = KubeApiError(500, "InternalError", f"kubefake failed: {exc!r}")
            response = aiohttp.web.json_response(failure.status(), status=500)
        record.status = response.status
        return response

    async def _dispatch(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        parts = [part for part in request.path.split("/") if part]
        if request.method == "GET":
            discovery = self._discovery(parts)
            if discovery is not None:
                return aiohttp.web.json_response(discovery)
        target, collection = self._parse_resource_path(parts)
        return await self._serve(request, target, collection)

    def _parse_resource_path(self, parts: list[str]) -> tuple[_Target, bool]:
        """Split /api/v1/... or /apis/{group}/{version}/... into resource, namespace, name."""
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise KubeApiError(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        namespace_object = group == "" and rest[0] == "namespaces"
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (namespace_object and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise KubeApiError(404, "NotFound", "the server could not find the requested resource")
        resource = self.store.find(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        return _Target(resource, namespace, name, subresource), name is None

    async def _serve(
        self, request: aiohttp.web.Request, target: _Target, collection: bool
    ) -> aiohttp.web.StreamResponse:
        for selector in ("labelSelector", "fieldSelector"):
            if request.query.get(selector):
                raise KubeApiError(400, "BadRequest", f"kubefake does not implement {selector}")
        store, resource, namespace = self.store, target.resource, target.namespace
        if collection and request.method == "GET":
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, namespace)
            return aiohttp.web.json_response(
                {
                    "apiVersion": resource.api_version,
                    "kind": f"{resource.kind}List",
                    "metadata": {"resourceVersion": str(store.resource_version)},
                    "items": store.list_objects(resource, namespace),
                }
            )
        if collection and request.method == "POST":
            created = store.create(resource, await _json_body(request), namespace)
            return aiohttp.web.json_response(created, status=201)
        if collection or target.name is None:
            raise KubeApiError(405, "MethodNotAllowed", f"{request.method} on a collection")
        name, subresource = target.name, target.subresource
        if request.method == "GET":
            return aiohttp.web.json_response(store.get(resource, name, namespace))
        if request.method == "PUT":
            body = await _json_body(request)
            replaced = store.replace(resource, name, body, namespace, subresource=subresource)
            return aiohttp.web.json_response(replaced)
        if request.method == "PATCH":
            patched = store.patch(
                resource,
                name,
                await _json_body(request),
                namespace,
                content_type=request.content_type,
                subresource=subresource,
            )
            return aiohttp.web.json_response(patched)
        if request.method == "DELETE" and subresource is None:
            return aiohttp.web.json_response(store.delete(resource, name, namespace))
        raise KubeApiError(405, "MethodNotAllowed", f"{request.method} {request.path}")

    # --- watching -------------------------------------------------------------------------------

    async def _watch(
        self, request: aiohttp.web.Request, resource: ResourceType, namespace: str | None
    ) -> aiohttp.web.StreamResponse:
        """Stream changes after ?resourceVersion, or the current objects first if none is given."""
        query = request.query
        timeout = _float_param(query, "timeoutSeconds")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        since = query.get("resourceVersion", "")
        initial_events = query.get("sendInitialEvents") == "true" or since in ("", "0")
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        queue = self.store.subscribe()
        try:
            # No await between subscribing and reading the past: no change can fall in between.
            backlog: list[Body] = []
            expired: KubeApiError | None = None
            if initial_events:
                objects = self.store.list_objects(resource, namespace)
                backlog = [{"type": "ADDED", "object": obj} for obj in objects]
            else:
                try:
                    past = self.store.history_since(_int_param(since, "resourceVersion"))
                    backlog = [
                        self.store.render_event(resource, event)
                        for event in past
                        if _belongs(event, resource, namespace)
                    ]
                except KubeApiError as exc:
                    if exc.code != 410:
                        raise
                    expired = exc
            seen_rv = self.store.resource_version
            await response.prepare(request)
            if expired is not None:  # the apiserver answers 200 with an ERROR event, then closes
                await _send(response, {"type": "ERROR", "object": expired.status()})
                return response
            for line in backlog:
                await _send(response, line)
            if initial_events and query.get("sendInitialEvents") == "true":
                await _send(response, self._bookmark(resource, initial_events_end=True))
            await self._stream_live(
                request, response, queue, resource, namespace, timeout, bookmarks, seen_rv
            )
            return response
        except ConnectionError:  # the client went away mid-stream; nothing more to send
            return response
        finally:
            self.store.unsubscribe(queue)

    async def _stream_live(
        self,
        request: aiohttp.web.Request,
        response: aiohttp.web.StreamResponse,
        queue: asyncio.Queue[WatchEvent],
        resource: ResourceType,
        namespace: str | None,
        timeout: float | None,
        bookmarks: bool,
        seen_rv: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        while not self._closing and request.transport is not None:
            if request.transport.is_closing():
                return
            now = loop.time()
            if deadline is not None and now >= deadline:
                if bookmarks:  # as the apiserver: tell where to resume before closing
                    await _send(response, self._bookmark(resource))
                return
            if bookmarks and now >= next_bookmark:
                await _send(response, self._bookmark(resource))
                next_bookmark = now + self.bookmark_interval
            tick = min(0.2, *(t - now for t in (deadline, next_bookmark) if t is not None))
            try:
                event = await asyncio.wait_for(queue.get(), timeout=max(tick, 0.0))
            except TimeoutError:
                continue
            if event.resource_version > seen_rv and _belongs(event, resource, namespace):
                await _send(response, self.store.render_event(resource, event))

    def _bookmark(self, resource: ResourceType, *, initial_events_end: bool = False) -> Body:
        metadata: Body = {"resourceVersion": str(self.store.resource_version)}
        if initial_events_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": resource.api_version,
                "kind": resource.kind,
                "metadata": metadata,
            },
        }

    # --- discovery ------------------------------------------------------------------------------

    def _discovery(self, parts: list[str]) -> Body | None:
        """The discovery documents, or None when the path is not a discovery path."""
        resources = self.store.resources
        if parts == ["version"]:
            return {
                "major": "1",
                "minor": "30",
                "gitVersion": "v1.30.0-kubefake",
                "platform": "linux/amd64",
            }
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["api", "v1"]:
            return _resource_list("v1", [r for r in resources if r.group == ""])
        groups: dict[str, list[str]] = {}
        for resource in resources:
            if resource.group and resource.version not in groups.setdefault(resource.group, []):
                groups[resource.group].append(resource.version)
        if parts == ["apis"]:
            return {
                "apiVersion": "v1",
                "kind": "APIGroupList",
                "groups": [_group(name, versions) for name, versions in groups.items()],
            }
        if len(parts) == 2 and parts[0] == "apis":
            if parts[1] not in groups:
                raise KubeApiError(404, "NotFound", f"no API group {parts[1]!r}")
            return {"apiVersion": "v1", "kind": "APIGroup", **_group(parts[1], groups[parts[1]])}
        if len(parts) == 3 and parts[0] == "apis":
            served = [r for r in resources if (r.group, r.version) == (parts[1], parts[2])]
            if not served:
                raise KubeApiError(404, "NotFound", f"no API version {parts[1]}/{parts[2]}")
            return _resource_list(f"{parts[1]}/{parts[2]}", served)
        return None


def _group(name: str, versions: list[str]) -> Body:
    entries = [{"groupVersion": f"{name}/{version}", "version": version} for version in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def _resource_list(group_version: str, resources: list[ResourceType]) -> Body:
    entries: list[Body] = []
    for resource in resources:
        entry: Body = {
            "name": resource.plural,
            "singularName": resource.singular,
            "namespaced": resource.namespaced,
            "kind": resource.kind,
            "verbs": RESOURCE_VERBS,
        }
        if resource.short_names:
            entry["shortNames"] = list(resource.short_names)
        if resource.categories:
            entry["categories"] = list(resource.categories)
        entries.append(entry)
        if resource.status_subresource:
            entries.append(
                {
                    "name": f"{resource.plural}/status",
                    "singularName": "",
                    "namespaced": resource.namespaced,
                    "kind": resource.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "apiVersion": "v1",
        "kind": "APIResourceList",
        "groupVersion": group_version,
        "resources": entries,
    }


def _belongs(event: WatchEvent, resource: ResourceType, namespace: str | None) -> bool:
    return event.storage_key == resource.storage_key and (
        namespace is None or event.namespace == namespace
    )


async def _send(response: aiohttp.web.StreamResponse, line: Body) -> None:
    await response.write(json.dumps(line).encode() + b"\n")


async def _json_body(request: aiohttp.web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError as exc:
        raise KubeApiError(400, "BadRequest", f"the request body is not JSON: {exc}") from exc


def _int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise KubeApiError(400, "BadRequest", f"{name} must be an integer: {value!r}") from None


def _float_param(query: Any, name: str) -> float | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise KubeApiError(400, "BadRequest", f"{name} must be a number: {value!r}") from None
