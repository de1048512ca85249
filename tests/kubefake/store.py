"""The in-memory object store behind the fake apiserver, with the semantics kopf relies on.

One global resourceVersion counter bumped by every write, uid / generation / creationTimestamp,
generateName, status-subresource rules, finalizer-aware deletion, a bounded history of changes
for watches (older resourceVersions answer 410 Gone), and custom resource kinds derived from
CustomResourceDefinition objects stored like any other object. No HTTP here: the server module
translates requests into these calls, and tests may call them directly.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import random
import string
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tests.kubefake.patching import PatchError, json_patch, merge_patch

Body = dict[str, Any]
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
CRD_GROUP = "apiextensions.k8s.io"


class KubeApiError(Exception):
    """An apiserver failure; rendered as a `kind: Status` answer with this HTTP code."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Body:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
        }


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """A served resource kind as discovery describes it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    tracks_generation: bool = True  # custom resources do; Secrets, Events, Namespaces do not

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        """Objects are shared by all versions of a kind, as in a real cluster."""
        return (self.group, self.plural)


BUILTIN_RESOURCES = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        singular="namespace",
        short_names=("ns",),
        status_subresource=True,
        tracks_generation=False,
    ),
    ResourceType(
        "",
        "v1",
        "events",
        "Event",
        namespaced=True,
        singular="event",
        short_names=("ev",),
        tracks_generation=False,
    ),
    ResourceType(
        "", "v1", "secrets", "Secret", namespaced=True, singular="secret", tracks_generation=False
    ),
    ResourceType(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        namespaced=True,
        singular="lease",
        tracks_generation=False,
    ),
    ResourceType(
        CRD_GROUP,
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        singular="customresourcedefinition",
        short_names=("crd",),
        status_subresource=True,
    ),
)

# Metadata the server owns: a client's copy of these is overwritten by the stored one.
_SERVER_METADATA = (
    "uid",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One change as a watch-stream sends it, plus where it belongs for filtering."""

    resource_version: int
    storage_key: tuple[str, str]
    namespace: str | None
    type: str  # ADDED, MODIFIED, DELETED
    object: Body


ObjectKey = tuple[str, str, str | None, str]  # group, plural, namespace, name


class Store:
    """All objects of the fake cluster, the change history, and the live watch subscribers."""

    def __init__(self, *, history_limit: int = 10_000) -> None:
        self._history_limit = history_limit
        self._resource_version = 0
        self._compacted_rv = 0  # watches from an RV below this have lost events: 410 Gone
        self._builtin = list(BUILTIN_RESOURCES)
        self._resources: list[ResourceType] = list(self._builtin)
        self._objects: dict[ObjectKey, Body] = {}
        self._history: list[WatchEvent] = []
        self._subscribers: set[asyncio.Queue[WatchEvent]] = set()
        self._changed = asyncio.Event()
        for namespace in ("default", "kube-system"):  # as in every real cluster
            self.create("namespaces", {"metadata": {"name": namespace}})

    # --- resource kinds -------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._resource_version

    @property
    def resources(self) -> list[ResourceType]:
        return list(self._resources)

    def register(self, resource: ResourceType) -> None:
        """Serve an extra built-in kind (one that no CRD describes, e.g. configmaps)."""
        self._builtin.append(resource)
        self._rebuild_resources()

    def find(self, group: str, version: str, plural: str) -> ResourceType:
        for resource in self._resources:
            if (resource.group, resource.version, resource.plural) == (group, version, plural):
                return resource
        where = f"{group}/{version}" if group else version
        raise KubeApiError(
            404, "NotFound", f"the server could not find the resource {where}/{plural}"
        )

    def resource(self, ref: str | ResourceType) -> ResourceType:
        """Resolve "plural", "plural.group", "kind" or "group/version/plural" for test helpers."""
        if isinstance(ref, ResourceType):
            return ref
        if ref.count("/") == 2:
            group, version, plural = ref.split("/")
            return self.find(group, version, plural)
        for resource in self._resources:
            names = {resource.plural, resource.kind, resource.singular, *resource.short_names}
            qualified = {f"{name}.{resource.group}" for name in names}
            if ref in names or ref in qualified:
                return resource
        raise KeyError(f"no served resource matches {ref!r}")

    def _rebuild_resources(self) -> None:
        derived: list[ResourceType] = []
        for key, crd in self._objects.items():
            if key[:2] == (CRD_GROUP, "customresourcedefinitions"):
                derived.extend(resources_of_crd(crd))
        self._resources = [*self._builtin, *derived]

    # --- reading --------------------------------------------------------------------------------

    def get(self, ref: str | ResourceType, name: str, namespace: str | None = None) -> Body:
        resource = self.resource(ref)
        key = self._key(resource, namespace, name)
        if key not in self._objects:
            raise KubeApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        return self._render(resource, self._objects[key])

    def list_objects(self, ref: str | ResourceType, namespace: str | None = None) -> list[Body]:
        """Objects sorted by namespace and name; all namespaces when `namespace` is None."""
        resource = self.resource(ref)
        keys = sorted(
            (key for key in self._objects if key[:2] == resource.storage_key),
            key=lambda key: (key[2] or "", key[3]),
        )
        return [
            self._render(resource, self._objects[key])
            for key in keys
            if namespace is None or key[2] == namespace
        ]

    def exists(self, ref: str | ResourceType, name: str, namespace: str | None = None) -> bool:
        return self._key(self.resource(ref), namespace, name) in self._objects

    # --- writing --------------------------------------------------------------------------------

    def create(self, ref: str | ResourceType, body: Body, namespace: str | None = None) -> Body:
        resource = self.resource(ref)
        if not isinstance(body, dict):
            raise KubeApiError(400, "BadRequest", "the object must be a JSON object")
        self._check_kind(resource, body)
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise KubeApiError(400, "BadRequest", "metadata must be an object")
        namespace = self._namespace_for_create(resource, metadata, namespace)
        name = metadata.get("name") or self._generated_name(resource, namespace, metadata)
        key = self._key(resource, namespace, name)
        if key in self._objects:
            raise KubeApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        for field in (*_SERVER_METADATA, "namespace"):
            metadata.pop(field, None)
        metadata["name"] = name
        if namespace is not None:
            metadata["namespace"] = namespace
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        if resource.tracks_generation:
            metadata["generation"] = 1
        if resource.status_subresource:
            obj.pop("status", None)
        if resource.storage_key == (CRD_GROUP, "customresourcedefinitions"):
            resources_of_crd(obj)  # reject a malformed CRD before storing it
            obj["status"] = _crd_status(obj)
        self._write(resource, key, obj, "ADDED")
        return self._render(resource, obj)

    def replace(
        self,
        ref: str | ResourceType,
        name: str,
        body: Body,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> Body:
        """PUT: the whole object (or its status) replaced, with the resourceVersion precondition."""
        resource = self.resource(ref)
        if not isinstance(body, dict):
            raise KubeApiError(400, "BadRequest", "the object must be a JSON object")
        self._check_kind(resource, body)
        return self._update(
            resource, namespace, name, lambda _old: copy.deepcopy(body), subresource
        )

    def patch(
        self,
        ref: str | ResourceType,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
    ) -> Body:
        resource = self.resource(ref)
        if content_type == MERGE_PATCH:
            if not isinstance(patch, dict):
                raise KubeApiError(400, "BadRequest", "a merge-patch must be a JSON object")

            def mutate(old: Body) -> Body:
                patched = merge_patch(old, patch)
                assert isinstance(patched, dict)  # a dict patch over a dict stays a dict
                return patched

        elif content_type == JSON_PATCH:

            def mutate(old: Body) -> Body:
                try:
                    patched = json_patch(old, patch)
                except PatchError as exc:
                    reason = "Invalid" if exc.code == 422 else "BadRequest"
                    raise KubeApiError(exc.code, reason, exc.message) from exc
                if not isinstance(patched, dict):
                    raise KubeApiError(422, "Invalid", "the patched object is not a JSON object")
                return patched

        else:
            raise KubeApiError(
                415,
                "UnsupportedMediaType",
                f"the fake apiserver supports {MERGE_PATCH} and {JSON_PATCH}, not {content_type!r}",
            )
        return self._update(resource, namespace, name, mutate, subresource)

    def delete(self, ref: str | ResourceType, name: str, namespace: str | None = None) -> Body:
        """Mark for deletion while finalizers remain; remove the object once they are gone."""
        resource = self.resource(ref)
        key = self._key(resource, namespace, name)
        old = self._objects.get(key)
        if old is None:
            raise KubeApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return self._render(resource, old)  # already marked: nothing changes
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            self._write(resource, key, new, "MODIFIED")
            return self._render(resource, new)
        return self._remove(resource, key, old)

    def add_crd(self, crd: Body) -> Body:
        """Create a CustomResourceDefinition, which makes its kinds served at once."""
        return self.create("customresourcedefinitions", crd)

    def compact(self) -> None:
        """Forget the change history, as etcd compaction does: older watches get 410 Gone."""
        self._compacted_rv = self._resource_version
        self._history.clear()

    # --- watching -------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[WatchEvent]:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[WatchEvent]) -> None:
        self._subscribers.discard(queue)

    def history_since(self, resource_version: int) -> list[WatchEvent]:
        """Changes after `resource_version`; 410 Gone if some of them were already forgotten."""
        if resource_version < self._compacted_rv:
            raise KubeApiError(
                410,
                "Expired",
                f"too old resource version: {resource_version} ({self._compacted_rv})",
            )
        return [event for event in self._history if event.resource_version > resource_version]

    def render_event(self, resource: ResourceType, event: WatchEvent) -> Body:
        return {"type": event.type, "object": self._render(resource, event.object)}

    async def wait_for(self, condition: Callable[[], T], timeout: float = 10.0) -> T:
        """Wait until `condition()` returns something truthy (re-checked after every write)."""
        async with asyncio.timeout(timeout):
            while True:
                result = condition()
                if result:
                    return result
                await self._changed.wait()

    async def wait_for_object(
        self,
        ref: str | ResourceType,
        name: str,
        namespace: str | None = None,
        *,
        condition: Callable[[Body], bool] = lambda _obj: True,
        timeout: float = 10.0,
    ) -> Body:
        """Wait until the object exists and satisfies `condition`; return it."""

        def check() -> Body | None:
            if not self.exists(ref, name, namespace):
                return None
            obj = self.get(ref, name, namespace)
            return obj if condition(obj) else None

        found = await self.wait_for(check, timeout)
        assert found is not None
        return found

    async def wait_for_absence(
        self,
        ref: str | ResourceType,
        name: str,
        namespace: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        await self.wait_for(lambda: not self.exists(ref, name, namespace), timeout)

    # --- internals ------------------------------------------------------------------------------

    def _key(self, resource: ResourceType, namespace: str | None, name: str) -> ObjectKey:
        if resource.namespaced and not namespace:
            raise KubeApiError(
                400, "BadRequest", f"{resource.plural} are namespaced: give a namespace"
            )
        if not resource.namespaced and namespace:
            raise KubeApiError(
                404, "NotFound", f"{resource.plural} are cluster-scoped: no namespace {namespace!r}"
            )
        return (resource.group, resource.plural, namespace if resource.namespaced else None, name)

    def _check_kind(self, resource: ResourceType, body: Body) -> None:
        kind = body.get("kind")
        if kind is not None and kind != resource.kind:
            raise KubeApiError(
                400, "BadRequest", f"kind {kind!r} sent to the endpoint of {resource.kind!r}"
            )

    def _namespace_for_create(
        self, resource: ResourceType, metadata: Body, namespace: str | None
    ) -> str | None:
        given = metadata.get("namespace")
        if not resource.namespaced:
            if namespace:
                raise KubeApiError(404, "NotFound", f"{resource.plural} are cluster-scoped")
            return None
        if namespace and given and given != namespace:
            raise KubeApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace of the request",
            )
        chosen = namespace or given
        if not chosen:
            raise KubeApiError(
                400, "BadRequest", f"{resource.plural} are namespaced: give a namespace"
            )
        return str(chosen)

    def _generated_name(self, resource: ResourceType, namespace: str | None, metadata: Body) -> str:
        prefix = metadata.get("generateName")
        if not prefix:
            raise KubeApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
        alphabet = string.ascii_lowercase + string.digits
        while True:
            name = f"{prefix}{''.join(random.choices(alphabet, k=5))}"
            if self._key(resource, namespace, name) not in self._objects:
                return name

    def _update(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        mutate: Callable[[Body], Body],
        subresource: str | None,
    ) -> Body:
        if subresource not in (None, "status") or (
            subresource == "status" and not resource.status_subresource
        ):
            raise KubeApiError(
                404, "NotFound", f"{resource.plural} have no {subresource} subresource"
            )
        key = self._key(resource, namespace, name)
        old = self._objects.get(key)
        if old is None:
            raise KubeApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        candidate = mutate(copy.deepcopy(old))
        metadata = candidate.get("metadata")
        if not isinstance(metadata, dict):
            raise KubeApiError(422, "Invalid", "metadata must be an object")
        sent_rv = metadata.get("resourceVersion")
        if sent_rv is not None and str(sent_rv) != old["metadata"]["resourceVersion"]:
            raise KubeApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        for field in ("name", "namespace"):
            if metadata.get(field, old["metadata"].get(field)) != old["metadata"].get(field):
                raise KubeApiError(422, "Invalid", f"metadata.{field} cannot be changed")
        new = self._merge_by_subresource(resource, old, candidate, subresource)
        if new == old:
            return self._render(resource, old)  # a no-op write bumps nothing, as the apiserver
        old_finalizers = set(old["metadata"].get("finalizers", []))
        new_finalizers = new["metadata"].get("finalizers", [])
        if old["metadata"].get("deletionTimestamp") and set(new_finalizers) - old_finalizers:
            raise KubeApiError(
                422, "Forbidden", "no new finalizers can be added if the object is being deleted"
            )
        with_status = not resource.status_subresource
        if resource.tracks_generation and _spec_part(new, with_status) != _spec_part(
            old, with_status
        ):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if new["metadata"].get("deletionTimestamp") and not new_finalizers:
            return self._remove(resource, key, new)
        if resource.storage_key == (CRD_GROUP, "customresourcedefinitions"):
            resources_of_crd(new)
        self._write(resource, key, new, "MODIFIED")
        return self._render(resource, new)

    def _merge_by_subresource(
        self, resource: ResourceType, old: Body, candidate: Body, subresource: str | None
    ) -> Body:
        """Apply the status-subresource rules to a client's version of the object."""
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
            return new
        new = candidate
        new["kind"] = resource.kind
        for field in _SERVER_METADATA:
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
            else:
                new["metadata"].pop(field, None)
        if resource.status_subresource:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return new

    def _remove(self, resource: ResourceType, key: ObjectKey, last: Body) -> Body:
        self._objects.pop(key, None)
        final = copy.deepcopy(last)
        self._write(resource, key, final, "DELETED")
        if resource.storage_key == (CRD_GROUP, "customresourcedefinitions"):
            self._drop_objects_of(resources_of_crd(final))
        return self._render(resource, final)

    def _drop_objects_of(self, resources: Iterable[ResourceType]) -> None:
        """Deleting a CRD deletes its objects (watchers see them DELETED), then the kinds go."""
        for resource in resources:
            for key in [key for key in self._objects if key[:2] == resource.storage_key]:
                self._remove(resource, key, self._objects[key])
        self._rebuild_resources()

    def _write(self, resource: ResourceType, key: ObjectKey, obj: Body, event_type: str) -> None:
        self._resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        obj["apiVersion"] = resource.api_version
        obj["kind"] = resource.kind
        if event_type != "DELETED":
            self._objects[key] = obj
        event = WatchEvent(
            self._resource_version, resource.storage_key, key[2], event_type, copy.deepcopy(obj)
        )
        self._history.append(event)
        if len(self._history) > self._history_limit:
            dropped = self._history.pop(0)
            self._compacted_rv = dropped.resource_version
        for queue in self._subscribers:
            queue.put_nowait(event)
        if resource.storage_key == (CRD_GROUP, "customresourcedefinitions"):
            self._rebuild_resources()
        self._changed.set()
        self._changed = asyncio.Event()

    def _render(self, resource: ResourceType, obj: Body) -> Body:
        """A copy as the client sees it: apiVersion of the version it asked for."""
        rendered = copy.deepcopy(obj)
        rendered["apiVersion"] = resource.api_version
        rendered["kind"] = resource.kind
        return rendered


def _spec_part(obj: Body, with_status: bool) -> Body:
    """What bumps metadata.generation: all but metadata (and status, if it is a subresource)."""
    skipped = {"metadata", "kind", "apiVersion"} | (set() if with_status else {"status"})
    return {key: value for key, value in obj.items() if key not in skipped}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resources_of_crd(crd: Body) -> list[ResourceType]:
    """The served kinds of an apiextensions.k8s.io/v1 CRD; 422 for a CRD the apiserver rejects."""
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        raise KubeApiError(422, "Invalid", "CustomResourceDefinition has no spec")
    group, names, scope = spec.get("group"), spec.get("names"), spec.get("scope")
    if not isinstance(group, str) or not group:
        raise KubeApiError(422, "Invalid", "spec.group is required")
    if not isinstance(names, dict) or not names.get("plural") or not names.get("kind"):
        raise KubeApiError(422, "Invalid", "spec.names.plural and spec.names.kind are required")
    if scope not in ("Namespaced", "Cluster"):
        raise KubeApiError(422, "Invalid", f"spec.scope must be Namespaced or Cluster: {scope!r}")
    plural = str(names["plural"])
    if crd.get("metadata", {}).get("name") != f"{plural}.{group}":
        raise KubeApiError(422, "Invalid", f"metadata.name must be {plural}.{group}")
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        raise KubeApiError(422, "Invalid", "spec.versions must list at least one version")
    return [
        ResourceType(
            group=group,
            version=str(version["name"]),
            plural=plural,
            kind=str(names["kind"]),
            namespaced=scope == "Namespaced",
            singular=str(names.get("singular") or names["kind"].lower()),
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
            status_subresource="status" in (version.get("subresources") or {}),
        )
        for version in versions
        if version.get("served", True)
    ]


def _crd_status(crd: Body) -> Body:
    return {
        "acceptedNames": copy.deepcopy(crd["spec"]["names"]),
        "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
        "conditions": [
            {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": _now()}
            for kind, reason in (
                ("NamesAccepted", "NoConflicts"),
                ("Established", "InitialNamesAccepted"),
            )
        ],
    }
