"""The fake apiserver keeps the API contracts kopf depends on over real HTTP, and runs kopf."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import kubernetes
import pytest
import pytest_asyncio
from tests.kubefake import JSON_PATCH, MERGE_PATCH, KubeFake, ResourceType, Store
from tests.kubefake.fixtures import kube_fake

__all__ = ["kube_fake"]  # the fixture, imported for pytest

KOPFEXAMPLE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "kopfexamples.kopf.dev"},
    "spec": {
        "group": "kopf.dev",
        "scope": "Namespaced",
        "names": {
            "plural": "kopfexamples",
            "singular": "kopfexample",
            "kind": "KopfExample",
            "shortNames": ["kex"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
CLUSTER_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "scope": "Cluster",
        "names": {"plural": "widgets", "kind": "Widget"},
        "versions": [{"name": "v1", "served": True, "storage": True}],
    },
}
KEX = "/apis/kopf.dev/v1/namespaces/default/kopfexamples"


def kex(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfExample",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest_asyncio.fixture
async def http(kube_fake: KubeFake) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the fake with the demo CRD already established (posted over HTTP)."""
    async with aiohttp.ClientSession(kube_fake.url) as session:
        async with session.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=KOPFEXAMPLE_CRD
        ) as response:
            assert response.status == 201
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    expect: int = 200,
) -> Any:
    data = None if body is None else json.dumps(body)
    async with http.request(
        method, path, data=data, headers={"Content-Type": content_type}
    ) as response:
        answer = await response.json()
        assert response.status == expect, answer
        return answer


async def watch(http: aiohttp.ClientSession, path: str, **params: str) -> list[dict[str, Any]]:
    """Read a whole watch-stream (the server must end it, e.g. via timeoutSeconds)."""
    async with http.get(path, params={"watch": "true", **params}) as response:
        assert response.status == 200
        return [json.loads(line) async for line in response.content if line.strip()]


async def test_discovery_derives_custom_kinds_from_crds(http: aiohttp.ClientSession) -> None:
    assert (await call(http, "GET", "/api"))["versions"] == ["v1"]
    core = {r["name"]: r for r in (await call(http, "GET", "/api/v1"))["resources"]}
    assert {"namespaces", "events", "secrets"} <= set(core)
    assert core["events"]["namespaced"] and not core["namespaces"]["namespaced"]
    groups = {g["name"]: g for g in (await call(http, "GET", "/apis"))["groups"]}
    assert groups["kopf.dev"]["preferredVersion"]["version"] == "v1"
    kinds = {r["name"]: r for r in (await call(http, "GET", "/apis/kopf.dev/v1"))["resources"]}
    assert set(kinds) == {"kopfexamples", "kopfexamples/status"}
    assert kinds["kopfexamples"]["kind"] == "KopfExample"
    assert kinds["kopfexamples"]["namespaced"] is True
    assert kinds["kopfexamples"]["shortNames"] == ["kex"]
    await call(http, "GET", "/apis/nothing.dev/v1", expect=404)
    await call(http, "GET", "/apis/kopf.dev/v2/kopfexamples", expect=404)

    crds = await call(http, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    assert crds["kind"] == "CustomResourceDefinitionList"
    [crd] = crds["items"]
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"

    await call(
        http,
        "DELETE",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/kopfexamples.kopf.dev",
    )
    assert "kopf.dev" not in {g["name"] for g in (await call(http, "GET", "/apis"))["groups"]}


async def test_malformed_crd_is_rejected(http: aiohttp.ClientSession) -> None:
    broken = {**CLUSTER_CRD, "metadata": {"name": "wrong.example.dev"}}
    answer = await call(
        http, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", broken, expect=422
    )
    assert answer["kind"] == "Status" and "widgets.example.dev" in answer["message"]


async def test_every_write_bumps_the_global_resource_version(http: aiohttp.ClientSession) -> None:
    first = await call(http, "POST", KEX, kex("one", field=1), expect=201)
    second = await call(http, "POST", KEX, kex("two", field=2), expect=201)
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    assert first["metadata"]["generation"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["metadata"]["creationTimestamp"])

    listed = await call(http, "GET", KEX)
    assert listed["kind"] == "KopfExampleList" and listed["apiVersion"] == "kopf.dev/v1"
    assert listed["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]
    assert [item["metadata"]["name"] for item in listed["items"]] == ["one", "two"]
    await call(http, "POST", KEX, kex("one"), expect=409)


async def test_generate_name_makes_unique_names(http: aiohttp.ClientSession) -> None:
    body = {"metadata": {"generateName": "ex-"}, "spec": {}}
    names = {
        (await call(http, "POST", KEX, body, expect=201))["metadata"]["name"] for _ in range(3)
    }
    assert len(names) == 3 and all(re.fullmatch(r"ex-[a-z0-9]{5}", name) for name in names)
    await call(http, "POST", KEX, {"metadata": {}, "spec": {}}, expect=422)


async def test_merge_patch_answers_the_whole_new_object(http: aiohttp.ClientSession) -> None:
    created = await call(http, "POST", KEX, kex("ex", field=1, keep="yes"), expect=201)
    patched = await call(
        http, "PATCH", f"{KEX}/ex", {"metadata": {"labels": {"a": "b"}}}, MERGE_PATCH
    )
    assert patched["spec"] == {"field": 1, "keep": "yes"}
    assert patched["metadata"]["labels"] == {"a": "b"}
    assert patched["metadata"]["uid"] == created["metadata"]["uid"]
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    same = await call(http, "PATCH", f"{KEX}/ex", {"metadata": {"labels": {"a": "b"}}}, MERGE_PATCH)
    assert same["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}}
    await call(http, "PATCH", f"{KEX}/ex", stale, MERGE_PATCH, expect=409)
    await call(http, "PATCH", f"{KEX}/ex", {}, "application/strategic-merge-patch+json", expect=415)


async def test_generation_and_status_follow_the_subresource_rules(
    http: aiohttp.ClientSession,
) -> None:
    await call(http, "POST", KEX, {**kex("ex", field=1), "status": {"sneaked": True}}, expect=201)
    obj = await call(http, "PATCH", f"{KEX}/ex", {"status": {"via": "main"}}, MERGE_PATCH)
    assert "status" not in obj and obj["metadata"]["generation"] == 1
    obj = await call(
        http, "PATCH", f"{KEX}/ex", {"metadata": {"annotations": {"x": "y"}}}, MERGE_PATCH
    )
    assert obj["metadata"]["generation"] == 1
    obj = await call(
        http,
        "PATCH",
        f"{KEX}/ex/status",
        {"status": {"via": "status"}, "spec": {"field": 99}},
        MERGE_PATCH,
    )
    assert obj["status"] == {"via": "status"} and obj["spec"] == {"field": 1}
    assert obj["metadata"]["generation"] == 1
    obj = await call(http, "PATCH", f"{KEX}/ex", {"spec": {"field": 2}}, MERGE_PATCH)
    assert obj["metadata"]["generation"] == 2 and obj["status"] == {"via": "status"}


async def test_json_patch_with_a_failed_test_answers_422(http: aiohttp.ClientSession) -> None:
    created = await call(http, "POST", KEX, kex("ex"), expect=201)
    rv = created["metadata"]["resourceVersion"]
    add = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["kopf.dev/f"]},
    ]
    patched = await call(http, "PATCH", f"{KEX}/ex", add, JSON_PATCH)
    assert patched["metadata"]["finalizers"] == ["kopf.dev/f"]
    answer = await call(http, "PATCH", f"{KEX}/ex", add, JSON_PATCH, expect=422)
    assert answer["reason"] == "Invalid"
    assert (await call(http, "GET", f"{KEX}/ex"))["metadata"]["resourceVersion"] == (
        patched["metadata"]["resourceVersion"]
    )


async def test_watch_from_a_version_sends_only_later_changes(
    http: aiohttp.ClientSession,
) -> None:
    await call(http, "POST", KEX, kex("before"), expect=201)
    since = (await call(http, "GET", KEX))["metadata"]["resourceVersion"]
    await call(http, "POST", KEX, kex("after"), expect=201)
    await call(http, "PATCH", f"{KEX}/before", {"spec": {"n": 1}}, MERGE_PATCH)
    events = await watch(http, KEX, resourceVersion=since, timeoutSeconds="0.3")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"),
        ("MODIFIED", "before"),
    ]
    assert events[1]["object"]["spec"] == {"n": 1}


async def test_watch_without_a_version_starts_with_the_current_objects(
    http: aiohttp.ClientSession,
) -> None:
    await call(http, "POST", KEX, kex("existing"), expect=201)
    events = await watch(http, KEX, timeoutSeconds="0.3")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "existing")]


async def test_watch_with_initial_events_ends_them_with_a_bookmark(
    http: aiohttp.ClientSession,
) -> None:
    await call(http, "POST", KEX, kex("existing"), expect=201)
    events = await watch(
        http,
        KEX,
        sendInitialEvents="true",
        resourceVersionMatch="NotOlderThan",
        allowWatchBookmarks="true",
        timeoutSeconds="0.2",
    )
    assert [e["type"] for e in events[:2]] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_watch_from_a_forgotten_version_gets_410(
    http: aiohttp.ClientSession, kube_fake: KubeFake
) -> None:
    created = await call(http, "POST", KEX, kex("ex"), expect=201)
    await call(http, "PATCH", f"{KEX}/ex", {"spec": {"n": 1}}, MERGE_PATCH)
    kube_fake.store.compact()
    events = await watch(http, KEX, resourceVersion=created["metadata"]["resourceVersion"])
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]


def test_bounded_history_expires_old_versions() -> None:
    store = Store(history_limit=2)
    store.add_crd(KOPFEXAMPLE_CRD)
    start = store.resource_version
    for name in ("a", "b", "c"):
        store.create("kopfexamples", kex(name), "default")
    with pytest.raises(Exception, match="410"):
        store.history_since(start)
    assert [e.object["metadata"]["name"] for e in store.history_since(start + 1)] == ["b", "c"]


async def test_watch_timeout_closes_the_stream_with_a_bookmark(
    http: aiohttp.ClientSession,
) -> None:
    since = (await call(http, "GET", KEX))["metadata"]["resourceVersion"]
    started = time.monotonic()
    events = await watch(
        http, KEX, resourceVersion=since, timeoutSeconds="1", allowWatchBookmarks="true"
    )
    assert 0.9 <= time.monotonic() - started < 3
    assert events and all(e["type"] == "BOOKMARK" for e in events)
    assert events[-1]["object"]["metadata"]["resourceVersion"] == since


async def test_watch_streams_live_changes(http: aiohttp.ClientSession) -> None:
    since = (await call(http, "GET", KEX))["metadata"]["resourceVersion"]
    watching = asyncio.create_task(watch(http, KEX, resourceVersion=since, timeoutSeconds="1"))
    await asyncio.sleep(0.3)
    await call(http, "POST", KEX, kex("live"), expect=201)
    await call(
        http,
        "POST",
        "/apis/kopf.dev/v1/namespaces/other/kopfexamples",
        kex("elsewhere"),
        expect=201,
    )
    events = await watching
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "live")]


async def test_finalizers_hold_deletion_until_removed(http: aiohttp.ClientSession) -> None:
    body = kex("ex")
    body["metadata"]["finalizers"] = ["kopf.dev/f"]
    created = await call(http, "POST", KEX, body, expect=201)
    deleting = await call(http, "DELETE", f"{KEX}/ex")
    assert deleting["metadata"]["deletionTimestamp"]
    assert (await call(http, "GET", f"{KEX}/ex"))["metadata"]["deletionTimestamp"]
    add = [{"op": "add", "path": "/metadata/finalizers/-", "value": "late"}]
    await call(http, "PATCH", f"{KEX}/ex", add, JSON_PATCH, expect=422)
    rv = deleting["metadata"]["resourceVersion"]
    remove = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]
    await call(http, "PATCH", f"{KEX}/ex", remove, JSON_PATCH)
    await call(http, "GET", f"{KEX}/ex", expect=404)
    events = await watch(
        http, KEX, resourceVersion=created["metadata"]["resourceVersion"], timeoutSeconds="0.2"
    )
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]


async def test_namespaced_and_cluster_scoped_paths(http: aiohttp.ClientSession) -> None:
    await call(
        http,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        CLUSTER_CRD,
        expect=201,
    )
    widget = await call(
        http, "POST", "/apis/example.dev/v1/widgets", {"metadata": {"name": "w"}}, expect=201
    )
    assert "namespace" not in widget["metadata"]
    await call(http, "GET", "/apis/example.dev/v1/namespaces/default/widgets/w", expect=404)
    await call(http, "POST", KEX, kex("a"), expect=201)
    await call(
        http, "POST", "/apis/kopf.dev/v1/namespaces/other/kopfexamples", kex("b"), expect=201
    )
    everywhere = await call(http, "GET", "/apis/kopf.dev/v1/kopfexamples")
    assert [i["metadata"]["namespace"] for i in everywhere["items"]] == ["default", "other"]
    assert len((await call(http, "GET", KEX))["items"]) == 1
    namespace = await call(
        http, "POST", "/api/v1/namespaces", {"metadata": {"name": "team"}}, expect=201
    )
    assert "generation" not in namespace["metadata"]
    assert (await call(http, "GET", "/api/v1/namespaces/team"))["kind"] == "Namespace"
    assert (await call(http, "GET", "/api/v1/namespaces"))["kind"] == "NamespaceList"


async def test_extra_builtin_kinds_can_be_registered(
    http: aiohttp.ClientSession, kube_fake: KubeFake
) -> None:
    await call(http, "GET", "/api/v1/namespaces/default/configmaps", expect=404)
    kube_fake.store.register(ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True))
    body = {"metadata": {"name": "settings"}, "data": {"a": "b"}}
    await call(http, "POST", "/api/v1/namespaces/default/configmaps", body, expect=201)
    assert kube_fake.store.get("configmaps", "settings", "default")["data"] == {"a": "b"}
    assert "configmaps" in {r["name"] for r in (await call(http, "GET", "/api/v1"))["resources"]}


async def test_events_secrets_and_the_request_log(
    http: aiohttp.ClientSession, kube_fake: KubeFake
) -> None:
    event = {
        "metadata": {"generateName": "kopf-event-"},
        "reason": "Hello",
        "message": "hi",
        "involvedObject": {"kind": "KopfExample", "name": "ex", "namespace": "default"},
    }
    posted = await call(http, "POST", "/api/v1/namespaces/default/events", event, expect=201)
    assert posted["metadata"]["name"].startswith("kopf-event-")
    assert posted["metadata"]["namespace"] == "default"
    secret = {"metadata": {"name": "creds"}, "data": {"token": "c2VjcmV0"}}
    await call(http, "POST", "/api/v1/namespaces/default/secrets", secret, expect=201)
    got = await call(http, "GET", "/api/v1/namespaces/default/secrets/creds")
    assert got["data"] == {"token": "c2VjcmV0"} and got["kind"] == "Secret"

    [logged] = kube_fake.requests_matching("POST", "/api/v1/namespaces/default/events")
    assert logged.content_type == "application/json" and logged.json == event
    assert logged.status == 201
    await watch(http, KEX, timeoutSeconds="0.1", allowWatchBookmarks="true")
    [watched] = kube_fake.requests_matching("GET", re.compile(r"/kopfexamples$"))
    assert watched.query == {
        "watch": "true",
        "timeoutSeconds": "0.1",
        "allowWatchBookmarks": "true",
    }


@pytest.mark.parametrize("namespaces", [(), ("default",)], ids=["clusterwide", "namespaced"])
async def test_a_real_kopf_operator_handles_the_lifecycle(
    kube_fake: KubeFake, namespaces: tuple[str, ...]
) -> None:
    store = kube_fake.store
    store.add_crd(KOPFEXAMPLE_CRD)
    registry = kopf.OperatorRegistry()
    calls = {"create": 0, "update": 0, "delete": 0}

    @kopf.on.create("kopf.dev", "v1", "kopfexamples", registry=registry, id="created")
    async def created(spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[str, Any]:
        calls["create"] += 1
        kopf.info(body, reason="Greeting", message=f"hello {spec['field']}")
        return {"seen": spec["field"]}

    @kopf.on.update("kopf.dev", "v1", "kopfexamples", registry=registry, id="updated")
    async def updated(spec: kopf.Spec, **_: Any) -> dict[str, Any]:
        calls["update"] += 1
        return {"seen": spec["field"]}

    @kopf.on.delete("kopf.dev", "v1", "kopfexamples", registry=registry)
    async def deleted(**_: Any) -> None:
        calls["delete"] += 1

    async with kube_fake.run_kopf(registry, namespaces=namespaces):
        store.create("kopfexamples", kex("ex", field="one"), "default")
        obj = await store.wait_for_object(
            "kopfexamples", "ex", "default", condition=lambda o: "created" in o.get("status", {})
        )
        assert obj["status"]["created"] == {"seen": "one"}
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        status_patches = kube_fake.requests_matching("PATCH", f"{KEX}/ex/status")
        assert any(r.json["status"].get("created") for r in status_patches)
        greetings = await store.wait_for(
            lambda: [
                e for e in store.list_objects("events", "default") if e["reason"] == "Greeting"
            ]
        )
        assert greetings[0]["message"] == "hello one"
        [post] = kube_fake.requests_matching("POST", "/api/v1/namespaces/default/events")
        assert post.json["metadata"]["generateName"] == "kopf-event-"
        await asyncio.sleep(2)  # a second run of the create handler would show up by now
        assert calls == {"create": 1, "update": 0, "delete": 0}

        store.patch("kopfexamples", "ex", {"spec": {"field": "two"}}, "default")
        await store.wait_for_object(
            "kopfexamples",
            "ex",
            "default",
            condition=lambda o: o.get("status", {}).get("updated") == {"seen": "two"},
        )
        await asyncio.sleep(1)
        assert calls == {"create": 1, "update": 1, "delete": 0}

        watched = {
            request.path
            for request in kube_fake.requests_matching("GET", re.compile("/kopfexamples$"))
            if request.query.get("watch") == "true"
        }
        assert watched == ({KEX} if namespaces else {"/apis/kopf.dev/v1/kopfexamples"})

        store.delete("kopfexamples", "ex", "default")
        await store.wait_for_absence("kopfexamples", "ex", "default")
        assert calls == {"create": 1, "update": 1, "delete": 1}


async def test_kubeconfig_lets_the_kubernetes_client_in(
    http: aiohttp.ClientSession, kube_fake: KubeFake, tmp_path: Path
) -> None:
    await call(http, "POST", KEX, kex("ex", field=1), expect=201)
    new_client: Callable[..., Any] = kubernetes.config.new_client_from_config
    client = new_client(config_file=str(kube_fake.write_kubeconfig(tmp_path / "kubeconfig")))
    api = kubernetes.client.CustomObjectsApi(client)
    listed: Any = await asyncio.to_thread(
        api.list_namespaced_custom_object, "kopf.dev", "v1", "default", "kopfexamples"
    )
    assert [item["spec"] for item in listed["items"]] == [{"field": 1}]
    client.close()
