"""A small async Kubernetes API client for what kopf does not do for auditwatch.

kopf watches and runs the handlers; this client reads the Secrets resources reference, patches
the status subresource, posts Events and keeps the leader Lease. It logs in the way kopf's
default login does (the `kubernetes` package's loaders: in-cluster service account first, then
KUBECONFIG or ~/.kube/config), and speaks plain JSON over aiohttp, so bodies stay dicts.
"""

from __future__ import annotations

import logging
import os
import ssl
from types import TracebackType
from typing import Any, Self

import aiohttp
import kubernetes.config
from kubernetes.client import Configuration

logger = logging.getLogger(__name__)

GROUP = "auditwatch.dev"
VERSION = "v1alpha1"
PLURALS = {"AuditStream": "auditstreams", "AuditAlert": "auditalerts"}
MERGE_PATCH = "application/merge-patch+json"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class ApiError(Exception):
    """An answer other than 2xx, with the apiserver's status code and message; status 0 when
    no answer came (connection failed, timeout, not JSON)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def load_configuration() -> Configuration:
    """In-cluster credentials if there are any, else KUBECONFIG (read now, not at import)."""
    configuration = Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except kubernetes.config.ConfigException:
        config_file = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=config_file, client_configuration=configuration, persist_config=False
        )
    return configuration


def operator_namespace(watched: list[str] | None = None) -> tuple[str, str]:
    """The operator's namespace (its Lease, stream Secrets, stream Events) and where it came
    from: $AUDITWATCH_NAMESPACE, else the first `--namespace`, else the kubeconfig's current
    context (running from a laptop), else the pod's service account namespace, else `default`
    (as kubectl would)."""
    if os.environ.get("AUDITWATCH_NAMESPACE"):
        return os.environ["AUDITWATCH_NAMESPACE"], "$AUDITWATCH_NAMESPACE"
    if watched:
        return watched[0], "the first --namespace"
    try:
        config_file = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        _, context = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=config_file
        )
        namespace = (context or {}).get("context", {}).get("namespace")
    except (kubernetes.config.ConfigException, OSError):
        namespace = None
    if namespace:
        return str(namespace), "the kubeconfig's current context"
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as file:
            return file.read().strip(), "the pod's service account"
    except OSError:
        pass
    return "default", "nothing else set it"


class KubeApi:
    """JSON calls on the apiserver with the credentials of a `kubernetes` Configuration."""

    def __init__(self, configuration: Configuration) -> None:
        self._configuration = configuration
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeApi:
        return cls(load_configuration())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl(self) -> ssl.SSLContext | bool:
        config = self._configuration
        if not config.host.startswith("https:"):
            return False
        if not config.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=config.ssl_ca_cert)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, config.key_file)
        return context

    def _headers(self) -> dict[str, str]:
        """The Authorization header, asked for on every call: in-cluster tokens rotate."""
        config = self._configuration
        token = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            return {"Authorization": token}
        if config.username:
            return {"Authorization": str(config.get_basic_auth_token())}
        return {}

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """The parsed answer; ApiError for any non-2xx answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
            )
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type
        url = self._configuration.host.rstrip("/") + path
        try:
            async with self._session.request(method, url, json=body, headers=headers) as response:
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise ApiError(0, f"{method} {path}: {error!r}") from error
        if response.status >= 300:
            message = answer.get("message") if isinstance(answer, dict) else str(answer)
            raise ApiError(response.status, str(message))
        return answer

    # -- what auditwatch needs ---------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            secret: dict[str, Any] = await self.request(
                "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return secret

    async def list_resources(self, kind: str, namespaces: list[str]) -> list[dict[str, Any]]:
        """Every AuditStream / AuditAlert (alerts of `namespaces` only, when given)."""
        base = f"/apis/{GROUP}/{VERSION}"
        if kind == "AuditStream" or not namespaces:
            paths = [f"{base}/{PLURALS[kind]}"]
        else:
            paths = [f"{base}/namespaces/{ns}/{PLURALS[kind]}" for ns in namespaces]
        items: list[dict[str, Any]] = []
        for path in paths:
            listed = await self.request("GET", path)
            items += [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, **item}
                for item in listed["items"]
            ]
        return items

    async def patch_status(
        self, kind: str, namespace: str | None, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch `.status` through the status subresource."""
        scope = f"/namespaces/{namespace}" if namespace else ""
        path = f"/apis/{GROUP}/{VERSION}{scope}/{PLURALS[kind]}/{name}/status"
        await self.request("PATCH", path, {"status": status}, MERGE_PATCH)

    async def post_event(self, namespace: str, event: dict[str, Any]) -> None:
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", event)
