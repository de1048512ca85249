"""A stand-in for a node's kubelet, so `kubectl exec` and `attach` open a session through the
real kube-apiserver.

A real kubelet needs a container runtime, which this machine lacks. For an exec or attach the
apiserver needs one thing from the kubelet: the protocol upgrade. It proxies the request to
https://<the node's InternalIP>:<its kubeletEndpoint port>/exec/<namespace>/<pod>/<container>
(or /attach/...), checking the kubelet's certificate against `--kubelet-certificate-authority`,
and once the kubelet answers 101 Switching Protocols it records the request in its audit log as
a session opened (code 101). This server answers as a kubelet does for a container that exists:
101 with the protocol the client offered first (a WebSocket subprotocol for kubectl >= 1.30, or
SPDY/3.1 with its `X-Stream-Protocol-Version`), and then ends the session at once (no process
runs, so kubectl reports the stream closed).

`FakeKubelet.node(name)` is the Node object that points the apiserver at it (a Node's status
may be set on create); pods created with `spec.nodeName` set to it are "running" there.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455: the server proves it read the client's key by hashing it with this."""
CLOSE_NORMAL = b"\x88\x02\x03\xe8"
"""A WebSocket close frame, status 1000 (unmasked, as a server sends it)."""


@dataclass
class FakeKubelet:
    """A TLS listener on 127.0.0.1 answering upgrades."""

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        self._listener = context.wrap_socket(
            socket.create_server(("127.0.0.1", 0)), server_side=True
        )
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="fake-kubelet").start()

    def node(self, name: str) -> dict[str, Any]:
        """A Node the apiserver reaches this kubelet through."""
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            },
        }

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed, or a client that failed the TLS handshake
                if self._listener.fileno() == -1:
                    return
                continue
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: ssl.SSLSocket) -> None:
        with connection:
            connection.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                head += chunk
            _, *header_lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
            headers: dict[str, list[str]] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            connection.sendall(_upgrade_answer(headers))

    def __enter__(self) -> FakeKubelet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _upgrade_answer(headers: dict[str, list[str]]) -> bytes:
    """101 for the protocol the client asked for first, then the end of the session; 400 for a
    request that is not an upgrade (a kubelet answers those with data this one does not have)."""
    upgrade = ",".join(headers.get("upgrade", [])).lower()
    if upgrade == "websocket":
        key = headers["sec-websocket-key"][0]
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest())
        offered = ",".join(headers.get("sec-websocket-protocol", [])).split(",")
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept.decode()}",
            f"Sec-WebSocket-Protocol: {offered[0].strip()}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + CLOSE_NORMAL
    if upgrade.startswith("spdy/"):
        offered = ",".join(headers.get("x-stream-protocol-version", [""])).split(",")
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: SPDY/3.1",
            "Connection: Upgrade",
            f"X-Stream-Protocol-Version: {offered[0].strip()}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()
    body = b"this stand-in kubelet only opens exec and attach sessions\n"
    return (
        f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
