"""Where webhooks may connect: public addresses only, unless ``[webhooks] allow_private``
names the network.

The check is made on the addresses the name resolves to, at connect time, and the
connection goes to the address checked: a name that resolves to a public address when
the endpoint is added and to 127.0.0.1 later (DNS rebinding) is refused then. Refused:
private (RFC 1918, fc00::/7), loopback, link-local, carrier-grade NAT, multicast,
reserved and unspecified addresses, also as IPv4-mapped IPv6 addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(ConnectError):
    """The endpoint's host is (or resolves only to) an address webhooks may not reach."""


def refused(address: Address, allowed: Iterable[Network] = ()) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address.version == n.version and address in n for n in allowed):
        return False
    return not address.is_global or address.is_multicast


def literal(host: str) -> Address | None:
    """``host`` as an IP address, or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """Resolves ``host``, keeps the addresses allowed, connects to the first that answers
    (TLS with ``host``'s name checked when ``tls``)."""

    def __init__(self, reactor, host: str, port: int, tls: bool, allowed: tuple[Network, ...],
                 timeout: float) -> None:  # fmt: skip
        self.reactor = reactor
        self.host, self.port, self.tls = host, port, tls
        self.allowed = allowed
        self.timeout = timeout

    def connect(self, factory):
        return defer.ensureDeferred(self._connect(factory))

    async def _resolve(self) -> list[Address]:
        if (address := literal(self.host)) is not None:
            return [address]
        pool = self.reactor.getThreadPool()
        infos = await threads.deferToThreadPool(self.reactor, pool, socket.getaddrinfo,
                                                self.host, self.port, 0, socket.SOCK_STREAM)
        found: list[Address] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if address not in found:
                found.append(address)
        return found

    async def _connect(self, factory):
        try:
            addresses = await self._resolve()
        except OSError as e:
            raise ConnectError(string=f"cannot resolve {self.host}: {e}")
        usable = [a for a in addresses if not refused(a, self.allowed)]
        if not usable:
            raise TargetRefused(string=f"{self.host} is {', '.join(map(str, addresses))}: a "
                                "private or local address ([webhooks] allow_private)")
        error: Exception = ConnectError(string=f"no address of {self.host}")
        for address in usable:
            kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = kind(self.reactor, str(address), self.port, timeout=self.timeout)
            if self.tls:
                endpoint = wrapClientTLS(optionsForClientTLS(self.host.strip("[]")), endpoint)
            try:
                return await endpoint.connect(factory)
            except ConnectError as e:
                error = e
        raise error


@implementer(IAgentEndpointFactory)
class CheckedEndpoints:
    """The endpoints of an Agent (``Agent.usingEndpointFactory``) that only reach
    addresses allowed."""

    def __init__(self, reactor, allowed: tuple[Network, ...] = (), timeout: float = 10.0):
        self.reactor = reactor
        self.allowed = allowed
        self.timeout = timeout

    def endpointForURI(self, uri):
        return CheckedEndpoint(self.reactor, uri.host.decode("idna"), uri.port,
                               uri.scheme == b"https", self.allowed, self.timeout)
