"""HTTPS on the receiver (`auditwatch serve --tls-cert/--tls-key`): a bearer token over TLS, the
certificate reloaded when its files change, and client-certificate auth per stream."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from tests.certs import CA
from tests.e2e_support import free_port

from auditwatch.config.build import build_stream
from auditwatch.config.model import ConfigError
from auditwatch.serve import serve
from auditwatch.tls import ServerTLS, TLSError

EVENT = {
    "kind": "EventList",
    "apiVersion": "audit.k8s.io/v1",
    "items": [
        {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": "7e4cd0b4-0000-4000-8000-000000000001",
            "stage": "ResponseComplete",
            "requestURI": "/api/v1/namespaces/default/secrets/db",
            "verb": "get",
            "user": {"username": "system:serviceaccount:default:unauthorized-user"},
            "objectRef": {"resource": "secrets", "namespace": "default", "name": "db"},
            "responseStatus": {"code": 200},
            "requestReceivedTimestamp": "2026-12-05T10:00:00.000000Z",
            "stageTimestamp": "2026-12-05T10:00:00.001000Z",
        }
    ],
}


def resources(directory: Path, ca_pem: bytes) -> None:
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "tokens"},
            "stringData": {"token": "s3cret", "ca.crt": ca_pem.decode()},
        },
        {
            "apiVersion": "auditwatch.dev/v1alpha1",
            "kind": "AuditStream",
            "metadata": {"name": "by-token"},
            "spec": {"auth": {"bearer": {"secretRef": {"name": "tokens"}}}},
        },
        {
            "apiVersion": "auditwatch.dev/v1alpha1",
            "kind": "AuditStream",
            "metadata": {"name": "by-cert"},
            "spec": {
                "auth": {
                    "clientCertificate": {
                        "secretRef": {"name": "tokens"},
                        "commonNames": ["kube-apiserver"],
                    }
                }
            },
        },
    ]
    (directory / "all.yaml").write_text(yaml.safe_dump_all(docs))


class Server:
    def __init__(self, url: str, ca: CA, cert: Path, key: Path) -> None:
        self.url, self.ca, self.cert, self.key = url, ca, cert, key

    def client(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca.pem.decode())
        if cert is not None:
            context.load_cert_chain(cert, key)
        return context

    async def post(self, stream: str, context: ssl.SSLContext, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
            http.post(f"{self.url}/api/v1/logstream/{stream}", json=EVENT, headers=headers) as r,
        ):
            return r.status

    async def served_certificate(self) -> bytes:
        """The certificate a new connection gets (DER)."""
        _, writer = await asyncio.open_connection(
            "127.0.0.1", int(self.url.rsplit(":", 1)[1]), ssl=self.client()
        )
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return der


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    ca = CA()
    cert, key = ca.issue("auditwatch").write(tmp_path, "tls")
    (tmp_path / "resources").mkdir()
    resources(tmp_path / "resources", ca.pem)
    port = free_port()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(
            tmp_path / "resources",
            tmp_path / "data",
            host="127.0.0.1",
            port=port,
            tls=ServerTLS(cert, key, reload_interval=0.1),
            stop=stop,
            ready=ready,
        )
    )
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield Server(f"https://127.0.0.1:{port}", ca, cert, key)
    finally:
        stop.set()
        await task


async def test_bearer_token_over_https(server: Server) -> None:
    assert await server.post("by-token", server.client(), "s3cret") == 200
    assert await server.post("by-token", server.client(), "wrong") == 403
    assert await server.post("by-token", server.client()) == 401


async def test_rotated_certificate_serves_new_connections(server: Server) -> None:
    before = await server.served_certificate()
    server.ca.issue("auditwatch-rotated").write(server.cert.parent, "tls")
    async with asyncio.timeout(10):
        while (after := await server.served_certificate()) == before:
            await asyncio.sleep(0.05)
    assert after != before
    assert await server.post("by-token", server.client(), "s3cret") == 200


async def test_client_certificate_per_stream(server: Server, tmp_path: Path) -> None:
    good = server.ca.issue("kube-apiserver", server=False).write(tmp_path, "good")
    other_name = server.ca.issue("someone-else", server=False).write(tmp_path, "other")
    assert await server.post("by-cert", server.client(*good)) == 200
    assert await server.post("by-cert", server.client(*other_name)) == 403
    assert await server.post("by-cert", server.client()) == 401
    # A client certificate does not stand in for another stream's token.
    assert await server.post("by-token", server.client(*good)) == 401


def test_a_key_that_does_not_match_is_refused_and_the_old_pair_stays(tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.issue("a").write(tmp_path, "tls")
    tls = ServerTLS(cert, key)
    (tmp_path / "tls.key").write_bytes(ca.issue("b").key)
    with pytest.raises(TLSError, match=r"tls\.key"):
        tls.reload()
    with pytest.raises(TLSError, match=r"missing\.crt"):
        ServerTLS(tmp_path / "missing.crt", key)


def test_a_ca_bundle_without_a_certificate_makes_the_stream_invalid() -> None:
    resource = {
        "apiVersion": "auditwatch.dev/v1alpha1",
        "kind": "AuditStream",
        "metadata": {"name": "by-cert"},
        "spec": {"auth": {"clientCertificate": {"secretRef": {"name": "ca"}}}},
    }
    with pytest.raises(ConfigError, match="does not hold PEM CA certificates") as error:
        build_stream(resource, lambda namespace, name, key: "not a certificate")
    assert error.value.reason == "InvalidSpec"
    ca = CA()
    stream = build_stream(resource, lambda namespace, name, key: ca.pem.decode())
    assert stream.auth is not None and stream.auth.client_certificate is not None
    assert stream.auth.client_certificate.authorities == (ca.certificate,)
