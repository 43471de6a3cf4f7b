"""The PROXY protocol (versions 1 and 2, HAProxy's specification) in front of a listener.

A load balancer in TCP mode connects to the relay from its own address; with
``proxy_protocol = yes`` it first sends a header naming the client it accepted. The
listener reads that header before anything else: the session (greeting, TLS, limits,
logins, log lines, the Received header) starts only once it is complete, and sees the
client's address from it as its peer. Twisted's ``haproxy:`` endpoint is not used: it
greets before the header has come, loses a header that arrives in two segments, and
believes a header from anyone.

A connection on such a listener is closed, with one log line, when it comes from outside
``proxy_from`` (the balancers' networks), when its header is malformed or too long (a
version 1 line over 107 octets, a version 2 header over V2_MAX), or when no complete
header arrives within ``proxy_timeout``; one that ends inside its header is logged too. A
balancer that opens a connection and closes it without a byte (a plain TCP health check)
leaves no line. A header that names no client
(``PROXY UNKNOWN``, a version 2 LOCAL command or an unspecified or UNIX address: the
balancer's own health checks) leaves the session with the balancer's own address.
Version 2 TLVs are skipped unread.

The wrapper sits outside TLS (implicit TLS begins after the header; STARTTLS wraps the
socket's protocol, which is this wrapper, so it keeps answering for the client), and it
writes straight to the TCP transport, so the prompt writes of listener.py work through it.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ILoggingContext
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from mailrelay.net import parse_ip, plain_ip

log = Logger()

V1_PREFIX = b"PROXY "
V1_MAX = 107  # octets of a version 1 line with its CRLF (the specification's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 2048  # the fixed part and at most 2 KiB of addresses and TLVs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = IPv4Address | IPv6Address


class HeaderError(Exception):
    """Not a valid PROXY header; the text says what is wrong, without the client's bytes."""


@dataclass(frozen=True)
class Header:
    """A complete header: its ``length`` in octets, and the client and the address it
    connected to (both None when the header names no client: LOCAL, UNKNOWN)."""

    version: int
    length: int
    source: Address | None
    destination: Address | None


def parse(data: bytes) -> Header | None:
    """The header at the start of ``data``; None while it may still be incomplete.
    Raises HeaderError as soon as the octets so far cannot begin a valid header."""
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> Header | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise HeaderError("not a PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    window = data[:end] if end >= 0 else data[:V1_MAX]
    # A CR not followed by LF, or a bare LF; a CR last in the data may begin the CRLF.
    if b"\n" in window or b"\r" in (window if end >= 0 else window[:-1]):
        raise HeaderError("version 1 line not ended by CRLF")
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"version 1 line longer than {V1_MAX} octets")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError("version 1 line not ASCII")
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":  # the rest of the line is ignored
        return Header(1, end + 2, None, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise HeaderError("version 1 line not PROXY TCP4|TCP6 SOURCE DEST SPORT DPORT")
    family = IPv4Address if fields[1] == "TCP4" else IPv6Address
    source = _v1_address(family, fields[2], fields[4])
    destination = _v1_address(family, fields[3], fields[5])
    return Header(1, end + 2, source, destination)


def _v1_address(family: type[Address], host: str, port: str) -> Address:
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        version = 0
    if version != (4 if family is IPv4Address else 6) or "%" in host:
        raise HeaderError(f"version 1 address not {'IPv4' if family is IPv4Address else 'IPv6'}")
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", port) or int(port) > 65535:
        raise HeaderError("version 1 port not a number 0..65535")
    return family("TCP", host, int(port))


_V2_FAMILIES = {0x1: (IPv4Address, 4, 12), 0x2: (IPv6Address, 16, 36)}  # address, bytes


def _parse_v2(data: bytes) -> Header | None:
    head = data[:len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[:len(head)]:
        raise HeaderError("version 2 signature wrong")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0xF
    family, transport = data[13] >> 4, data[13] & 0xF
    length = 16 + struct.unpack("!H", data[14:16])[0]
    if version != 2:
        raise HeaderError(f"version 2 header of version {version}")
    if command not in (0, 1):
        raise HeaderError(f"version 2 command {command} unknown")
    if length > V2_MAX:
        raise HeaderError(f"version 2 header of {length} octets, over {V2_MAX}")
    if len(data) < length:
        return None
    if command == 0 or family not in _V2_FAMILIES:  # LOCAL; UNSPEC or UNIX: no client
        return Header(2, length, None, None)
    if transport != 1:
        raise HeaderError("version 2 header not for a TCP (stream) connection")
    kind, size, needed = _V2_FAMILIES[family]
    if length - 16 < needed:
        raise HeaderError("version 2 addresses shorter than their family needs")
    body = data[16:16 + needed]
    hosts = [str(ipaddress.ip_address(body[i * size:(i + 1) * size])) for i in (0, 1)]
    ports = struct.unpack("!HH", body[2 * size:needed])
    return Header(2, length, kind("TCP", hosts[0], ports[0]), kind("TCP", hosts[1], ports[1]))


def trusted(host: str, networks: Iterable[Network]) -> bool:
    """Whether a peer's address (an IPv4 client of a dual-stack socket counts as IPv4) is
    in one of ``networks``."""
    try:
        ip = parse_ip(host)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


class ProxyHeaderReader(ProtocolWrapper):
    """One connection: the header first, then the wrapped protocol, to which this is the
    transport and which sees the header's client as its peer."""

    wrappedProtocol = None
    _client: Address | None = None
    _server: Address | None = None

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        super().__init__(factory, None)
        self._buffer = b""
        self._timer = None
        self._done = False  # the header is read, or the connection is being closed

    def logPrefix(self) -> str:
        if self.wrappedProtocol is None:
            return "PROXY"
        return super().logPrefix()

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        if not trusted(getattr(peer, "host", ""), self.factory.networks):
            self._close("not in proxy_from")
            return
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._done:
            return
        self._buffer += data
        try:
            header = parse(self._buffer)
        except HeaderError as e:
            self._close(f"bad PROXY header: {e}")
            return
        if header is not None:
            self._connect(header)

    def _connect(self, header: Header) -> None:
        self._done = True
        self._cancel_timer()
        rest, self._buffer = self._buffer[header.length:], b""
        self._client, self._server = header.source, header.destination
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and not self.disconnecting:
            protocol.dataReceived(rest)

    def _timed_out(self) -> None:
        self._timer = None
        self._close(f"no PROXY header within {self.factory.timeout:g} s")

    def _close(self, why: str) -> None:
        self._done = True
        self._cancel_timer()
        self._log(f"closed: {why}")
        self.transport.loseConnection()

    def _log(self, what: str) -> None:
        log.info("[listener:{listener}] connection from {peer} {what}",
                 listener=self.factory.name,
                 peer=plain_ip(str(getattr(self.transport.getPeer(), "host", "?"))), what=what)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def getPeer(self):
        """The client the header names; the balancer when it names none."""
        return self._client or self.transport.getPeer()

    def getHost(self):
        """The address the client connected to, as the header names it."""
        return self._server or self.transport.getHost()

    def connectionLost(self, reason) -> None:
        self._cancel_timer()
        if not self._done and self._buffer:  # a balancer's plain TCP check sends nothing
            self._log("closed by the peer inside its PROXY header")
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a listener's factory (outside its TLS) so that each connection reads a PROXY
    header first. ``networks``: the balancers' networks (``proxy_from``); ``timeout``: the
    seconds a header may take; ``name``: the listener's, for log lines."""

    protocol = ProxyHeaderReader
    noisy = False

    def __init__(self, wrappedFactory, networks: Iterable[Network], timeout: float,
                 name: str, reactor=None) -> None:
        super().__init__(wrappedFactory)
        if reactor is None:
            from twisted.internet import reactor
        self.networks = tuple(networks)
        self.timeout = timeout
        self.name = name
        self.reactor = reactor

    def logPrefix(self) -> str:
        inner = self.wrappedFactory
        prefix = inner.logPrefix() if ILoggingContext.providedBy(inner) else type(inner).__name__
        return f"{prefix} (PROXY)"

    def buildProtocol(self, addr) -> ProxyHeaderReader:
        return self.protocol(self)


def wrapper_for(listener, reactor=None) -> Callable | None:
    """What wraps the factory of ``listener`` (a config.Listener) for the PROXY protocol,
    or None when it does not speak it."""
    if not listener.proxy_protocol:
        return None

    def wrap(factory):
        return ProxyProtocolFactory(factory, listener.proxy_from, listener.proxy_timeout,
                                    listener.name, reactor)

    return wrap
