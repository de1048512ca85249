"""The noise benchmark's scenario (bench/noise.py), short, on the real control plane with
kube-controller-manager and kube-scheduler (tests/realcluster.py): the add-ons and people make
their calls, the shipped detections stay quiet on them, and every detection still fires on
its attack. One control plane for the module; the benchmark itself runs longer.

Skips without the binaries ("needs a real cluster: ..."), which fails under CI
(AUDITWATCH_REQUIRE_TOOLS=1, tests/conftest.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from bench.noise import (
    ADDONS,
    ATTACKER,
    DETECTIONS,
    PEOPLE,
    PUBLIC_ADDRESS,
    STREAM,
    AttackReport,
    Report,
    run_attacks,
    run_benign,
)
from tests.realcluster import Cluster, missing_controllers, start

from auditwatch.config.build import build_alert
from auditwatch.rules.reference import matches
from auditwatch.store import query

pytestmark = pytest.mark.skipif(
    missing_controllers() is not None, reason=f"needs a real cluster: {missing_controllers()}"
)

STEADY_SECONDS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start(tmp_path_factory.mktemp("noise"), controllers=True, users=[*PEOPLE, ATTACKER])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def benign(cluster: Cluster) -> Report:
    return run_benign(cluster, STEADY_SECONDS)


def test_the_steady_state_carries_every_addon_person_and_controller(
    cluster: Cluster, benign: Report
) -> None:
    assert benign.errors == []
    users = Counter(
        str(e.get("user", {}).get("username"))
        for e in query(cluster.root / "data", STREAM, since=benign.since, until=benign.until)
    )
    for addon in ADDONS:
        assert users[f"system:serviceaccount:{addon.namespace}:{addon.service_account}"] > 0
    for person in PEOPLE:
        assert users[person.name] > 0
    # kube-controller-manager acts as each controller's own ServiceAccount
    assert users["system:serviceaccount:kube-system:replicaset-controller"] > 0
    assert users["system:serviceaccount:kube-system:deployment-controller"] > 0
    # what the benchmark reports: each team's new Deployment, by whom, in the info detection
    deployments = benign.alert("k8s-deployment-created-deleted")
    assert deployments.principals == Counter({p.name: 1 for p in PEOPLE})
    assert deployments.matches == 2
    assert deployments.fired
    assert "k8s-deployment-created-deleted" in benign.table()


def test_no_medium_or_higher_detection_fires_on_the_benign_steady_state(benign: Report) -> None:
    assert [a.name for a in benign.notable] == [], benign.table()


@pytest.fixture(scope="module")
def attacks(cluster: Cluster, benign: Report) -> AttackReport:
    """The attacks, after the steady state."""
    return run_attacks(cluster)


def test_every_detection_fires_on_its_attack(attacks: AttackReport) -> None:
    assert attacks.missed == [], attacks.table
    # kubectl exec, attach and cp, each one session through the apiserver: counted once each,
    # though the apiserver writes ResponseStarted and ResponseComplete for each; the exec
    # reads the ServiceAccount token and cp runs tar.
    assert attacks.new_matches["k8s-pod-exec-attach"] == 3, attacks.table
    assert attacks.new_matches["k8s-pod-exec-sensitive-command"] == 2, attacks.table


def library_rule(name: str) -> Any:
    """The condition of detection `name` of examples/detections, as the operator builds it."""
    return build_alert(
        yaml.safe_load((DETECTIONS / f"{name}.yaml").read_text()), lambda *_: None
    ).rule.condition


def test_exec_and_attach_count_when_the_session_opens(
    cluster: Cluster, attacks: AttackReport
) -> None:
    """What the apiserver wrote for the exec, attach and cp attacks, and what the detection
    takes of it: each session's ResponseStarted (101), not its ResponseComplete, and not the
    refused WebSocket `get` kubectl 1.32 tries first for the exec (403, written at both stages
    too), after which it opened the session with an SPDY `create`."""
    rule = library_rule("k8s-pod-exec-attach")
    written = [
        e
        for e in query(cluster.root / "data", STREAM, since=attacks.since, until=attacks.until)
        if e.get("objectRef", {}).get("subresource") in ("exec", "attach")
    ]

    def requests(events: list[dict[str, Any]]) -> Counter[tuple[str, str, str, int]]:
        return Counter(
            (e["verb"], e["objectRef"]["subresource"], e["stage"], e["responseStatus"]["code"])
            for e in events
        )

    assert requests(written) == Counter(
        {
            ("get", "exec", "ResponseStarted", 403): 1,  # WebSocket, refused by RBAC
            ("get", "exec", "ResponseComplete", 403): 1,
            ("create", "exec", "ResponseStarted", 101): 1,  # SPDY: the session
            ("create", "exec", "ResponseComplete", 101): 1,
            ("get", "attach", "ResponseStarted", 101): 1,  # WebSocket: the session
            ("get", "attach", "ResponseComplete", 101): 1,
            ("get", "exec", "ResponseStarted", 101): 1,  # kubectl cp, WebSocket
            ("get", "exec", "ResponseComplete", 101): 1,
        }
    )
    assert requests([e for e in written if matches(rule, e)]) == Counter(
        {
            ("create", "exec", "ResponseStarted", 101): 1,
            ("get", "attach", "ResponseStarted", 101): 1,
            ("get", "exec", "ResponseStarted", 101): 1,
        }
    )


def test_a_control_plane_token_used_through_a_proxy_shows_the_public_address(
    cluster: Cluster, attacks: AttackReport
) -> None:
    """The apiserver records X-Forwarded-For before the peer's address: the scheduler's token
    used from a public address through a proxy is reported, once; kube-scheduler's own calls
    from 127.0.0.1 are not."""
    rule = library_rule("k8s-system-principal-public-ip")
    scheduler = [
        e
        for e in query(cluster.root / "data", STREAM, since=attacks.since, until=attacks.until)
        if e.get("user", {}).get("username") == "system:kube-scheduler"
    ]
    forwarded = [e for e in scheduler if PUBLIC_ADDRESS in e["sourceIPs"]]
    assert [(e["sourceIPs"], e["requestURI"]) for e in forwarded] == [
        ([PUBLIC_ADDRESS, "127.0.0.1"], "/api/v1/pods")
    ]
    assert len(scheduler) > len(forwarded)  # its own calls: binding pods, watching
    assert [e for e in scheduler if matches(rule, e)] == forwarded
    assert attacks.new_matches["k8s-system-principal-public-ip"] == 1, attacks.table


def test_a_root_deployment_is_reported_once_not_per_replicaset_and_pod(
    cluster: Cluster, attacks: AttackReport
) -> None:
    """The controllers copy the Deployment's root template into a ReplicaSet and a pod (with
    a controller ownerReference, as their own ServiceAccounts): only the Deployment counts."""
    rule = library_rule("k8s-container-run-as-root")

    def name(event: dict[str, Any]) -> str:
        metadata = event.get("requestObject", {}).get("metadata", {})
        return str(metadata.get("name") or metadata.get("generateName"))

    toolbox = [
        e
        for e in query(cluster.root / "data", STREAM, since=attacks.since, until=attacks.until)
        if e["verb"] == "create"
        and e.get("objectRef", {}).get("namespace") == "shop"
        and name(e).startswith("toolbox")
    ]
    assert Counter((e["objectRef"]["resource"], e["user"]["username"]) for e in toolbox) == {
        ("deployments", ATTACKER.name): 1,
        ("replicasets", "system:serviceaccount:kube-system:deployment-controller"): 1,
        ("pods", "system:serviceaccount:kube-system:replicaset-controller"): 1,
    }
    assert [e["objectRef"]["resource"] for e in toolbox if matches(rule, e)] == ["deployments"]
    assert attacks.new_matches["k8s-container-run-as-root"] == 1, attacks.table
