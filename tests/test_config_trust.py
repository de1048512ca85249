"""Trust lists: which requests an entry trusts, and for what no more."""

from __future__ import annotations

from typing import Any

from auditwatch.config.trust import TrustEntry, TrustList, build_trust_lists
from auditwatch.rules.reference import matches

CERT_MANAGER = "system:serviceaccount:cert-manager:cert-manager"


def request(
    username: str,
    *,
    verb: str = "get",
    resource: str = "secrets",
    namespace: str | None = "team-a",
    groups: tuple[str, ...] = (),
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "verb": verb,
        "user": {"username": username, "groups": list(groups)},
        "objectRef": {"resource": resource, **({"namespace": namespace} if namespace else {})},
    }
    if body is not None:
        event["requestObject"] = body
    return event


def trusts(entry: TrustEntry, event: dict[str, Any]) -> bool:
    expression = entry.expression()
    assert expression is not None
    return matches(expression, event)


def test_a_service_account_is_trusted_for_its_resources_and_verbs_only() -> None:
    entry = TrustEntry(
        "cert-manager",
        service_accounts=(("cert-manager", "cert-manager"),),
        resources=("secrets",),
        verbs=("get", "list", "watch"),
    )
    assert trusts(entry, request(CERT_MANAGER))
    assert trusts(entry, request(CERT_MANAGER, verb="list", namespace=None))
    assert not trusts(entry, request(CERT_MANAGER, verb="delete"))
    assert not trusts(entry, request(CERT_MANAGER, resource="pods"))
    assert not trusts(entry, request("system:serviceaccount:team-a:cert-manager"))


def test_namespaces_narrow_an_entry_to_events_about_them() -> None:
    entry = TrustEntry(
        "argocd", service_accounts=(("argocd", "argocd-server"),), namespaces=("argocd",)
    )
    server = "system:serviceaccount:argocd:argocd-server"
    assert trusts(entry, request(server, namespace="argocd"))
    assert not trusts(entry, request(server, namespace="payments"))
    assert not trusts(entry, request(server, namespace=None))


def test_users_and_groups_are_identities_too() -> None:
    entry = TrustEntry("people", users=("alice@example.com",), groups=("platform-admins",))
    assert trusts(entry, request("alice@example.com"))
    assert trusts(entry, request("bob@example.com", groups=("developers", "platform-admins")))
    assert not trusts(entry, request("bob@example.com", groups=("developers",)))


def pod(*images: str, init: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "spec": {
            "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)],
            "initContainers": [{"name": f"i{i}", "image": image} for i, image in enumerate(init)],
        },
    }


def test_images_are_trusted_only_when_every_container_runs_one() -> None:
    entry = TrustEntry("calico", images=("quay.io/calico/node", "quay.io/calico/cni"))
    creator = "system:serviceaccount:kube-system:daemon-set-controller"
    create = {"verb": "create", "resource": "pods"}
    assert trusts(entry, request(creator, **create, body=pod("quay.io/calico/node:v3.28.0")))
    assert trusts(
        entry,
        request(
            creator,
            **create,
            body=pod("quay.io/calico/node@sha256:0f1e", init=("quay.io/calico/cni:v3.28.0",)),
        ),
    )
    # One untrusted container, even an init container, and the pod is not trusted.
    assert not trusts(
        entry, request(creator, **create, body=pod("quay.io/calico/node:v3.28.0", "evil:latest"))
    )
    assert not trusts(
        entry,
        request(creator, **create, body=pod("quay.io/calico/node", init=("evil/miner:1",))),
    )
    # A repository is matched whole: not a longer name that starts with it, nor no pod at all.
    assert not trusts(entry, request(creator, **create, body=pod("quay.io/calico/node-evil:1")))
    assert not trusts(entry, request(creator, **create))
    daemonset = {"kind": "DaemonSet", "spec": {"template": pod("quay.io/calico/node:v3.28.0")}}
    assert trusts(entry, request("alice", verb="create", resource="daemonsets", body=daemonset))


def test_a_list_trusts_what_any_entry_trusts() -> None:
    lists = build_trust_lists(
        {
            "infrastructure": {
                "entries": {
                    "cert-manager": {
                        "serviceAccounts": [{"namespace": "cert-manager", "name": "cert-manager"}],
                        "resources": ["secrets"],
                    },
                    "kyverno": {
                        "serviceAccounts": [{"namespace": "kyverno", "name": "kyverno"}],
                        "namespaces": ["kyverno"],
                    },
                }
            },
            "empty": {},
        }
    )
    infrastructure = lists["infrastructure"]
    assert [entry.name for entry in infrastructure.entries] == ["cert-manager", "kyverno"]
    expression = infrastructure.expression()
    assert expression is not None
    assert matches(expression, request(CERT_MANAGER))
    kyverno = "system:serviceaccount:kyverno:kyverno"
    assert matches(expression, request(kyverno, namespace="kyverno", resource="configmaps"))
    assert not matches(expression, request(kyverno))
    assert lists["empty"] == TrustList("empty", ())
    assert lists["empty"].expression() is None
