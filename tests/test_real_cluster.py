"""auditwatch against a real kube-apiserver (tests/realcluster.py): the shipped manifests and
examples applied with kubectl, the audit webhook over HTTPS with a bearer token, the operator
running as its own ServiceAccount. One control plane for the module.

Needs $AUDITWATCH_KUBE_APISERVER (docs/operator.md, "Real control-plane tests"), etcd and kubectl;
skips without them ("needs a real cluster: ..."); under CI (AUDITWATCH_REQUIRE_TOOLS=1) that
skip fails instead (tests/conftest.py).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.realcluster import OPERATOR_NAMESPACE, OPERATOR_USER, REPO, Cluster, missing_tools, start

pytestmark = pytest.mark.skipif(
    missing_tools() is not None, reason=f"needs a real cluster: {missing_tools()}"
)

SEED_RULE = (
    'verb = "get" and objectRef.resource = "secrets" and objectRef.name = "mysecret" '
    'and user.username startswith "system:serviceaccount:seed:"'
)


def alert(name: str, rule: str, stream: str = "kube-audit") -> str:
    return f"""
apiVersion: auditwatch.dev/v1alpha1
kind: AuditAlert
metadata:
  name: {name}
  namespace: seed
spec:
  stream: {stream}
  message: "{{user_username}} read {{objectRef_name}}"
  rule:
    type: composite
    config: '{rule}'
"""


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    for condition in obj.get("status", {}).get("conditions", []):
        if condition["type"] == "Ready":
            return dict(condition)
    return {}


def seed_alert_in_state(cluster: Cluster, name: str, state: str) -> dict[str, Any]:
    """AuditAlert `name` of namespace seed, once its status.state is `state`."""
    return cluster.wait_for_object(
        f"{name} {state}",
        lambda a: a.get("status", {}).get("state") == state,
        "auditalert",
        name,
        "-n",
        "seed",
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start(tmp_path_factory.mktemp("cluster"))
    try:
        running.kubectl("create", "namespace", "seed")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def seed(cluster: Cluster) -> Cluster:
    """The seed scenario: two ServiceAccounts may read `mysecret`; each reads it once with a
    TokenRequest token. `seed-unauthorized` (everyone but authorized-user) and, as the control
    that the authorized read reached auditwatch too, `seed-authorized`."""
    cluster.apply(
        alert(
            "seed-unauthorized",
            SEED_RULE + ' and user.username != "system:serviceaccount:seed:authorized-user"',
        )
    )
    cluster.apply(
        alert(
            "seed-authorized",
            SEED_RULE + ' and user.username = "system:serviceaccount:seed:authorized-user"',
        )
    )
    cluster.kubectl("create", "secret", "generic", "mysecret", "-n", "seed", "--from-literal=a=b")
    cluster.kubectl(
        "create",
        "role",
        "read-secret",
        "-n",
        "seed",
        "--verb=get",
        "--resource=secrets",
        "--resource-name=mysecret",
    )
    for user in ("authorized-user", "unauthorized-user"):
        cluster.kubectl("create", "serviceaccount", user, "-n", "seed")
        cluster.kubectl(
            "create",
            "rolebinding",
            user,
            "-n",
            "seed",
            "--role=read-secret",
            f"--serviceaccount=seed:{user}",
        )
    for name in ("seed-unauthorized", "seed-authorized"):
        cluster.wait_for(
            f"{name} listening",
            lambda n=name: (
                cluster.get("auditalert", n, "-n", "seed").get("status", {}).get("state")
                == "Listening"
            ),
        )
    for user in ("authorized-user", "unauthorized-user"):
        token = cluster.token("seed", user)
        cluster.kubectl("get", "secret", "mysecret", "-n", "seed", token=token)
    return cluster


def test_manifests_and_examples_apply_and_the_streams_are_ready(cluster: Cluster) -> None:
    assert cluster.get("deployment", "auditwatch", "-n", "auditwatch")["spec"]["replicas"] == 1
    stream = cluster.wait_for_object(
        "kube-audit Ready and receiving over HTTPS",
        lambda s: ready(s).get("status") == "True" and s["status"].get("eventsReceived", 0) > 0,
        "auditstream",
        "kube-audit",
        timeout=60,
    )
    assert stream["status"]["ingestPath"] == "/api/v1/logstream/kube-audit"
    cluster.kubectl("apply", "-k", str(REPO / "examples/detections"))
    names = [i["metadata"]["name"] for i in cluster.get("auditalerts", "-A")["items"]]

    def all_listening() -> bool:
        items = cluster.get("auditalerts", "-A")["items"]
        states = {i["metadata"]["name"]: i.get("status", {}).get("state") for i in items}
        return all(states.get(n) in ("Listening", "Firing", "Resolved") for n in names)

    cluster.wait_for("every detection valid", all_listening, timeout=60)


def test_only_the_unauthorized_read_fires(seed: Cluster) -> None:
    fired = seed.wait_for_object(
        "seed-unauthorized Firing",
        lambda a: a.get("status", {}).get("state") == "Firing",
        "auditalert",
        "seed-unauthorized",
        "-n",
        "seed",
    )
    assert fired["status"]["matches"] == 1
    assert fired["status"]["lastMatch"]["user"] == "system:serviceaccount:seed:unauthorized-user"
    control = seed.wait_for_object(
        "seed-authorized Firing",
        lambda a: a.get("status", {}).get("state") == "Firing",
        "auditalert",
        "seed-authorized",
        "-n",
        "seed",
    )
    assert control["status"]["matches"] == 1
    event = seed.wait_for(
        "a Firing Event about seed-unauthorized",
        lambda: [
            e
            for e in seed.events("seed", "AuditAlert", "seed-unauthorized")
            if e["reason"] == "Firing"
        ],
    )[0]
    assert "unauthorized-user" in event["message"]

    table = seed.kubectl("get", "auditalerts", "-n", "seed").stdout.splitlines()
    assert table[0].split() == ["NAME", "STREAM", "STATE", "MATCHES", "LAST", "MATCH", "AGE"]
    row = next(line.split() for line in table if line.startswith("seed-unauthorized "))
    assert row[1:4] == ["kube-audit", "Firing", "1"]
    streams = seed.kubectl("get", "auditstreams").stdout.splitlines()
    assert streams[0].split()[:3] == ["NAME", "READY", "EVENTS"]
    assert next(s.split() for s in streams if s.startswith("kube-audit "))[1] == "True"


def test_events_about_a_stream_are_posted(cluster: Cluster) -> None:
    cluster.apply("""
apiVersion: auditwatch.dev/v1alpha1
kind: AuditStream
metadata:
  name: no-secret
spec:
  auth:
    bearer:
      secretRef:
        name: does-not-exist
""")
    event = cluster.wait_for(
        "a Warning Event about AuditStream no-secret in default",
        lambda: [
            e
            for e in cluster.events("default", "AuditStream", "no-secret")
            if e["type"] == "Warning"
        ],
    )[0]
    assert event["reason"] == "SecretNotFound"
    # kopf logs a refused Event as "Failed to post an event ... Code: 422": the
    # Event must be valid for the apiserver (a timestamp may well contain "422").
    assert "Failed to post an event" not in cluster.operator_log.read_text()
    cluster.kubectl("delete", "auditstream", "no-secret")


def test_the_leader_lease_is_held_and_renewed(cluster: Cluster) -> None:
    lease = cluster.wait_for(
        "the auditwatch Lease",
        lambda: (
            cluster.kubectl(
                "get", "lease", "auditwatch", "-n", "auditwatch", "-o", "json", check=False
            ).stdout
        ),
    )
    first = json.loads(lease)["spec"]
    assert first["holderIdentity"] == "auditwatch-test"
    time.sleep(3)
    second = cluster.get("lease", "auditwatch", "-n", "auditwatch")["spec"]
    assert second["holderIdentity"] == "auditwatch-test"
    assert second["renewTime"] != first["renewTime"]


def test_an_invalid_alert_says_where_and_recovers(cluster: Cluster) -> None:
    cluster.apply(alert("broken", 'verb = "get" and and'))
    broken = seed_alert_in_state(cluster, "broken", "Invalid")
    condition = ready(broken)
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidRule"
    assert "line 1, column" in condition["message"]
    warning = cluster.wait_for(
        "an InvalidRule Warning Event",
        lambda: [
            e
            for e in cluster.events("seed", "AuditAlert", "broken")
            if e["reason"] == "InvalidRule"
        ],
    )[0]
    assert warning["type"] == "Warning"
    # A fixed rule no request of the suite matches: `verb = "get"` alone would match the
    # suite's own kubectl calls, and the alert could be Firing before its first status write.
    cluster.apply(alert("broken", 'verb = "get" and objectRef.name = "no-such-object"'))
    fixed = seed_alert_in_state(cluster, "broken", "Listening")
    assert ready(fixed)["status"] == "True"
    cluster.wait_for(
        "a Valid Event",
        lambda: [
            e for e in cluster.events("seed", "AuditAlert", "broken") if e["reason"] == "Valid"
        ],
    )


def test_a_misspelt_target_field_is_named_whichever_way_it_is_applied(cluster: Cluster) -> None:
    """kubectl's validation names the field; applied without it (as a GitOps tool may), the
    apiserver prunes the unknown field and the alert says which target lacks what, not the
    apiserver's `<nil>: ... must validate one and only one schema (oneOf)`."""
    typo = alert("typo", 'verb = "get" and objectRef.name = "no-such-object"') + (
        "  targets: [{type: webhook, endpont: 'https://hooks.example.test/x'}]\n"
    )
    refused = cluster.kubectl("apply", "-f", "-", input=typo, check=False)
    assert refused.returncode != 0
    assert 'unknown field "endpont"' in refused.stderr
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=typo)
    invalid = seed_alert_in_state(cluster, "typo", "Invalid")
    condition = ready(invalid)
    assert condition["reason"] == "InvalidSpec"
    assert "spec.targets[0]: set one of endpoint, endpointSecretRef" in condition["message"]
    assert "<nil>" not in condition["message"]
    cluster.kubectl("delete", "auditalert", "typo", "-n", "seed")


def test_the_operator_ran_without_permission_errors(seed: Cluster) -> None:
    log = seed.operator_log.read_text()
    assert "forbidden" not in log.lower(), log[-3000:]


def test_a_stream_authenticated_by_client_certificate(cluster: Cluster) -> None:
    """The CRD takes spec.auth.clientCertificate, the operator reads the CA Secret with its RBAC,
    and the receiver accepts a certificate of that CA (and no other common name)."""
    pem = cluster.ca.pem.decode().replace("\n", "\n    ")
    cluster.apply(f"""
apiVersion: v1
kind: Secret
metadata:
  name: senders-ca
  namespace: auditwatch
stringData:
  ca.crt: |
    {pem}
---
apiVersion: auditwatch.dev/v1alpha1
kind: AuditStream
metadata:
  name: by-cert
spec:
  auth:
    clientCertificate:
      secretRef: {{name: senders-ca}}
      commonNames: [kube-apiserver]
""")
    cluster.wait_for_object(
        "by-cert Ready", lambda s: ready(s).get("status") == "True", "auditstream", "by-cert"
    )
    directory = cluster.root / "clients"
    directory.mkdir()
    good = cluster.ca.issue("kube-apiserver", server=False).write(directory, "good")
    other = cluster.ca.issue("someone", server=False).write(directory, "other")

    def post(cert: tuple[Path, Path] | None) -> int:
        context = ssl.create_default_context(cadata=cluster.ca.pem.decode())
        if cert is not None:
            context.load_cert_chain(*cert)
        request = urllib.request.Request(
            f"{cluster.receiver_url}/api/v1/logstream/by-cert",
            data=json.dumps(
                {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": []}
            ).encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert post(good) == 200
    assert post(other) == 403
    assert post(None) == 401


# -- the operator's own footprint, and its lifecycle through the real API (#10 item 3, #11) ------


def state(cluster: Cluster, name: str, namespace: str = "seed") -> dict[str, Any]:
    status: dict[str, Any] = cluster.get("auditalert", name, "-n", namespace).get("status", {})
    return status


def restart_operator(cluster: Cluster, *extra: str, namespace_from_context: bool = False) -> int:
    """The operator stopped and started again; the length of its log before the new start."""
    cluster.stop_process("operator")
    offset = len(cluster.operator_log.read_text())
    cluster.start_operator(*extra, namespace_from_context=namespace_from_context)
    cluster.wait_for(
        "the restarted operator leading with its configuration applied",
        lambda: "configuration:" in cluster.operator_log.read_text()[offset:],
    )
    return offset


def test_the_operator_reads_secrets_by_name_only(seed: Cluster) -> None:
    """#10 item 3: no list or watch of Secrets (kopf used to list and watch every Secret of the
    cluster), only GETs of the Secrets the resources name, as the apiserver's audit log shows."""
    reads = [
        e
        for e in seed.audit_events(OPERATOR_USER)
        if e.get("objectRef", {}).get("resource") == "secrets"
    ]
    assert reads, "the operator read no Secret at all"
    assert {e["verb"] for e in reads} == {"get"}
    assert {e["objectRef"]["name"] for e in reads} <= {
        "kube-audit-ingest",
        "auditdemo-ingest",
        "secret-read-webhook",
        "does-not-exist",
        "senders-ca",
    }


def test_last_match_shows_exactly_the_last_match(seed: Cluster) -> None:
    """#11 item 4: after a match with namespace and name, a cluster-wide list (neither) shows
    neither: no key stays from the match before.

    Only reads of `mysecret` and cluster-wide lists count: the admin's `kubectl apply` of other
    Secrets just before (a GET each) can reach the receiver after the alert exists."""
    seed.apply(f"""
apiVersion: auditwatch.dev/v1alpha1
kind: AuditAlert
metadata:
  name: admin-reads-secrets
  namespace: {OPERATOR_NAMESPACE}
spec:
  stream: kube-audit
  message: "{{user.username}} {{verb}} secrets"
  rule:
    type: composite
    config: >-
      objectRef.resource = "secrets" and verb in ("get", "list") and user.username = "admin"
      and (objectRef.name = "mysecret" or not objectRef.name exists)
""")
    seed.wait_for(  # Firing already: the seed's own apply of mysecret arrived late
        "admin-reads-secrets evaluated",
        lambda: (
            state(seed, "admin-reads-secrets", OPERATOR_NAMESPACE).get("state")
            in ("Listening", "Firing")
        ),
    )
    seed.kubectl("get", "secret", "mysecret", "-n", "seed")
    named = seed.wait_for(
        "a match of the named read",
        lambda: (
            (
                last := state(seed, "admin-reads-secrets", OPERATOR_NAMESPACE).get("lastMatch", {})
            ).get("name")
            == "mysecret"
            and last
        ),
    )
    assert named["namespace"] == "seed" and named["verb"] == "get"
    seed.kubectl("get", "secrets", "-A")
    listed = seed.wait_for(
        "a match of the cluster-wide list",
        lambda: (
            (
                last := state(seed, "admin-reads-secrets", OPERATOR_NAMESPACE).get("lastMatch", {})
            ).get("verb")
            == "list"
            and last
        ),
    )
    assert "namespace" not in listed and "name" not in listed, listed
    seed.kubectl("delete", "auditalert", "admin-reads-secrets", "-n", OPERATOR_NAMESPACE)


def test_a_stream_or_its_secret_gone_for_a_while_keeps_the_alerts(seed: Cluster) -> None:
    """#11 item 3: the stream's Secret, then the stream, deleted and created again (as a GitOps
    re-sync does): the alert is Invalid meanwhile with its state and counts, and then back where
    it was, without a second Firing Event."""
    restart_operator(seed, "--secret-refresh", "2")
    name = "seed-unauthorized"
    firing = seed.wait_for(
        f"{name} Firing after the restart",
        lambda: (status := state(seed, name)).get("state") == "Firing" and status,
    )
    assert firing["matches"] == 1

    def gone_and_back(*what: str) -> None:
        seed.kubectl("delete", *what)
        invalid = seed.wait_for(
            f"{name} Invalid without {what}",
            lambda: (status := state(seed, name)).get("state") == "Invalid" and status,
        )
        assert invalid["matches"] == 1
        assert invalid["lastMatch"] == firing["lastMatch"]
        seed.kubectl("apply", "-k", str(REPO / "examples/cluster"))
        back = seed.wait_for(
            f"{name} valid again with {what}",
            lambda: (status := state(seed, name)).get("state") != "Invalid" and status,
        )
        assert (back["state"], back["matches"]) == ("Firing", 1)

    gone_and_back("secret", "kube-audit-ingest", "-n", OPERATOR_NAMESPACE)
    gone_and_back("auditstream", "kube-audit")
    firings = [e for e in seed.events("seed", "AuditAlert", name) if e["reason"] == "Firing"]
    assert len(firings) == 1, firings


def test_an_apiserver_outage_of_ten_seconds_is_ridden_out(seed: Cluster) -> None:
    """#11 item 6: the operator neither exits nor loses its alerts while the apiserver is away
    for 10 s; it holds the Lease afterwards and keeps matching."""
    name = "seed-unauthorized"
    before = state(seed, name)["matches"]
    seed.restart_apiserver(down_seconds=10)
    time.sleep(3)
    assert seed.processes["operator"].poll() is None, "the operator exited"
    lease = seed.wait_for_object(
        "the Lease renewed by the operator after the outage",
        lambda lease: lease["spec"].get("holderIdentity") == "auditwatch-test",
        "lease",
        "auditwatch",
        "-n",
        OPERATOR_NAMESPACE,
    )
    seed.kubectl(
        "get", "secret", "mysecret", "-n", "seed", token=seed.token("seed", "unauthorized-user")
    )
    after = seed.wait_for(
        f"{name} matching after the outage",
        lambda: (status := state(seed, name)).get("matches", 0) > before and status,
    )
    assert after["state"] == "Firing"
    renewed = seed.get("lease", "auditwatch", "-n", OPERATOR_NAMESPACE)["spec"]
    assert renewed["holderIdentity"] == "auditwatch-test"
    assert renewed["renewTime"] >= lease["spec"]["renewTime"]
    assert seed.processes["operator"].poll() is None


def test_run_locally_takes_its_namespace_from_the_kubeconfig_context(seed: Cluster) -> None:
    """#11 item 5: without $AUDITWATCH_NAMESPACE the operator's namespace is the kubeconfig
    context's (not `default`), so the stream finds its Secret and the alerts stay valid."""
    offset = restart_operator(seed, namespace_from_context=True)
    log = seed.operator_log.read_text()[offset:]
    assert "operator namespace 'auditwatch' (from the kubeconfig's current context)" in log
    assert state(seed, "seed-unauthorized")["state"] == "Firing"
    assert "SecretNotFound" not in json.dumps(seed.get("auditstream", "kube-audit"))


def test_an_idle_cluster_does_not_feed_on_the_operators_own_calls(seed: Cluster) -> None:
    """#10 item 3: with no user activity, the operator's own calls (Lease renewals, status
    patches) are not recorded, so they do not feed its stream's counts and so its status: after
    the start has settled, the operator makes no recorded request and no AuditAlert is written.
    (The apiserver's own requests still count, so the stream's eventsReceived may move.)"""
    restart_operator(seed, "--secret-refresh", "3600")

    def alert_versions() -> dict[str, str]:
        listed = seed.get("auditalerts", "-A")["items"]
        return {
            f"{i['metadata']['namespace']}/{i['metadata']['name']}": i["metadata"][
                "resourceVersion"
            ]
            for i in listed
        }

    # The start writes for a while: the restarted operator reads its streams' Secrets by name,
    # the default trust list excepts those reads in k8s-secret-read, and that count is written
    # within the counts' write interval (30 s). Then it must settle: no alert written for longer
    # than that interval (a loop feeding on its own calls would write every interval).
    deadline = time.monotonic() + 150
    settled, quiet_since = alert_versions(), time.monotonic()
    since = len(seed.audit_events(OPERATOR_USER))
    while time.monotonic() - quiet_since < 35:
        assert time.monotonic() < deadline, f"alerts still written on an idle cluster: {settled}"
        time.sleep(2)
        if (versions := alert_versions()) != settled:
            settled, quiet_since = versions, time.monotonic()
            since = len(seed.audit_events(OPERATOR_USER))
    recorded = [
        (e["verb"], e.get("objectRef", {}).get("resource"))
        for e in seed.audit_events(OPERATOR_USER)[since:]
        if e["verb"] != "watch"
    ]
    assert not recorded, recorded
