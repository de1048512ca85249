"""A real Kubernetes control plane on loopback for end-to-end tests: etcd + kube-apiserver 1.20,
its audit webhook pointed at a real `auditwatch run` over HTTPS with a bearer token.

`start()` brings up, in a temporary directory: a CA and certificates (the `cryptography`
package), etcd, the apiserver (token auth, RBAC, the audit policy of examples/cluster/, the
webhook kubeconfig made from examples/cluster/apiserver-webhook-kubeconfig.yaml), applies
`manifests/` and `examples/cluster/` with kubectl, and starts the operator as the `auditwatch`
ServiceAccount of manifests/rbac.yaml (a TokenRequest token in a kubeconfig), so RBAC gaps show.
The apiserver also writes its audit events to `audit.log` (`Cluster.audit_events`), a record
of what the operator did that does not depend on the operator.
With `controllers=True` it also runs kube-controller-manager (each controller as its own
ServiceAccount) and kube-scheduler, so the audit trail carries real control-plane traffic;
`users` adds people to the token file (`Cluster.user_tokens`).
Binaries: $AUDITWATCH_KUBE_APISERVER (the controllers beside it: how to get them is in
docs/operator.md, "Real control-plane tests"), etcd and kubectl on PATH. Tests use
`Cluster.kubectl`, `Cluster.wait_for`, `Cluster.restart_apiserver` and `Cluster.operator_log`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.certs import CA
from tests.e2e_support import free_port

REPO = Path(__file__).resolve().parent.parent
APISERVER_VARIABLE = "AUDITWATCH_KUBE_APISERVER"
BINARIES_HELP = 'see docs/operator.md, "Real control-plane tests"'
ADMIN_TOKEN = "admin-token"
OPERATOR_NAMESPACE = "auditwatch"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:auditwatch"
CONTROLLERS = ("kube-controller-manager", "kube-scheduler")
CONTROLLER_TOKENS = {
    "kube-controller-manager": ("cm-token", "system:kube-controller-manager"),
    "kube-scheduler": ("sched-token", "system:kube-scheduler"),
}
"""Token-file identities of the controllers, as the apiserver's default RBAC names them."""
STREAM_TOKEN = "change-me-kube-audit"
"""The kube-audit stream's token, as examples/cluster/kube-audit-stream.yaml sets it."""
T = TypeVar("T")


def missing_tools() -> str | None:
    """Why the real control plane cannot run here (None: it can)."""
    apiserver = os.environ.get(APISERVER_VARIABLE)
    if not apiserver:
        return f"${APISERVER_VARIABLE} is not set ({BINARIES_HELP})"
    if not os.access(apiserver, os.X_OK):
        return f"${APISERVER_VARIABLE}={apiserver} is not an executable"
    for tool in ("etcd", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    return None


def missing_controllers() -> str | None:
    """Why kube-controller-manager and kube-scheduler cannot run here (None: they can)."""
    missing = missing_tools()
    if missing is not None:
        return missing
    for name in CONTROLLERS:
        binary = Path(os.environ[APISERVER_VARIABLE]).parent / name
        if not os.access(binary, os.X_OK):
            return f"{binary} is not an executable ({BINARIES_HELP})"
    return None


@dataclass(frozen=True)
class User:
    """A person in the apiserver's token file."""

    name: str
    token: str
    groups: tuple[str, ...] = ()


def kubeconfig(server: str, ca_pem: bytes, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }


def _write_yaml(path: Path, value: Any) -> Path:
    path.write_text(yaml.safe_dump(value))
    return path


@dataclass
class Cluster:
    """A running control plane and operator; see the module docstring."""

    root: Path
    apiserver_args: list[str]
    server: str
    ca: CA
    admin_kubeconfig: Path
    receiver_url: str
    operator_log: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    user_tokens: dict[str, str] = field(default_factory=dict)
    """Token of each `User` given to `start`, by name."""

    # -- kubectl -----------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as the cluster admin (or as the holder of `token`)."""
        command = ["kubectl", "--kubeconfig", str(self.admin_kubeconfig)]
        if token is not None:
            command += ["--token", token]
        result = subprocess.run(
            [*command, *args], input=input, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def get(self, *args: str) -> dict[str, Any]:
        """`kubectl get ARGS -o json`, parsed."""
        value: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return value

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=manifest)

    def token(self, namespace: str, service_account: str) -> str:
        """A TokenRequest token of the ServiceAccount (one hour)."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        answer = self.kubectl("create", "--raw", path, "-f", "-", input=json.dumps(request))
        return str(json.loads(answer.stdout)["status"]["token"])

    def events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        items: list[dict[str, Any]] = self.get(
            "events", "-n", namespace, "--field-selector", selector
        )["items"]
        return items

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
        """The first truthy value of `probe`, polled; AssertionError naming `what` after
        `timeout` seconds (with the operator's last log lines)."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = "\n".join(self.operator_log.read_text().splitlines()[-30:])
                raise AssertionError(f"timed out waiting for {what}; operator log:\n{tail}")
            time.sleep(0.3)

    def wait_for_object(
        self,
        what: str,
        predicate: Callable[[dict[str, Any]], bool],
        *args: str,
        timeout: float = 60,
    ) -> dict[str, Any]:
        """`kubectl get ARGS` once `predicate` holds for it."""

        def probe() -> dict[str, Any] | None:
            obj = self.get(*args)
            return obj if predicate(obj) else None

        return self.wait_for(what, probe, timeout)

    def audit_events(self, username: str | None = None) -> list[dict[str, Any]]:
        """The apiserver's audit log so far (of `username` only, when given)."""
        path = self.root / "audit.log"
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in events if username is None or e["user"]["username"] == username]

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _ready(self) -> bool:
        context = ssl.create_default_context(cadata=self.ca.pem.decode())
        request = urllib.request.Request(
            f"{self.server}/api/v1/namespaces/default",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=2) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def start_apiserver(self) -> None:
        self._spawn("kube-apiserver", self.apiserver_args)
        deadline = time.monotonic() + 60
        while not self._ready():
            process = self.processes["kube-apiserver"]
            if process.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "kube-apiserver.log").read_text()[-3000:]
                raise RuntimeError(f"kube-apiserver did not come up:\n{log}")
            time.sleep(0.3)

    def stop_process(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart_apiserver(self, down_seconds: float = 0) -> None:
        """Stop the apiserver, keep it down for `down_seconds`, start it again (etcd keeps
        the state)."""
        self.stop_process("kube-apiserver")
        time.sleep(down_seconds)
        self.start_apiserver()

    def start_operator(self, *extra: str, namespace_from_context: bool = False) -> None:
        """`auditwatch run` as the auditwatch ServiceAccount, HTTPS on the receiver's port.

        Its namespace from $AUDITWATCH_NAMESPACE, or with `namespace_from_context` from the
        kubeconfig's current context only (as when run from a laptop)."""
        token = self.token(OPERATOR_NAMESPACE, "auditwatch")
        config = kubeconfig(self.server, self.ca.pem, token)
        env = {**os.environ, "AUDITWATCH_POD_NAME": "auditwatch-test"}
        env.pop("AUDITWATCH_NAMESPACE", None)
        if namespace_from_context:
            config["contexts"][0]["context"]["namespace"] = OPERATOR_NAMESPACE
        else:
            env["AUDITWATCH_NAMESPACE"] = OPERATOR_NAMESPACE
        env["KUBECONFIG"] = str(_write_yaml(self.root / "operator.kubeconfig", config))
        port = self.receiver_url.rsplit(":", 1)[1]
        self._spawn(
            "operator",
            [
                sys.executable,
                "-m",
                "auditwatch",
                "run",
                "--data",
                str(self.root / "data"),
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--decode-workers",
                "0",
                "--tls-cert",
                str(self.root / "receiver.crt"),
                "--tls-key",
                str(self.root / "receiver.key"),
                *extra,
            ],
            env,
        )

    def start_controllers(self) -> None:
        """kube-controller-manager and kube-scheduler with the flags of the build README:
        every controller as its own ServiceAccount, no leader election."""
        binaries = Path(os.environ[APISERVER_VARIABLE]).parent
        for name in CONTROLLERS:
            token = CONTROLLER_TOKENS[name][0]
            _write_yaml(
                self.root / f"{name}.kubeconfig", kubeconfig(self.server, self.ca.pem, token)
            )
        self._spawn(
            "kube-controller-manager",
            [
                str(binaries / "kube-controller-manager"),
                f"--kubeconfig={self.root / 'kube-controller-manager.kubeconfig'}",
                "--port=0",
                "--secure-port=0",
                f"--service-account-private-key-file={self.root / 'sa.key'}",
                f"--root-ca-file={self.root / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--controllers=*,-csrsigning",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(binaries / "kube-scheduler"),
                f"--kubeconfig={self.root / 'kube-scheduler.kubeconfig'}",
                "--port=0",
                "--secure-port=0",
                "--leader-elect=false",
            ],
        )

    def stop(self) -> None:
        for name in ("operator", *CONTROLLERS, "kube-apiserver", "etcd"):
            self.stop_process(name)


def _apiserver_args(root: Path, etcd: str, port: int, webhook: Path) -> list[str]:
    return [
        os.environ[APISERVER_VARIABLE],
        f"--etcd-servers={etcd}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        "--insecure-port=0",
        f"--tls-cert-file={root / 'apiserver.crt'}",
        f"--tls-private-key-file={root / 'apiserver.key'}",
        f"--token-auth-file={root / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={root / 'sa.pub'}",
        f"--service-account-signing-key-file={root / 'sa.key'}",
        "--service-cluster-ip-range=10.96.0.0/16",
        f"--audit-policy-file={REPO / 'examples/cluster/audit-policy.yaml'}",
        f"--audit-webhook-config-file={webhook}",
        f"--audit-log-path={root / 'audit.log'}",
        "--audit-webhook-batch-max-wait=1s",
        "--audit-webhook-initial-backoff=1s",
        # exec and attach reach a node's kubelet (tests/fake_kubelet.py) over verified TLS
        f"--kubelet-certificate-authority={root / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        "--enable-admission-plugins=ServiceAccount",
        "--disable-admission-plugins=StorageObjectInUseProtection",
    ]


def webhook_kubeconfig(receiver_url: str, ca_pem: bytes) -> dict[str, Any]:
    """examples/cluster/apiserver-webhook-kubeconfig.yaml with this receiver's address and CA."""
    config: dict[str, Any] = yaml.safe_load(
        (REPO / "examples/cluster/apiserver-webhook-kubeconfig.yaml").read_text()
    )
    cluster = config["clusters"][0]["cluster"]
    path = cluster["server"].split("/api/v1/", 1)[1]
    cluster["server"] = f"{receiver_url}/api/v1/{path}"
    cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return config


def start(root: Path, *, controllers: bool = False, users: Sequence[User] = ()) -> Cluster:
    """The control plane with manifests/ and examples/cluster/ applied, and the operator; with
    `controllers`, kube-controller-manager and kube-scheduler too (see the module docstring)."""
    ca = CA("auditwatch e2e CA")
    (root / "ca.crt").write_bytes(ca.pem)
    ca.issue("kube-apiserver").write(root, "apiserver")
    ca.issue("auditwatch").write(root, "receiver")
    ca.issue("kubelet").write(root, "kubelet")
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (root / "sa.key").write_bytes(
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (root / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    lines = [f'{ADMIN_TOKEN},admin,1,"system:masters"']
    if controllers:
        lines += [f"{token},{name},{name}" for token, name in CONTROLLER_TOKENS.values()]
    lines += [
        ",".join([u.token, u.name, u.name, f'"{",".join(u.groups)}"'][: 4 if u.groups else 3])
        for u in users
    ]
    (root / "tokens.csv").write_text("\n".join(lines) + "\n")
    port, etcd_port, peer_port, receiver_port = (free_port() for _ in range(4))
    receiver_url = f"https://127.0.0.1:{receiver_port}"
    webhook = _write_yaml(root / "webhook.kubeconfig", webhook_kubeconfig(receiver_url, ca.pem))
    etcd = f"http://127.0.0.1:{etcd_port}"
    server = f"https://127.0.0.1:{port}"
    cluster = Cluster(
        root=root,
        apiserver_args=_apiserver_args(root, etcd, port, webhook),
        server=server,
        ca=ca,
        admin_kubeconfig=_write_yaml(
            root / "admin.kubeconfig", kubeconfig(server, ca.pem, ADMIN_TOKEN)
        ),
        receiver_url=receiver_url,
        operator_log=root / "operator.log",
        user_tokens={u.name: u.token for u in users},
    )
    try:
        cluster._spawn(
            "etcd",
            [
                "etcd",
                "--data-dir",
                str(root / "etcd"),
                "--listen-client-urls",
                etcd,
                "--advertise-client-urls",
                etcd,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
            ],
        )
        cluster.start_apiserver()
        if controllers:
            cluster.start_controllers()
        cluster.kubectl("apply", "-k", str(REPO / "manifests"))
        cluster.kubectl(
            "wait",
            "--for=condition=established",
            "crd/auditstreams.auditwatch.dev",
            "crd/auditalerts.auditwatch.dev",
        )
        cluster.kubectl("apply", "-k", str(REPO / "examples/cluster"))
        cluster.start_operator()
    except BaseException:
        cluster.stop()
        raise
    return cluster
