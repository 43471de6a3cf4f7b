"""DNS lookups that carry their DNSSEC status, for DANE (RFC 7672).

The relay does not validate signatures itself: a validating resolver (unbound, as Postfix
and maddy expect) does, and says so with the AD bit of its answer. That bit means
something only when it cannot have been forged on the way, so it is believed only from
resolvers the relay trusts: loopback ones, or any listed when ``[delivery] dns_trusted =
yes``. twisted.names sends its queries without the DO bit and keeps no header flags in
its lookups, so these queries are built and parsed by dnspython (which also knows TLSA)
and travel over Twisted's UDP and TCP transports: UDP first, TCP when the answer is
truncated, each server tried in turn with a timeout, never blocking the reactor.

``DNSClient.lookup(name, rdtype)`` fires with an Answer (the records, the CNAMEs the
answer names, whether it is validated) or fails with NoSuchName (NXDOMAIN), DNSFailure
(SERVFAIL, REFUSED, a bogus signature at a validating resolver) or DNSTimeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from twisted.internet import defer, endpoints, protocol, udp
from twisted.protocols.basic import Int16StringReceiver

from mailrelay.logtext import quietly

UDP_PAYLOAD = 1232  # the EDNS buffer size DNS Flag Day 2020 settled on


class LookupFailure(Exception):
    """Base of the lookup failures."""


class NoSuchName(LookupFailure):
    """NXDOMAIN: the name does not exist."""


class DNSFailure(LookupFailure):
    """The resolver could not answer: SERVFAIL (a validating resolver's answer to bogus
    data too), REFUSED, a malformed reply."""


class DNSTimeout(LookupFailure):
    """No server answered in time."""


@dataclass(frozen=True)
class TLSA:
    """One TLSA record (RFC 6698): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class Answer:
    """An answer: ``records`` of the type asked (MX: (preference, host); A/AAAA: the
    address; TLSA: TLSA), ``cnames`` the answer points to (without records of the type
    asked for them: the caller follows), ``secure``: validated by a trusted resolver."""

    records: list = field(default_factory=list)
    cnames: list[str] = field(default_factory=list)
    secure: bool = False


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def system_servers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The nameservers of resolv.conf (port 53), or 127.0.0.1 when it lists none, as the
    C library does."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    servers.append((words[1].split("%")[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class QuietPort(udp.Port):
    """The UDP port of one DNS query, opened and closed without the lines
    twisted.internet.udp writes for each (``... starting on 47584``, ``(UDP Port 47584
    Closed)``) nor its protocol's (``Starting protocol <... object at 0x...>``): four
    lines a query, nothing a sysadmin can use."""

    def startListening(self) -> None:
        quietly(super().startListening)

    def connectionLost(self, reason=None) -> None:
        quietly(super().connectionLost, reason)


class _UDPQuery(protocol.DatagramProtocol):
    """One query over UDP, answered only by the server it went to, with its id and
    question (dnspython's ``is_response``)."""

    noisy = False

    def __init__(self, query: dns.message.Message, server: tuple[str, int]) -> None:
        self.query = query
        self.server = server
        self.answered: defer.Deferred = defer.Deferred()

    def startProtocol(self) -> None:
        self.transport.connect(*self.server)  # replies from anyone else never arrive
        self.transport.write(self.query.to_wire())

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            response = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return  # not a DNS message: keep waiting for the real one
        if not self.answered.called and self.query.is_response(response):
            self.answered.callback(response)

    def connectionRefused(self) -> None:  # ICMP port unreachable
        if not self.answered.called:
            self.answered.errback(DNSFailure(f"{self.server[0]} refused the query"))


class _TCPQuery(Int16StringReceiver):
    """One query over TCP (two-byte length prefix, RFC 1035 4.2.2)."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.answered: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendString(self.query.to_wire())

    def stringReceived(self, data: bytes) -> None:
        try:
            response = dns.message.from_wire(data)
        except dns.exception.DNSException as e:
            self._fail(DNSFailure(f"malformed answer: {e}"))
            return
        if self.query.is_response(response) and not self.answered.called:
            self.answered.callback(response)
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._fail(DNSFailure("the server closed the TCP connection"))

    def _fail(self, error: Exception) -> None:
        if not self.answered.called:
            self.answered.errback(error)
            self.transport.loseConnection()


class DNSClient:
    """Asks ``servers`` (host, port) in turn, ``tries`` rounds, ``timeout`` seconds each
    query. ``trust_all``: believe the AD bit from servers that are not loopback too."""

    def __init__(self, servers: Iterable[tuple[str, int]] = (), reactor=None,
                 timeout: float = 3.0, tries: int = 2, trust_all: bool = False) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.servers = list(servers) or system_servers()
        self.timeout = timeout
        self.tries = tries
        self.trust_all = trust_all

    @property
    def trusted(self) -> bool:
        """Whether an AD bit from these servers is believed (DANE is possible)."""
        return self.trust_all or all(is_loopback(host) for host, _ in self.servers)

    def lookup(self, name: str, rdtype: str) -> defer.Deferred[Answer]:
        return defer.ensureDeferred(self._lookup(name, rdtype))

    async def _lookup(self, name: str, rdtype: str) -> Answer:
        response = await self.query(name, rdtype)
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise NoSuchName(name)
        if rcode != dns.rcode.NOERROR:
            raise DNSFailure(dns.rcode.to_text(rcode))
        wanted = dns.rdatatype.from_text(rdtype)
        records, cnames = [], []
        for rrset in response.answer:
            if rrset.rdtype == wanted:
                records += [_value(rd) for rd in rrset]
            elif rrset.rdtype == dns.rdatatype.CNAME:
                cnames += [rd.target.to_text(omit_final_dot=True).lower() for rd in rrset]
        secure = self.trusted and bool(response.flags & dns.flags.AD)
        return Answer(records, [] if records else cnames, secure)

    async def query(self, name: str, rdtype: str) -> dns.message.Message:
        """The whole response to ``name``/``rdtype`` asked with RD and DO set."""
        try:
            query = dns.message.make_query(name, rdtype, want_dnssec=True,
                                           payload=UDP_PAYLOAD)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DNSFailure(f"cannot ask for {name!r}: {e}")
        last: Exception = DNSTimeout(name)
        for _ in range(self.tries):
            for server in self.servers:
                try:
                    response = await self._udp(query, server)
                    if response.flags & dns.flags.TC:
                        response = await self._tcp(query, server)
                except defer.TimeoutError:
                    last = DNSTimeout(name)
                    continue
                except DNSFailure as e:
                    last = e
                    continue
                if response.rcode() in (dns.rcode.REFUSED, dns.rcode.NOTIMP,
                                        dns.rcode.FORMERR) and len(self.servers) > 1:
                    last = DNSFailure(dns.rcode.to_text(response.rcode()))
                    continue  # maybe the next server serves us
                return response
        raise last

    async def _udp(self, query: dns.message.Message,
                   server: tuple[str, int]) -> dns.message.Message:
        proto = _UDPQuery(query, server)
        interface = "::" if ":" in server[0] else ""
        port = QuietPort(0, proto, interface, reactor=self.reactor)
        port.startListening()
        try:
            return await proto.answered.addTimeout(self.timeout, self.reactor)
        finally:
            port.stopListening()

    async def _tcp(self, query: dns.message.Message,
                   server: tuple[str, int]) -> dns.message.Message:
        proto = _TCPQuery(query)
        kind = (endpoints.TCP6ClientEndpoint if ":" in server[0]
                else endpoints.TCP4ClientEndpoint)
        endpoint = kind(self.reactor, server[0], server[1], timeout=self.timeout)
        try:
            await endpoints.connectProtocol(endpoint, proto)
        except Exception as e:
            raise DNSFailure(f"TCP to {server[0]}: {e}")
        try:
            return await proto.answered.addTimeout(self.timeout, self.reactor)
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()


def _value(rd):
    kind = rd.rdtype
    if kind == dns.rdatatype.MX:
        return rd.preference, rd.exchange.to_text().rstrip(".").lower()  # ".": null MX
    if kind in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rd.address
    if kind == dns.rdatatype.TLSA:
        return TLSA(rd.usage, rd.selector, rd.mtype, bytes(rd.cert))
    if kind == dns.rdatatype.TXT:  # one record's strings are one text (RFC 7208 3.3)
        return b"".join(rd.strings).decode("utf-8", "replace")
    return rd.to_text()
