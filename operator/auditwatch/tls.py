"""HTTPS for the receiver: its certificate, reloaded when it rotates, and client certificates.

The kube-apiserver's audit webhook (client-go) sends a kubeconfig's credentials only over TLS, so
in a cluster the receiver serves HTTPS. Its certificate and key are files: in a pod, a mounted
`kubernetes.io/tls` Secret (what cert-manager writes), which the kubelet updates in place when the
Secret changes. The files are checked every few seconds and, once both changed and load
together, become the certificate of every new connection; connections already open keep theirs.
No restart, no dropped request.

Client certificates are an alternative to a stream's bearer token or basic auth. The TLS layer
asks for one (CERT_OPTIONAL), verifies it against the CA bundles of all streams that use them,
and the receiver then checks, per stream, that the certificate was issued by that stream's CA
(and has an allowed common name): one port serves streams with different CAs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from auditwatch.config.model import ClientCertificateAuth

logger = logging.getLogger(__name__)

RELOAD_INTERVAL_SECONDS = 5.0
"""How often the certificate files are checked for a change (the kubelet takes up to a minute or
so to update a mounted Secret anyway)."""


class TLSError(Exception):
    """Certificate files that cannot be used: missing, unreadable, or key and cert not a pair."""


def load_authorities(pem: str) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM bundle; ValueError if it holds none or is not PEM."""
    certificates = tuple(x509.load_pem_x509_certificates(pem.encode()))
    if not certificates:
        raise ValueError("no PEM certificate in the bundle")
    return certificates


def client_certificate_problem(
    auth: ClientCertificateAuth, certificate: bytes | None
) -> str | None:
    """Why the client's certificate (DER, as the TLS layer verified it) does not authenticate it
    for this stream; None when it does."""
    if certificate is None:
        return "this stream needs a client certificate (HTTPS with a certificate from its CA)"
    leaf = x509.load_der_x509_certificate(certificate)
    for authority in auth.authorities:
        try:
            leaf.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        break
    else:
        return "the client certificate is not issued by this stream's certificate authority"
    if auth.common_names:
        names = {str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
        if not names & auth.common_names:
            return "the client certificate's common name is not allowed for this stream"
    return None


def _fingerprint(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced or rewritten (stat follows the kubelet's symlinks)."""
    stats = [os.stat(path) for path in paths]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class ServerTLS:
    """The receiver's SSLContext, kept current: certificate reloads and client CA bundles."""

    def __init__(
        self, cert: Path, key: Path, *, reload_interval: float = RELOAD_INTERVAL_SECONDS
    ) -> None:
        self.cert = cert
        self.key = key
        self.reload_interval = reload_interval
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._loaded: tuple[tuple[int, int, int], ...] = ()
        self._trusted: set[str] = set()
        self.reload()

    def reload(self) -> bool:
        """Load the files if they changed since last time; True if a new certificate is in use.

        A pair that does not load (a rotation half written, a key that does not match) is
        checked in a scratch context first, so the certificate in use stays until it does.
        """
        try:
            fingerprint = _fingerprint(self.cert, self.key)
            if fingerprint == self._loaded:
                return False
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as error:
            raise TLSError(
                f"cannot use the certificate {self.cert} with the key {self.key}: {error}"
            ) from None
        self._loaded = fingerprint
        return True

    async def follow(self, stop: asyncio.Event) -> None:
        """Reload whenever the files change, until `stop`; a bad pair is logged and retried."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.reload_interval)
            if stop.is_set():
                return
            try:
                if self.reload():
                    logger.info("TLS certificate reloaded from %s", self.cert)
            except TLSError as error:
                logger.error("%s; still serving the previous certificate", error)

    def trust_clients(self, bundles: Iterable[ClientCertificateAuth]) -> None:
        """Let the TLS layer accept client certificates from these CAs (and ask for one).

        Trust only grows while the process runs (OpenSSL cannot forget a CA): a CA removed from
        every stream still passes the handshake, but no stream accepts its certificates.
        """
        for auth in bundles:
            if auth.authorities_pem not in self._trusted:
                self.context.load_verify_locations(cadata=auth.authorities_pem)
                self._trusted.add(auth.authorities_pem)
        if self._trusted:
            self.context.verify_mode = ssl.CERT_OPTIONAL
