"""Where mail for a recipient domain goes: MX lookup, a smarthost, or a per-domain route.

Each router implements interfaces.IRouter: ``route(domain)`` fires with the list of Hops
to try in order, or fails with PermanentRouteError (bounce) or TemporaryRouteError
(retry later).
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.names import cache, client, dns, hosts, resolve
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import ConfigError
from mailrelay.delivery import dane, mtasts
from mailrelay.delivery.dnssec import (
    Answer,
    DNSClient,
    DNSFailure,
    DNSTimeout,
    LookupFailure,
    NoSuchName,
    QuietPort,
)
from mailrelay.interfaces import IRouter
from mailrelay.logtext import quietly
from mailrelay.scope import ScopeError, is_domain, to_ascii_domain

log = Logger()

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
    policy: dane.TlsPolicy = dane.TlsPolicy()  # what the certificate must satisfy

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


class QuietResolver(client.Resolver):
    """twisted.names' resolver, with each query's port quiet and without its lines about
    re-reading resolv.conf (every change, and at startup, with each server it found)."""

    def maybeParseConfig(self) -> None:
        quietly(super().maybeParseConfig)

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        # client.Resolver's own, on a QuietPort: a new random source port per query.
        proto = dns.DNSDatagramProtocol(self, reactor=self._reactor)
        proto.noisy = False  # "Starting protocol <...DNSDatagramProtocol object at 0x...>"
        for _ in range(1000):
            port = QuietPort(dns.randomSource(), proto, interface, reactor=self._reactor)
            try:
                port.startListening()
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EMFILE:
                    raise
            else:
                return proto
        raise CannotListenError(interface, 0, "no free UDP port for a DNS query")


def router_from_config(config, reactor=None, announce: bool = False):
    """The router for a loaded config.Config: MX or smarthost, under the [routes].
    ``announce``: log once whether DANE is on (the delivery process does, at startup)."""
    d = config.delivery
    lookup, why = dns_lookup(d, reactor) if d.mode == "mx" else (None, "smarthost")
    if announce and d.mode == "mx" and d.mx_tls != "none":
        if isinstance(lookup, DNSClient):
            log.info("delivery: DANE on: DNSSEC status from {servers}",
                     servers=", ".join(f"{h}:{p}" for h, p in lookup.servers))
        else:
            log.info("delivery: DANE off: {why}", why=why)
    if d.mx_tls == "none":
        default, default_why = "none", "mx_tls = none"
    elif isinstance(lookup, DNSClient):
        default, default_why = "dane", "default"
    else:
        default, default_why = "may", "default, DANE off"
    policies = dane.PolicyTable(config.tls_policy, default, default_why)
    ca_file = d.tls_ca_file or None
    if d.mode == "smarthost":
        host, port = d.smarthost
        base = SmarthostRouter(Hop(host, port, tls=d.smarthost_tls, verify=d.smarthost_verify,
                                   username=d.smarthost_username,
                                   password=d.smarthost_password,
                                   ca_file=d.smarthost_ca_file or None))
    else:
        sts = pkix = None
        if d.mta_sts and d.mx_tls != "none":
            if reactor is None:
                from twisted.internet import reactor
            try:
                fetcher = mtasts.Fetcher(reactor, lookup, d.tls_ca_file, d.mta_sts_port)
                pkix = mtasts.Pkix(d.tls_ca_file)
            except Exception as e:  # a missing or unreadable file, no certificate in it
                raise ConfigError(config.source, "delivery", "tls_ca_file",
                                  f"{d.tls_ca_file}: cannot read its certificates ({e})")
            sts = mtasts.PolicyCache(lookup, fetcher.fetch, d.mta_sts_cache, reactor)
        base = MXRouter(lookup, port=d.port, allow_local=d.allow_local_mx, policies=policies,
                        sts=sts, ca_file=ca_file, pkix=pkix)
    if config.routes:
        return RoutedRouter(config.routes, base, policies=policies, ca_file=ca_file)
    return base


def dns_lookup(d, reactor=None):
    """The lookups MX delivery uses, and why DANE is off when it is: dnspython queries
    with their DNSSEC status when ``dnssec = auto`` and the resolvers are trusted, else
    twisted.names (which also reads /etc/hosts and caches)."""
    if d.dnssec == "off":
        return NamesLookup(make_resolver(d.dns_servers, reactor)), "dnssec = off"
    client = DNSClient(d.dns_servers, reactor, trust_all=d.dns_trusted)
    if client.trusted:
        return client, ""
    servers = ", ".join(h for h, _ in client.servers)
    return (NamesLookup(make_resolver(d.dns_servers, reactor)),
            f"no trusted validating resolver (the DNS servers {servers} are not loopback; "
            "dns_trusted = yes trusts them)")


class NamesLookup:
    """twisted.names lookups answering as DNSClient.lookup does, never ``secure``."""

    def __init__(self, resolver) -> None:
        self.resolver = resolver

    def lookup(self, name: str, rdtype: str):
        return defer.ensureDeferred(self._lookup(name, rdtype))

    async def _lookup(self, name: str, rdtype: str) -> Answer:
        method, kind = {"MX": (self.resolver.lookupMailExchange, dns.MX),
                        "A": (self.resolver.lookupAddress, dns.A),
                        "AAAA": (self.resolver.lookupIPV6Address, dns.AAAA),
                        "TXT": (self.resolver.lookupText, dns.TXT)}[rdtype]
        try:
            answers = (await method(name))[0]
        except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
            raise NoSuchName(name)
        except dnserror.DomainError as e:  # SERVFAIL, REFUSED, format errors
            raise DNSFailure(_describe(Failure(e)))
        except defer.TimeoutError:
            raise DNSTimeout(name)
        records = [_names_value(a.payload) for a in answers if a.type == kind]
        cnames = [a.payload.name.name.decode().lower() for a in answers if a.type == dns.CNAME]
        return Answer(records, [] if records else cnames, False)


def _names_value(payload):
    if isinstance(payload, dns.Record_MX):
        return payload.preference, payload.name.name.decode().rstrip(".").lower()
    if isinstance(payload, dns.Record_A):
        return payload.dottedQuad()
    if isinstance(payload, dns.Record_TXT):
        return b"".join(payload.data).decode("utf-8", "replace")
    return _ipv6(payload)


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
                 tls: str = "opportunistic", policies: dane.PolicyTable | None = None,
                 ca_file: str | None = None) -> None:
        # A fixed route has no MX records to validate: dane there is may (config.py
        # refuses dane-only).
        policies = self.policies = policies or dane.PolicyTable(
            default="none" if tls == "none" else "may")
        self.routes = {}
        for d, (host, port) in routes.items():
            level, why = policies.level(d)
            level = "may" if level == "dane" else level
            self.routes[_route_key(d)] = Hop(
                host, port, **_settings(dane.TlsPolicy(level, why), ca_file))
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


def _settings(policy: dane.TlsPolicy, ca_file: str | None = None) -> dict:
    """A Hop's TLS fields for ``policy``; ``ca_file``: the trust roots of verify and
    MTA-STS (None: the system's)."""
    tls = "required" if policy.level in dane.ENCRYPTED else (
        "none" if policy.level == "none" else "opportunistic")
    verify = policy.level in dane.VERIFIED
    return {"tls": tls, "verify": verify, "policy": policy,
            "ca_file": ca_file if verify else None}


class _Unusable(Exception):
    """An MX host that the TLS policy forbids using now (DANE cannot be satisfied, or
    MTA-STS enforce does not list it)."""


@implementer(IRouter)
class MXRouter:
    """Direct delivery: MX records by preference (equal ones shuffled), each resolved to its
    A then AAAA addresses; no MX means the domain's own addresses (RFC 5321 §5.1).

    ``resolver``: a DNSClient (lookups with DNSSEC status, DANE possible) or a
    twisted.names resolver. Each hop carries the TLS policy of its domain (``policies``);
    for dane and dane-only, an MX host whose MX and address records are validated is
    asked for its ``_25._tcp`` TLSA records (RFC 7672 2.2).

    ``sts`` (an mtasts.PolicyCache) gives a domain's MTA-STS policy where its level is
    ``may`` or ``dane``; an MX host with DANE keeps DANE (RFC 8461 2). Under ``enforce``
    an MX host the policy does not list is not used, and the others need a certificate
    verified for their name (trust roots: ``ca_file``, None for the system's)."""

    def __init__(self, resolver, port: int = 25, tls: str = "opportunistic",
                 allow_local: bool = False, rng: random.Random | None = None,
                 policies: dane.PolicyTable | None = None,
                 sts: mtasts.PolicyCache | None = None, ca_file: str | None = None,
                 pkix: mtasts.Pkix | None = None) -> None:
        self.lookup = resolver if hasattr(resolver, "lookup") else NamesLookup(resolver)
        self.port = port
        self.policies = policies or dane.PolicyTable(
            default="none" if tls == "none" else "may")
        self.allow_local = allow_local
        self.sts = sts
        self.ca_file = ca_file
        self.pkix = pkix
        # (hop, problem) for an MX host MTA-STS enforce does not list: TLS reporting
        self.on_session: Callable[[Hop, str], None] | None = None
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
        level, why = self.policies.level(domain)
        fetching = None
        if self.sts is not None and level in ("may", "dane"):
            fetching = defer.ensureDeferred(self.sts.policy(domain))  # beside the MX lookup
        try:
            exchanges, secure = await self._exchanges(domain)
        finally:
            sts = await fetching if fetching is not None else None
        if sts is not None and sts.mode == "none":
            sts = None
        hops: list[Hop] = []
        temporary: str | None = None
        unusable: str | None = None
        refused = 0
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._host(domain, host, level, why, secure, sts))
             for host in exchanges],
            consumeErrors=True)
        for host, (ok, value) in zip(exchanges, results, strict=True):
            if not ok:
                if value.check(_Unusable):
                    unusable = unusable or str(value.value)
                else:
                    temporary = temporary or f"{host}: {_describe(value)}"
                continue
            addresses, policy = value
            for address in addresses:
                if not self.allow_local and is_local(address):
                    refused += 1
                    continue
                hops.append(Hop(host, self.port, address=address,
                                **_settings(policy, self.ca_file)))
        if hops:
            return hops[:MAX_HOPS]
        if unusable:  # never a fallback to a weaker policy: the message waits
            raise TemporaryRouteError(unusable, dane.STATUS)
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
        level, why = self.policies.level(domain)
        if level in ("dane", "dane-only", "verify"):  # no names to match for a literal
            level, why = "encrypt" if level != "dane" else "may", why
        return [Hop(text, self.port, address=text,
                    **_settings(dane.TlsPolicy(level, why), self.ca_file))]

    async def _exchanges(self, domain: str) -> tuple[list[str], bool]:
        """MX hosts in the order to try, or [domain] when it has no MX; and whether every
        answer on the way was DNSSEC-validated."""
        name = domain
        secure = True
        for _ in range(MAX_CNAMES):
            answer = await self._query(name, "MX", domain)
            secure = secure and answer.secure
            if answer.records:
                return self._order(domain, answer.records), secure
            if not answer.cnames:
                return [domain], secure  # no MX: the domain itself is the mail server
            name = answer.cnames[0]
        raise PermanentRouteError(f"CNAME chain too long for {domain}", "5.4.4")

    def _order(self, domain: str, records) -> list[str]:
        hosts = list(records)
        if any(host == "" for _, host in hosts):
            # RFC 7505: "MX 0 ." says the domain accepts no mail at all.
            raise PermanentRouteError(f"{domain} does not accept mail (null MX)", "5.1.10")
        self._rng.shuffle(hosts)
        hosts.sort(key=lambda h: h[0])  # stable: equal preferences stay shuffled
        seen: dict[str, None] = {}
        for _, host in hosts:
            seen.setdefault(host)
        return list(seen)

    async def _host(self, domain: str, host: str, level: str, why: str, secure: bool,
                    sts: mtasts.StsPolicy | None) -> tuple[list[str], dane.TlsPolicy]:
        """The addresses of ``host`` and the TLS policy its hops get (``domain``'s, for
        TLS reporting, when the domain published it)."""
        addresses, secure_addresses = await self._addresses(host)
        policy = await self._dane(host, level, why, secure and secure_addresses)
        if policy.dane:
            return addresses, dataclasses.replace(policy, domain=domain)
        if sts is None:
            return addresses, policy
        if sts.mode == "testing":
            return addresses, dane.TlsPolicy(policy.level, f"{why}; {sts}", names=(host,),
                                             sts=sts, domain=domain, pkix=self.pkix)
        if not sts.matches(host):
            problem = f"{host}: not an MX host of {sts} (mx: {' '.join(sts.mx)}), not used"
            if self.on_session is not None:
                self.on_session(Hop(host, self.port, policy=dane.TlsPolicy(
                    "mta-sts", why, sts=sts, domain=domain)), problem)
            raise _Unusable(problem)
        return addresses, dane.TlsPolicy("mta-sts", f"{why}; {sts}", names=(host,), sts=sts,
                                         domain=domain)

    async def _dane(self, host: str, level: str, why: str, secure: bool) -> dane.TlsPolicy:
        """The policy DANE gives ``host`` under ``level``; ``secure``: its MX and
        address records were validated."""
        if level not in ("dane", "dane-only"):
            return dane.TlsPolicy(level, why)
        if not secure:
            if level == "dane-only":
                raise _Unusable(f"{host}: TLS policy dane-only ({why}): its MX or address "
                                "records are not DNSSEC-validated")
            return dane.TlsPolicy("may", f"{why}; {host}: not DNSSEC-validated")
        name = f"_{self.port}._tcp.{host}"
        try:
            answer = await self._tlsa(name)
        except NoSuchName:
            answer = Answer(secure=True)
        except LookupFailure as e:  # RFC 7672 2.2: a failed lookup makes the host unusable
            raise _Unusable(f"{host}: TLSA lookup for {name} failed ({_error(e)}), TLS "
                            f"policy {level} ({why}): not sent")
        if answer.secure and answer.records:
            return dane.TlsPolicy("dane", f"{why}; DNSSEC-validated TLSA for {host}",
                                  dane.usable(answer.records), (host,))
        if level == "dane-only":
            raise _Unusable(f"{host}: TLS policy dane-only ({why}): no DNSSEC-validated "
                            f"TLSA records at {name}")
        return dane.TlsPolicy("may", f"{why}; no TLSA records for {host}")

    async def _tlsa(self, name: str) -> Answer:
        """The TLSA records at ``name``, through CNAMEs (RFC 7672 2.2.2); secure only if
        every step was."""
        secure = True
        for _ in range(MAX_CNAMES):
            answer = await self.lookup.lookup(name, "TLSA")
            secure = secure and answer.secure
            if answer.records or not answer.cnames:
                return Answer(answer.records, [], secure)
            name = answer.cnames[0]
        raise DNSFailure("CNAME chain too long")

    async def _addresses(self, host: str) -> tuple[list[str], bool]:
        """A then AAAA addresses of ``host``; NXDOMAIN/no data gives []. And whether both
        answers were DNSSEC-validated."""
        found: list[str] = []
        secure = True
        failure: Failure | None = None
        for rtype in ("A", "AAAA"):
            try:
                answer = await self.lookup.lookup(host, rtype)
            except NoSuchName:
                return found, False  # the name does not exist: no AAAA either
            except Exception:
                failure = Failure()
                secure = False
                continue
            secure = secure and answer.secure
            found += answer.records
        if not found and failure is not None:
            failure.raiseException()
        return found, secure

    async def _query(self, name: str, rdtype: str, domain: str) -> Answer:
        try:
            return await self.lookup.lookup(name, rdtype)
        except NoSuchName:
            raise PermanentRouteError(f"domain {domain} does not exist", "5.1.2")
        except DNSTimeout:
            raise TemporaryRouteError(f"DNS timeout for {domain}")
        except DNSFailure as e:  # SERVFAIL, REFUSED, format errors
            raise TemporaryRouteError(f"DNS error for {domain}: {_error(e)}")


def _error(e: Exception) -> str:
    return "timeout" if isinstance(e, DNSTimeout) else str(e) or type(e).__name__


def _ipv6(record: dns.Record_AAAA) -> str:
    return str(ipaddress.IPv6Address(record.address))


def _describe(failure: Failure) -> str:
    if failure.check(LookupFailure):
        return _error(failure.value)
    return failure.type.__name__
