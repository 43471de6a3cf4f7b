"""Where mail for a recipient domain goes: MX lookup, a smarthost, or a per-domain route.

Each router implements interfaces.IRouter: ``route(domain)`` fires with the list of Hops
to try in order, or fails with PermanentRouteError (bounce) or TemporaryRouteError
(retry later).
"""

from __future__ import annotations

import errno
import ipaddress
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from twisted.internet import defer, udp
from twisted.internet.error import CannotListenError
from twisted.names import cache, client, dns, hosts, resolve
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.interfaces import IRouter
from mailrelay.logtext import quietly
from mailrelay.scope import ScopeError, is_domain, to_ascii_domain

MAX_HOPS = 10  # addresses tried in one attempt; more only costs time on a dead domain
MAX_CNAMES = 5


class RouteError(Exception):
    """No usable hop. ``status`` is the enhanced status code, ``code`` the SMTP-like code
    recorded for the recipients."""

    code = 451
    status = "4.4.3"

    def __init__(self, text: str, status: str | None = None) -> None:
        super().__init__(text)
        if status:
            self.status = status

    @property
    def text(self) -> str:
        return f"{self.status} {self.args[0]}"


class PermanentRouteError(RouteError):
    """The domain can never receive mail (null MX, NXDOMAIN, only local addresses)."""

    code = 550
    status = "5.1.2"


class TemporaryRouteError(RouteError):
    """DNS could not answer now (SERVFAIL, timeout)."""


@dataclass(frozen=True, order=True)
class Hop:
    """One server to try. ``address`` is the IP to connect to when the router resolved it
    (MX); None means resolve ``host`` when connecting (smarthost, routes)."""

    host: str
    port: int = 25
    tls: str = "opportunistic"  # "required" | "opportunistic" | "none"
    verify: bool = False  # check the certificate against ``host`` (service-identity)
    username: str = ""
    password: str = ""
    address: str | None = None
    ca_file: str | None = None  # PEM trust roots for verify; None: the platform's

    def __repr__(self) -> str:  # never show the password in logs
        return f"Hop({self.name}:{self.port}, tls={self.tls})"

    @property
    def name(self) -> str:
        """How the hop appears in logs and DSNs: ``host[address]``."""
        if self.address and self.address != self.host:
            return f"{self.host}[{self.address}]"
        return self.host


def make_resolver(servers: Iterable[tuple[str, int]] = (), reactor=None):
    """A twisted.names resolver asking exactly ``servers``, or the system's (resolv.conf
    and /etc/hosts) when none are given, as ``client.createResolver`` makes it."""
    servers = list(servers)
    if servers:
        return QuietResolver(servers=servers, reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(b"/etc/hosts"),
                                  cache.CacheResolver(reactor=reactor),
                                  QuietResolver(resolv=b"/etc/resolv.conf", reactor=reactor)])


class _QueryPort(udp.Port):
    """The UDP port of one DNS query, opened and closed without the lines
    twisted.internet.udp writes for each (``... starting on 47584``, ``(UDP Port 47584
    Closed)``) nor its protocol's (``Starting protocol <... object at 0x...>``): four
    lines a query, nothing a sysadmin can use."""

    def startListening(self) -> None:
        quietly(super().startListening)

    def connectionLost(self, reason=None) -> None:
        quietly(super().connectionLost, reason)


class QuietResolver(client.Resolver):
    """twisted.names' resolver, with each query's port quiet and without its lines about
    re-reading resolv.conf (every change, and at startup, with each server it found)."""

    def maybeParseConfig(self) -> None:
        quietly(super().maybeParseConfig)

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        # client.Resolver's own, on a _QueryPort: a new random source port per query.
        proto = dns.DNSDatagramProtocol(self, reactor=self._reactor)
        proto.noisy = False  # "Starting protocol <...DNSDatagramProtocol object at 0x...>"
        for _ in range(1000):
            port = _QueryPort(dns.randomSource(), proto, interface, reactor=self._reactor)
            try:
                port.startListening()
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EMFILE:
                    raise
            else:
                return proto
        raise CannotListenError(interface, 0, "no free UDP port for a DNS query")


def router_from_config(config, reactor=None):
    """The router for a loaded config.Config: MX or smarthost, under the [routes]."""
    d = config.delivery
    if d.mode == "smarthost":
        host, port = d.smarthost
        base = SmarthostRouter(Hop(host, port, tls=d.smarthost_tls, verify=d.smarthost_verify,
                                   username=d.smarthost_username,
                                   password=d.smarthost_password,
                                   ca_file=d.smarthost_ca_file or None))
    else:
        base = MXRouter(make_resolver(d.dns_servers, reactor), port=d.port, tls=d.mx_tls,
                        allow_local=d.allow_local_mx)
    if config.routes:
        return RoutedRouter(config.routes, base, tls=d.mx_tls)
    return base


def is_local(address: str) -> bool:
    """Loopback, private, link-local and other non-public targets."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified
            or ip.is_multicast or ip.is_reserved)


@implementer(IRouter)
class SmarthostRouter:
    """Everything goes to one configured hop."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop

    def route(self, domain: str):
        return defer.succeed([self.hop])


@implementer(IRouter)
class RoutedRouter:
    """Per-domain routes (exact domain, case-insensitive, U-labels and A-labels alike)
    override ``fallback``."""

    def __init__(self, routes: Mapping[str, tuple[str, int]], fallback,
                 tls: str = "opportunistic") -> None:
        self.routes = {_route_key(d): Hop(host, port, tls=tls)
                       for d, (host, port) in routes.items()}
        self.fallback = fallback

    def route(self, domain: str):
        hop = self.routes.get(_route_key(domain))
        if hop is not None:
            return defer.succeed([hop])
        return self.fallback.route(domain)


def _route_key(domain: str) -> str:
    """A domain as [routes] are looked up: lower case, A-labels (as given if not IDNA)."""
    domain = domain.lower().rstrip(".")
    try:
        return to_ascii_domain(domain)
    except ScopeError:
        return domain


@implementer(IRouter)
class MXRouter:
    """Direct delivery: MX records by preference (equal ones shuffled), each resolved to its
    A then AAAA addresses; no MX means the domain's own addresses (RFC 5321 §5.1)."""

    def __init__(self, resolver, port: int = 25, tls: str = "opportunistic",
                 allow_local: bool = False, rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.port = port
        self.tls = tls
        self.allow_local = allow_local
        self._rng = rng or random.Random()

    def route(self, domain: str):
        return defer.ensureDeferred(self._route(domain.lower().rstrip(".")))

    async def _route(self, domain: str) -> list[Hop]:
        if domain.startswith("[") and domain.endswith("]"):
            return self._literal(domain)
        try:
            # DNS asks for A-labels, made as scopes make them (IDNA 2008, UTS 46): Python's
            # "idna" codec is IDNA 2003, which maps faß.de to fass.de, another domain.
            ascii_domain = to_ascii_domain(domain)
        except ScopeError:
            ascii_domain = ""
        if not is_domain(ascii_domain):
            raise PermanentRouteError(f"{domain!r} is not a valid domain name", "5.1.2")
        domain = ascii_domain
        exchanges = await self._exchanges(domain)
        hops: list[Hop] = []
        temporary: str | None = None
        refused = 0
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._addresses(host)) for host in exchanges],
            consumeErrors=True)
        for host, (ok, value) in zip(exchanges, results, strict=True):
            if not ok:
                temporary = temporary or f"{host}: {_describe(value)}"
                continue
            for address in value:
                if not self.allow_local and is_local(address):
                    refused += 1
                    continue
                hops.append(Hop(host, self.port, tls=self.tls, address=address))
        if hops:
            return hops[:MAX_HOPS]
        if temporary:
            raise TemporaryRouteError(f"cannot resolve the mail servers of {domain}: {temporary}")
        if refused:
            raise PermanentRouteError(
                f"the mail servers of {domain} have only local or private addresses", "5.4.4")
        raise PermanentRouteError(f"the mail servers of {domain} have no address", "5.4.4")

    def _literal(self, domain: str) -> list[Hop]:
        text = domain[1:-1]
        text = text[5:] if text.lower().startswith("ipv6:") else text
        try:
            local = is_local(text)
        except ValueError:
            raise PermanentRouteError(f"bad address literal {domain}", "5.1.2")
        if local and not self.allow_local:
            raise PermanentRouteError(f"{domain} is a local or private address", "5.4.4")
        return [Hop(text, self.port, tls=self.tls, address=text)]

    async def _exchanges(self, domain: str) -> list[str]:
        """MX hosts in the order to try, or [domain] when it has no MX."""
        name = domain
        for _ in range(MAX_CNAMES):
            answers = await self._query(self.resolver.lookupMailExchange, name, domain)
            mx = [a.payload for a in answers if a.type == dns.MX]
            if mx:
                return self._order(domain, mx)
            cnames = [a.payload.name.name.decode() for a in answers if a.type == dns.CNAME]
            if not cnames:
                return [domain]  # no MX: the domain itself is the mail server
            name = cnames[0]
        raise PermanentRouteError(f"CNAME chain too long for {domain}", "5.4.4")

    def _order(self, domain: str, records) -> list[str]:
        hosts = [(r.preference, r.name.name.decode().rstrip(".").lower()) for r in records]
        if any(host == "" for _, host in hosts):
            # RFC 7505: "MX 0 ." says the domain accepts no mail at all.
            raise PermanentRouteError(f"{domain} does not accept mail (null MX)", "5.1.10")
        self._rng.shuffle(hosts)
        hosts.sort(key=lambda h: h[0])  # stable: equal preferences stay shuffled
        seen: dict[str, None] = {}
        for _, host in hosts:
            seen.setdefault(host)
        return list(seen)

    async def _addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of ``host``; NXDOMAIN/no data gives []."""
        found: list[str] = []
        failure: Failure | None = None
        for lookup, rtype in ((self.resolver.lookupAddress, dns.A),
                              (self.resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers = (await lookup(host))[0]
            except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
                return found  # the name does not exist: no AAAA either
            except Exception:
                failure = Failure()
                continue
            found += [a.payload.dottedQuad() if rtype == dns.A else _ipv6(a.payload)
                      for a in answers if a.type == rtype]
        if not found and failure is not None:
            failure.raiseException()
        return found

    async def _query(self, lookup, name: str, domain: str):
        try:
            return (await lookup(name))[0]
        except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
            raise PermanentRouteError(f"domain {domain} does not exist", "5.1.2")
        except dnserror.DomainError as e:  # SERVFAIL, REFUSED, format errors
            raise TemporaryRouteError(f"DNS error for {domain}: {_describe(Failure(e))}")
        except defer.TimeoutError:
            raise TemporaryRouteError(f"DNS timeout for {domain}")


def _ipv6(record: dns.Record_AAAA) -> str:
    return str(ipaddress.IPv6Address(record.address))


def _describe(failure: Failure) -> str:
    return failure.type.__name__
