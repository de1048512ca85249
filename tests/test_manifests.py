"""The deployment files: the kustomize base, the Argo CD health check, the Dockerfile, and the
cluster example (streams, alert, audit policy, webhook kubeconfig, Vector / Fluent Bit values).

The kustomizations are rendered with `kubectl kustomize` (kustomize v5 inside kubectl); the health
check runs under real Lua interpreters (Argo CD runs Lua 5.1). Each test needing a binary skips
only when that binary is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from tests.kubefake import KubeFake, ResourceType

from auditwatch.config import build, schema
from auditwatch.config.files import read_documents
from auditwatch.config.model import ConfigError
from auditwatch.rules.reference import matches

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
CLUSTER = ROOT / "examples" / "cluster"
OPERATOR_NAMESPACE = "auditwatch"
LUA_INTERPRETERS = ("lua5.1", "lua5.4")
"""lua5.1 is the dialect of Argo CD's gopher-lua; lua5.4 guards against relying on 5.1 quirks."""

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would send."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        item
        for item in objects
        if item["kind"] == kind and (name is None or item["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return kustomize(MANIFESTS)


@pytest.fixture(scope="module")
def container(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(rendered, "Deployment", "auditwatch")["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


# --- the kustomize base -------------------------------------------------------------------------


def test_every_object_is_well_formed_and_namespaced_ones_land_in_auditwatch(
    rendered: list[dict[str, Any]],
) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for item in rendered:
        assert item.get("apiVersion") and item.get("kind"), item
        assert item.get("metadata", {}).get("name"), item
        if item["kind"] in cluster_scoped:
            assert "namespace" not in item["metadata"], item["metadata"]
        else:
            assert item["metadata"]["namespace"] == OPERATOR_NAMESPACE, item["metadata"]
    assert only(rendered, "Namespace")["metadata"]["name"] == OPERATOR_NAMESPACE


def test_the_base_installs_the_crds_of_crds_directory_unchanged(
    rendered: list[dict[str, Any]],
) -> None:
    for kind in schema.KINDS:
        crd = only(rendered, "CustomResourceDefinition", f"{kind.lower()}s.{schema.GROUP}")
        assert crd == schema.crd(kind)


def test_the_deployment_runs_as_non_root_on_a_read_only_root(
    rendered: list[dict[str, Any]], container: dict[str, Any]
) -> None:
    pod = only(rendered, "Deployment", "auditwatch")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_the_probes_ask_the_receivers_health_endpoints_on_its_port(
    container: dict[str, Any],
) -> None:
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in [
        ("livenessProbe", "/api/v1/liveness"),
        ("readinessProbe", "/api/v1/readiness"),
        ("startupProbe", "/api/v1/liveness"),
    ]:
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_names[get["port"]] == listening_port(container), probe


def listening_port(container: dict[str, Any]) -> int:
    """The --port the container's command line gives `auditwatch run`."""
    args = container["args"]
    assert args[0] == "run"
    return int(args[args.index("--port") + 1])


def test_the_data_directory_is_the_persistent_volume_and_tmp_is_writable(
    rendered: list[dict[str, Any]], container: dict[str, Any]
) -> None:
    deployment = only(rendered, "Deployment", "auditwatch")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    args = container["args"]
    data_dir = args[args.index("--data") + 1]
    claim = volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"]
    pvc = only(rendered, "PersistentVolumeClaim", claim)
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # A ReadWriteOnce volume holds one pod: a rolling update would hang on the attach.
    if pvc["spec"]["accessModes"] == ["ReadWriteOnce"]:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_the_service_reaches_the_container_port_of_the_selected_pods(
    rendered: list[dict[str, Any]], container: dict[str, Any]
) -> None:
    service = only(rendered, "Service", "auditwatch")
    pod_labels = only(rendered, "Deployment", "auditwatch")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    container_ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    assert container_ports[port["targetPort"]] == listening_port(container) == port["port"]


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every permission of an RBAC rule list."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_cluster_role_grants_exactly_what_the_operator_uses(
    rendered: list[dict[str, Any]],
) -> None:
    rules = only(rendered, "ClusterRole", "auditwatch")["rules"]
    expected = {
        *(
            ("auditwatch.dev", resource, verb)
            for resource in ("auditstreams", "auditalerts")
            for verb in ("get", "list", "watch", "patch")
        ),
        ("auditwatch.dev", "auditstreams/status", "patch"),
        ("auditwatch.dev", "auditalerts/status", "patch"),
        ("", "secrets", "get"),
        ("", "events", "create"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        *(
            ("apiextensions.k8s.io", "customresourcedefinitions", verb)
            for verb in ("get", "list", "watch")
        ),
    }
    assert granted(rules) == expected
    assert not any("resourceNames" in rule or "nonResourceURLs" in rule for rule in rules)


def test_leader_election_may_touch_only_its_own_lease(rendered: list[dict[str, Any]]) -> None:
    rules = only(rendered, "Role", "auditwatch-leader-election")["rules"]
    assert granted(rules) == {
        ("coordination.k8s.io", "leases", verb) for verb in ("create", "get", "update")
    }
    for rule in rules:
        # `create` cannot be limited by name; everything else is.
        assert rule.get("resourceNames") == (
            None if rule["verbs"] == ["create"] else ["auditwatch"]
        )


def test_no_rule_uses_a_wildcard(rendered: list[dict[str, Any]]) -> None:
    for item in rendered:
        if item["kind"] in {"ClusterRole", "Role"}:
            for rule in item["rules"]:
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert not any("*" in value for value in rule.get(key, [])), (item, rule)


def test_both_bindings_bind_the_deployments_service_account(
    rendered: list[dict[str, Any]],
) -> None:
    account = only(rendered, "Deployment", "auditwatch")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    only(rendered, "ServiceAccount", account)
    for kind, role_kind, role in [
        ("ClusterRoleBinding", "ClusterRole", "auditwatch"),
        ("RoleBinding", "Role", "auditwatch-leader-election"),
    ]:
        binding = only(rendered, kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": role,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": OPERATOR_NAMESPACE}
        ]


# --- Argo CD health check -----------------------------------------------------------------------

HEALTH_LUA = MANIFESTS / "argocd" / "health.lua"


@needs_kubectl
def test_argocd_cm_carries_the_health_check_for_both_kinds() -> None:
    config_map = only(kustomize(MANIFESTS / "argocd"), "ConfigMap", "argocd-cm")
    assert config_map["metadata"]["namespace"] == "argocd"
    assert config_map["data"] == {
        f"resource.customizations.health.{schema.GROUP}_{kind}": HEALTH_LUA.read_text()
        for kind in schema.KINDS
    }


def lua_literal(value: Any) -> str:
    """A JSON value as a Lua expression (tables for objects and arrays), as Argo CD passes `obj`."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            f"\\{ord(char):03d}" if char in '"\\' or ord(char) < 32 else char for char in value
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items())
            + "}"
        )
    raise TypeError(f"not a JSON value: {value!r}")


def lua_interpreters() -> Iterator[Any]:
    for name in LUA_INTERPRETERS:
        yield pytest.param(
            name,
            marks=pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} is not installed"),
        )


def health(interpreter: str, resource: dict[str, Any]) -> tuple[str, str]:
    """(status, message) that health.lua gives `resource`, run the way Argo CD runs it."""
    script = (
        f"obj = {lua_literal(resource)}\n"
        f"local hs = (function()\n{HEALTH_LUA.read_text()}\nend)()\n"
        'io.write(hs.status, "\\n", hs.message or "")\n'
    )
    result = subprocess.run(
        [interpreter, "-"], input=script, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.partition("\n")
    return status, message


def alert(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "apiVersion": schema.API_VERSION,
        "kind": "AuditAlert",
        "metadata": {"name": "secret-read", "namespace": "default", "generation": generation},
        "spec": {"stream": "auditdemo", "message": "m", "rule": {"type": "composite"}},
    }
    if status is not None:
        resource["status"] = status
    return resource


def ready(status: str, reason: str, message: str, generation: int = 3) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }


HEALTH_CASES = [
    ("never reconciled", alert(3, None), "Progressing", "Waiting for auditwatch"),
    (
        "spec changed since the last reconcile",
        alert(3, {"observedGeneration": 2, "conditions": [ready("True", "Listening", "ok", 2)]}),
        "Progressing",
        "generation 3",
    ),
    (
        "no Ready condition yet",
        alert(3, {"observedGeneration": 3, "state": "Listening", "conditions": []}),
        "Progressing",
        "Ready",
    ),
    (
        "the Ready condition is older than the spec",
        alert(3, {"observedGeneration": 3, "conditions": [ready("True", "Listening", "ok", 2)]}),
        "Progressing",
        "generation 3",
    ),
    (
        "ready and firing",
        alert(
            3,
            {
                "observedGeneration": 3,
                "state": "Firing",
                "conditions": [
                    {**ready("False", "Other", "x"), "type": "Delivered"},
                    ready("True", "Firing", 'matched "get secrets" by mallory\n'),
                ],
            },
        ),
        "Healthy",
        'matched "get secrets" by mallory\n',
    ),
    (
        "invalid rule",
        alert(
            3,
            {
                "observedGeneration": 3,
                "state": "Invalid",
                "conditions": [ready("False", "InvalidRule", "expected value at line 1, column 9")],
            },
        ),
        "Degraded",
        "InvalidRule: expected value at line 1, column 9",
    ),
    (
        "ready unknown",
        alert(3, {"observedGeneration": 3, "conditions": [ready("Unknown", "Starting", "s")]}),
        "Progressing",
        "s",
    ),
    (
        "a stream without observedGeneration anywhere",
        {
            "apiVersion": schema.API_VERSION,
            "kind": "AuditStream",
            "metadata": {"name": "auditdemo", "generation": 1},
            "status": {
                "eventsReceived": 12,
                "conditions": [
                    {
                        key: value
                        for key, value in ready("True", "Receiving", "ok").items()
                        if key != "observedGeneration"
                    }
                ],
            },
        },
        "Healthy",
        "ok",
    ),
]


@pytest.mark.parametrize("interpreter", list(lua_interpreters()))
@pytest.mark.parametrize(
    ("resource", "status", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in HEALTH_CASES],
)
def test_health_lua_reads_ready_and_observed_generation(
    interpreter: str, resource: dict[str, Any], status: str, message: str
) -> None:
    got_status, got_message = health(interpreter, resource)
    assert got_status == status
    if status == "Progressing":
        assert message in got_message
    else:
        assert got_message == message


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments), one list per stage, lines joined."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        keyword, _, arguments = logical.strip().partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def instruction(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [arguments for name, arguments in stage if name == keyword]
    assert values, f"no {keyword} in the stage"
    return values[-1]


def test_the_image_runs_the_console_script_as_the_pods_user() -> None:
    *_, final = dockerfile_stages()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(instruction(final, "ENTRYPOINT")) == ["auditwatch"]
    assert "auditwatch" in scripts
    assert json.loads(instruction(final, "CMD")) == ["run"]
    assert instruction(final, "USER").split(":")[0] == "65532"
    assert "PYTHONDONTWRITEBYTECODE=1" in instruction(final, "ENV")


def test_the_image_matches_what_the_deployment_expects(rendered: list[dict[str, Any]]) -> None:
    *_, final = dockerfile_stages()
    pod = only(rendered, "Deployment", "auditwatch")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert int(instruction(final, "EXPOSE")) == listening_port(container)
    args = container["args"]
    assert json.loads(instruction(final, "VOLUME")) == [args[args.index("--data") + 1]]
    assert str(pod["securityContext"]["runAsUser"]) == instruction(final, "USER").split(":")[0]


def test_the_final_stage_copies_the_environment_built_on_the_same_python() -> None:
    """A venv's interpreter is a symlink into its base image: both stages must share it."""
    build_stage, final = dockerfile_stages()
    assert instruction(build_stage, "FROM").split()[0] == instruction(final, "FROM")
    copied = [args for name, args in final if name == "COPY"]
    assert copied == ["--from=build /opt/auditwatch /opt/auditwatch"]
    assert not any(name == "RUN" and "pip" in args for name, args in final)


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` stay within one."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        elif pattern[index] == "[":
            close = pattern.index("]", index)
            regex, index = regex + pattern[index : close + 1], close + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, with /) out of the build context.

    Docker's rule: the last pattern matching the path or one of its parent directories decides;
    `!` patterns re-include.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        regex = dockerignore_regex(pattern.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_every_file_the_build_copies_is_in_the_build_context() -> None:
    build_stage, _ = dockerfile_stages()
    sources = [
        source
        for name, args in build_stage
        if name == "COPY"
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    ]
    assert "operator/" in sources and "pyproject.toml" in sources
    for source in sources:
        assert not docker_ignored(source.rstrip("/")), source
    for module in (ROOT / "operator" / "auditwatch").rglob("*.py"):
        assert not docker_ignored(module.relative_to(ROOT).as_posix()), module
    for stray in ("tests/test_manifests.py", ".git/HEAD", "data/wal", "operator/x/__pycache__"):
        assert docker_ignored(stray), stray


# --- the cluster example ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_objects() -> list[dict[str, Any]]:
    files = documents(CLUSTER / "kustomization.yaml")[0]["resources"]
    return [item for file in files for item in documents(CLUSTER / file)]


def secret_lookup(objects: list[dict[str, Any]]) -> build.SecretLookup:
    """Secrets of the example as the operator finds them: no namespace means the operator's."""
    values = {
        (item["metadata"]["namespace"], item["metadata"]["name"]): item.get("stringData", {})
        for item in objects
        if item["kind"] == "Secret"
    }

    def lookup(namespace: str | None, name: str, key: str) -> str | None:
        value = values.get((namespace or OPERATOR_NAMESPACE, name), {}).get(key)
        return None if value is None else str(value)

    return lookup


@needs_kubectl
def test_the_example_kustomization_renders_every_file_it_names(
    example_objects: list[dict[str, Any]],
) -> None:
    names = sorted((item["kind"], item["metadata"]["name"]) for item in example_objects)
    assert sorted((item["kind"], item["metadata"]["name"]) for item in kustomize(CLUSTER)) == names


def test_the_example_resources_validate_against_the_crds(
    example_objects: list[dict[str, Any]],
) -> None:
    custom = [item for item in example_objects if item["apiVersion"] == schema.API_VERSION]
    assert {item["kind"] for item in custom} == set(schema.KINDS)
    for item in custom:
        assert schema.validate(item) == [], item["metadata"]["name"]


def test_the_example_streams_and_alert_resolve_their_secrets(
    example_objects: list[dict[str, Any]],
) -> None:
    lookup = secret_lookup(example_objects)
    streams = {
        item["metadata"]["name"]: build.build_stream(item, lookup, OPERATOR_NAMESPACE)
        for item in example_objects
        if item["kind"] == "AuditStream"
    }
    alert_resource = only(example_objects, "AuditAlert", "secret-read")
    built = build.build_alert(alert_resource, lookup)
    assert build.check_stream(built, streams).cluster_wide  # the operator's namespace
    tenant = build.build_alert(alert_resource, lookup)
    tenant = dataclasses.replace(tenant, namespace="team")  # the same alert, owned by a team
    assert build.check_stream(tenant, streams).scope == "team"
    auditdemo, kube_audit = streams["auditdemo"].auth, streams["kube-audit"].auth
    assert auditdemo is not None and auditdemo.username and auditdemo.password
    assert kube_audit is not None and kube_audit.bearer_token
    (target,) = built.targets
    assert target.endpoint.startswith("https://")
    # The alert's Secrets are looked up in the alert's namespace, not the operator's.
    elsewhere = [
        {**item, "metadata": {**item["metadata"], "namespace": "default"}}
        if item["kind"] == "Secret" and item["metadata"]["name"] == "secret-read-webhook"
        else item
        for item in example_objects
    ]
    with pytest.raises(ConfigError) as error:
        build.build_alert(alert_resource, secret_lookup(elsewhere))
    assert error.value.reason == "SecretNotFound"


def test_the_seed_alert_fires_on_secret_reads_except_by_the_authorized_user(
    example_objects: list[dict[str, Any]], samples: Path
) -> None:
    alert = build.build_alert(
        only(example_objects, "AuditAlert", "secret-read"), secret_lookup(example_objects)
    )
    assert alert.unless is not None

    def reported(event: dict[str, Any]) -> bool:
        assert alert.unless is not None
        return matches(alert.rule.condition, event) and not matches(alert.unless, event)

    events = [
        json.loads(line)
        for line in (samples / "secret-recon-then-exec.log").read_text().splitlines()
        if line.strip()
    ]
    fired = [event for event in events if reported(event)]
    assert fired
    assert all(event["objectRef"]["resource"] == "secrets" for event in fired)
    assert {event["user"]["username"] for event in fired} == {"mayor-malware"}
    for username, excepted in (
        ("system:serviceaccount:default:authorized-user", True),
        ("system:serviceaccount:default:unauthorized-user", False),
    ):
        assert reported({**fired[0], "user": {"username": username}}) is not excepted


def test_the_apiserver_webhook_posts_to_the_node_port_with_the_streams_token(
    example_objects: list[dict[str, Any]],
) -> None:
    kubeconfig = documents(CLUSTER / "apiserver-webhook-kubeconfig.yaml")[0]
    (cluster,) = kubeconfig["clusters"]
    (user,) = kubeconfig["users"]
    server = urlsplit(cluster["cluster"]["server"])
    node_port = only(example_objects, "Service", "auditwatch-webhook")
    (port,) = node_port["spec"]["ports"]
    assert server.port == port["nodePort"]
    assert not server.hostname or not server.hostname.endswith(".svc")
    prefix, _, stream_name = server.path.rpartition("/")
    assert prefix == "/api/v1/logstream"
    stream = build.build_stream(
        only(example_objects, "AuditStream", stream_name), secret_lookup(example_objects)
    )
    assert stream.auth is not None and user["user"]["token"] == stream.auth.bearer_token
    context = only([{"kind": "Context", "metadata": c} for c in kubeconfig["contexts"]], "Context")[
        "metadata"
    ]
    assert context["name"] == kubeconfig["current-context"]
    assert context["context"] == {"cluster": cluster["name"], "user": user["name"]}


def test_kind_mounts_the_policy_and_kubeconfig_where_the_apiserver_flags_point() -> None:
    config = documents(CLUSTER / "kind-config.yaml")[0]
    (node,) = config["nodes"]
    mounted = {mount["containerPath"]: mount["hostPath"] for mount in node["extraMounts"]}
    for host_path in mounted.values():
        assert (CLUSTER / host_path).is_file(), host_path
    (patch,) = node["kubeadmConfigPatches"]
    api_server = yaml.safe_load(patch)["apiServer"]
    flags = api_server["extraArgs"]
    assert Path(mounted[flags["audit-policy-file"]]).name == "audit-policy.yaml"
    assert (
        Path(mounted[flags["audit-webhook-config-file"]]).name
        == "apiserver-webhook-kubeconfig.yaml"
    )
    (volume,) = api_server["extraVolumes"]
    for flag in ("audit-policy-file", "audit-webhook-config-file"):
        assert Path(flags[flag]).parent == Path(volume["mountPath"]) == Path(volume["hostPath"])


# --- the audit policy ---------------------------------------------------------------------------


def audit_level(
    verb: str,
    resource: str,
    group: str = "",
    user: str = "alice",
    groups: tuple[str, ...] = ("system:authenticated",),
    namespace: str = "default",
) -> str:
    """The level the apiserver gives a resource request under audit-policy.yaml (first match)."""
    policy = documents(CLUSTER / "audit-policy.yaml")[0]
    for rule in policy["rules"]:
        if "users" in rule and user not in rule["users"]:
            continue
        if "userGroups" in rule and not set(groups) & set(rule["userGroups"]):
            continue
        if "verbs" in rule and verb not in rule["verbs"]:
            continue
        if "namespaces" in rule and namespace not in rule["namespaces"]:
            continue
        if "nonResourceURLs" in rule:
            continue
        if "resources" in rule and not any(
            kinds["group"] == group and resource in kinds["resources"]
            for kinds in rule["resources"]
        ):
            continue
        level: str = rule["level"]
        return level
    return "None"


def test_the_audit_policy_is_a_v1_policy_that_skips_request_received() -> None:
    policy = documents(CLUSTER / "audit-policy.yaml")[0]
    assert (policy["apiVersion"], policy["kind"]) == ("audit.k8s.io/v1", "Policy")
    assert policy["omitStages"] == ["RequestReceived"]
    assert policy["rules"][-1] == {"level": "Metadata"}


@pytest.mark.parametrize(
    ("verb", "resource", "group", "level"),
    [
        ("get", "secrets", "", "Metadata"),
        ("create", "secrets", "", "Metadata"),
        ("update", "secrets", "", "Metadata"),
        ("create", "tokenreviews", "authentication.k8s.io", "Metadata"),
        ("create", "serviceaccounts/token", "", "Metadata"),
        ("update", "certificatesigningrequests/status", "certificates.k8s.io", "Metadata"),
        ("update", "certificatesigningrequests/approval", "certificates.k8s.io", "Metadata"),
        ("create", "certificatesigningrequests", "certificates.k8s.io", "Request"),
        ("patch", "validatingwebhookconfigurations", "admissionregistration.k8s.io", "Request"),
        ("create", "pods", "", "Request"),
        ("patch", "deployments", "apps", "Request"),
        ("create", "cronjobs", "batch", "Request"),
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io", "Request"),
        ("update", "roles", "rbac.authorization.k8s.io", "Request"),
        ("create", "configmaps", "", "Request"),
        ("create", "pods/exec", "", "Metadata"),
        ("create", "pods/portforward", "", "Metadata"),
        ("list", "events", "", "Metadata"),
        ("delete", "pods", "", "Metadata"),
    ],
)
def test_the_audit_policy_logs_bodies_detections_need_and_never_secret_bodies(
    verb: str, resource: str, group: str, level: str
) -> None:
    assert audit_level(verb, resource, group) == level


def test_the_audit_policy_drops_system_chatter() -> None:
    assert audit_level("watch", "endpointslices", "discovery.k8s.io", user="system:kube-proxy") == (
        "None"
    )
    assert (
        audit_level(
            "update",
            "leases",
            "coordination.k8s.io",
            user="system:node:n1",
            groups=("system:nodes",),
        )
        == "None"
    )
    assert (
        audit_level(
            "update",
            "leases",
            "coordination.k8s.io",
            user="system:kube-scheduler",
            namespace="kube-system",
        )
        == "None"
    )
    # The same verbs by a person are kept.
    assert audit_level("update", "leases", "coordination.k8s.io", namespace="kube-system") == (
        "Metadata"
    )


# --- Vector and Fluent Bit ----------------------------------------------------------------------


def test_vector_posts_to_the_auditdemo_stream_with_its_credentials(
    example_objects: list[dict[str, Any]], rendered: list[dict[str, Any]]
) -> None:
    values = documents(CLUSTER / "vector-values.yaml")[0]
    assert values["role"] == "Agent"
    config = values["customConfig"]
    (sink,) = config["sinks"].values()
    assert sink["inputs"] == list(config["sources"])
    uri = urlsplit(sink["uri"])
    service = only(rendered, "Service", "auditwatch")
    assert uri.hostname == f"{service['metadata']['name']}.{OPERATOR_NAMESPACE}.svc"
    assert uri.port == service["spec"]["ports"][0]["port"]
    assert uri.path == "/api/v1/ingest"
    stream = build.build_stream(
        only(example_objects, "AuditStream", sink["request"]["headers"]["X-P-Stream"]),
        secret_lookup(example_objects),
    )
    assert stream.auth is not None
    assert (sink["auth"]["strategy"], sink["auth"]["user"]) == ("basic", stream.auth.username)
    assert sink["batch"]["max_bytes"] < stream.max_body_bytes
    assert sink["encoding"]["codec"] == "json" and sink["compression"] == "gzip"
    assert any(
        toleration["key"] == "node-role.kubernetes.io/control-plane"
        for toleration in values["tolerations"]
    )


def fluent_bit_section(text: str) -> dict[str, str]:
    """The keys of the one section of a Fluent Bit classic-format config snippet."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("[") and not any(line.startswith("[") for line in lines[1:])
    pairs = [line.split(None, 1) for line in lines[1:]]
    return {key: value for key, value in pairs}


def test_fluent_bit_posts_message_envelopes_to_the_auditdemo_stream(
    example_objects: list[dict[str, Any]],
) -> None:
    values = documents(CLUSTER / "fluent-bit-values.yaml")[0]
    tail, http = (fluent_bit_section(values["config"][name]) for name in ("inputs", "outputs"))
    assert tail["Key"] == "message"
    assert http["Match"] == tail["Tag"]
    prefix, _, stream_name = http["URI"].rpartition("/")
    assert prefix == "/api/v1/logstream"
    stream = build.build_stream(
        only(example_objects, "AuditStream", stream_name), secret_lookup(example_objects)
    )
    assert stream.auth is not None and http["HTTP_User"] == stream.auth.username
    assert http["Format"] == "json"


ARGOCD_PATCH_COMMAND = (
    "kubectl patch configmap argocd-cm -n argocd --type merge "
    "--patch-file <(kubectl kustomize manifests/argocd)"
)


@needs_kubectl
async def test_the_argocd_health_check_install_never_removes_another_argocd_cm_key(
    kube_fake: KubeFake, tmp_path: Path
) -> None:
    """Issue #11 item 7: the documented install is a merge patch of our two keys: applied with
    kubectl to an argocd-cm that holds other keys (written by a client-side apply), it adds
    ours and keeps every other key, also when run again."""
    assert KUBECTL is not None
    assert ARGOCD_PATCH_COMMAND in (ROOT / "docs" / "deployment.md").read_text()
    kube_fake.store.register(
        ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True, tracks_generation=False)
    )
    kube_fake.store.register(
        ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, tracks_generation=False)
    )
    theirs = {
        "url": "https://argocd.example.com",
        "resource.customizations.health.apps_Deployment": "hs = {}\nreturn hs\n",
    }
    kube_fake.store.create(
        "configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "argocd-cm",
                "namespace": "argocd",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            },
            "data": theirs,
        },
        "argocd",
    )
    patch = tmp_path / "argocd-cm.yaml"
    patch.write_text(yaml.safe_dump_all(kustomize(MANIFESTS / "argocd")))
    kubeconfig = kube_fake.write_kubeconfig(tmp_path / "kubeconfig")
    health = HEALTH_LUA.read_text()
    ours = {
        f"resource.customizations.health.auditwatch.dev_{kind}": health
        for kind in ("AuditAlert", "AuditStream")
    }
    for _ in range(2):
        command = [KUBECTL, "--kubeconfig", str(kubeconfig), "patch", "configmap", "argocd-cm"]
        command += ["-n", "argocd", "--type", "merge", "--patch-file", str(patch)]
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        data = kube_fake.store.get("configmaps", "argocd-cm", "argocd")["data"]
        assert data == {**theirs, **ours}


@needs_kubectl
def test_an_overlay_adds_and_removes_exceptions_with_plain_patches(tmp_path: Path) -> None:
    """A GitOps overlay tunes a detection without touching its rule: a merge patch adds a named
    exception beside the shipped one, another removes the trust-list one with null."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    shutil.copytree(ROOT / "examples" / "detections", tmp_path / "detections")
    (overlay / "kustomization.yaml").write_text(
        """
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../detections]
patches:
  - target: {kind: AuditAlert, name: k8s-secret-read}
    patch: |-
      apiVersion: auditwatch.dev/v1alpha1
      kind: AuditAlert
      metadata: {name: k8s-secret-read}
      spec:
        exceptions:
          ci-deployer:
            fields: [user.username]
            values: [["system:serviceaccount:ci:deployer"]]
  - target: {kind: AuditAlert, name: k8s-secret-read-denied}
    patch: |-
      apiVersion: auditwatch.dev/v1alpha1
      kind: AuditAlert
      metadata: {name: k8s-secret-read-denied}
      spec:
        exceptions:
          probe: {fields: [user.username], values: [[prober]]}
"""
    )
    shipped = documents(ROOT / "examples" / "detections" / "k8s-secret-read.yaml")[0]
    objects = kustomized(overlay, tmp_path)
    secret_read = only(objects, "AuditAlert", "k8s-secret-read")
    assert secret_read["spec"]["rule"] == shipped["spec"]["rule"]
    assert secret_read["spec"]["exceptions"] == {
        "trusted-infrastructure": {"trustList": "infrastructure"},
        "ci-deployer": {
            "fields": ["user.username"],
            "values": [["system:serviceaccount:ci:deployer"]],
        },
    }
    built = build.build_alert(secret_read, secret_lookup(objects))
    assert built.trust_lists == ("infrastructure",) and built.exceptions is not None
    assert only(objects, "AuditAlert", "k8s-secret-read-denied")["spec"]["exceptions"] == {
        "probe": {"fields": ["user.username"], "values": [["prober"]]}
    }

    (overlay / "kustomization.yaml").write_text(
        (overlay / "kustomization.yaml").read_text()
        + """  - target: {kind: AuditAlert, name: k8s-secret-read}
    patch: |-
      apiVersion: auditwatch.dev/v1alpha1
      kind: AuditAlert
      metadata: {name: k8s-secret-read}
      spec:
        exceptions:
          trusted-infrastructure: null
"""
    )
    switched_off = only(kustomized(overlay, tmp_path), "AuditAlert", "k8s-secret-read")
    assert list(switched_off["spec"]["exceptions"]) == ["ci-deployer"]


def kustomized(directory: Path, scratch: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` output read as auditwatch reads files (`operator: =` unquoted)."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = scratch / "rendered.yaml"
    rendered.write_text(result.stdout)
    return [document for document in read_documents(rendered) if document]
