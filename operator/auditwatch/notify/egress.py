"""Where notifications may go: the cluster admin's egress policy, enforced after DNS resolution.

A target URL is written by whoever may create an AuditAlert, so without a policy a tenant could
aim notifications at the cloud metadata service, the operator's own pod or any internal service.
The policy is a list of allowed and denied networks. Its resolver hands aiohttp only the
addresses the policy allows, and aiohttp connects to exactly those (TLS still checks the name
in the URL): the name is resolved once, so a second answer (DNS rebinding) never reaches a
connection. Literal IP addresses in URLs skip resolvers in aiohttp, so `check_host` checks them
before the request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENY: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "169.254.0.0/16",  # IPv4 link-local: cloud metadata (169.254.169.254), node-local DNS
        "fd00:ec2::254/128",  # AWS instance metadata over IPv6
        "fe80::/10",  # IPv6 link-local
    )
)
"""Denied unless the admin allows a more specific network."""

OWN_POD_DENY: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr) for cidr in ("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128")
)
"""In a pod, loopback and "this host" reach the operator's own pod (its receiver, its status):
denied with the pod's IP whenever that is known."""


class EgressDenied(Exception):
    """The policy refuses every address a target resolves to; the message is safe for status."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) from flags or environment, comma or space separated.

    Raises ValueError naming the bad entry (`10.1.2.3/8 has host bits set`, ...).
    """
    return tuple(
        ipaddress.ip_network(item) for value in values for item in value.replace(",", " ").split()
    )


def _plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:169.254.169.254) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class EgressPolicy:
    """Allowed and denied networks; the most specific network containing an address decides.

    An address in no listed network is allowed when `allow` is empty, else denied. Between an
    allowed and a denied network of the same size, deny wins. So `allow=[10.0.0.0/8]` limits
    notifications to 10/8, and `allow=[169.254.10.1/32]` opens one address of the denied
    link-local range.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = DEFAULT_DENY

    @classmethod
    def build(
        cls, allow: Iterable[str] = (), deny: Iterable[str] = (), pod_ip: str | None = None
    ) -> EgressPolicy:
        """The defaults plus the admin's networks, and the operator's own pod when `pod_ip` is
        known (ValueError for a bad network)."""
        own = (*parse_networks([pod_ip]), *OWN_POD_DENY) if pod_ip else ()
        return cls(allow=parse_networks(allow), deny=(*DEFAULT_DENY, *own, *parse_networks(deny)))

    def allows(self, address: Address) -> bool:
        address = _plain(address)
        matches = [
            (network.prefixlen, allowed)
            for allowed, networks in ((False, self.deny), (True, self.allow))
            for network in networks
            if address.version == network.version and address in network
        ]
        if not matches:
            return not self.allow
        _, allowed = max(matches, key=lambda match: (match[0], not match[1]))
        return allowed

    def check(self, address: str) -> None:
        """EgressDenied unless the policy allows `address`."""
        plain = _plain(ipaddress.ip_address(address.split("%", 1)[0]))
        if not self.allows(plain):
            raise EgressDenied(f"address {plain} denied by egress policy")

    def check_host(self, host: str | None) -> None:
        """Check a URL's host if it is a literal IP address (names are checked on resolution)."""
        if host is None:
            return
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return
        self.check(host)

    def describe(self) -> str:
        """One line for the start-up log."""
        allow = ", ".join(map(str, self.allow)) or "everything else"
        return f"egress allowed: {allow}; denied: {', '.join(map(str, self.deny))}"


class PolicyResolver(AbstractResolver):
    """Resolves with `base`, then keeps only the addresses the policy allows."""

    def __init__(self, policy: EgressPolicy, base: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.base = base or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.base.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        denied: EgressDenied | None = None
        for result in results:
            try:
                self.policy.check(result["host"])
            except EgressDenied as error:
                denied = denied or error
            else:
                allowed.append(result)
        if not allowed and denied is not None:
            raise denied
        return allowed

    async def close(self) -> None:
        await self.base.close()
