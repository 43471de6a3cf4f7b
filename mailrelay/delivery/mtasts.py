"""MTA-STS (RFC 8461): a recipient domain's published demand for verified TLS.

A domain that has a ``_mta-sts.<domain>`` TXT record (``v=STSv1; id=...``) serves its
policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``: a mode (``enforce``,
``testing`` or ``none``), the MX host patterns mail may go to, and ``max_age``. The
policy is fetched over HTTPS with the server's certificate verified for that name against
``[delivery] tls_ca_file`` (the system's trust roots when empty), a redirect is a failure
(3.3), the body is capped at MAX_POLICY bytes and the fetch at FETCH_TIMEOUT seconds.

Policies are cached by domain, in memory and on disk (``<data_dir>/mta-sts/<domain>.json``,
written in a thread), for their ``max_age``. A cached policy is used while the TXT record
names its id, or names nothing (an attacker who removes the record cannot remove the
policy, 5.1); a new id fetches the policy again, and a cached policy older than REFRESH
(or half its max_age) is fetched again in the background, so that it does not run out
while the domain keeps it.
A fetch that fails leaves the cached policy in force; without one, the domain has no
policy (as RFC 8461 says: MTA-STS cannot be bootstrapped against an active attacker).

The router (delivery/router.py) applies it: ``enforce`` sends only to MX hosts that match
a pattern, over TLS with a verified certificate for the MX name; ``testing`` delivers as
without a policy and counts what would have failed (TLS reporting, delivery/tlsrpt.py).
DANE wins where the MX host has DNSSEC-validated TLSA records (RFC 8461 2).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass

from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import defer, endpoints, protocol, ssl, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailrelay.delivery.dnssec import LookupFailure, NoSuchName
from mailrelay.files import save_file

log = Logger()

MAX_POLICY = 64 * 1024  # bytes (RFC 8461 3.3 suggests 64 KiB)
FETCH_TIMEOUT = 60.0  # seconds for the whole fetch (3.3: at least 60 s recommended)
MAX_AGE = 31557600  # the largest max_age (3.2): one year
REFRESH = 86400.0  # a cached policy is fetched again once a day while it is used
MODES = ("enforce", "testing", "none")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")


class PolicyError(Exception):
    """A policy that could not be fetched or read; the text says why (TLS reporting's
    ``sts-policy-fetch-error`` / ``sts-policy-invalid``)."""

    kind = "sts-policy-fetch-error"


class PolicyInvalid(PolicyError):
    kind = "sts-policy-invalid"


class PolicyUnverified(PolicyError):
    """The policy server's certificate did not verify (RFC 8460 ``sts-webpki-invalid``)."""

    kind = "sts-webpki-invalid"


@dataclass(frozen=True)
class StsPolicy:
    """A domain's policy as fetched: ``text`` is the body as served (TLS reporting quotes
    it line by line), ``fetched`` the time it was fetched (seconds since the epoch)."""

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float
    text: str = ""

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        """``host`` is an MX name the policy allows (RFC 8461 4.1: a pattern ``*.x.y``
        stands for exactly one label left of ``x.y``)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def __str__(self) -> str:
        return f"MTA-STS {self.mode} (policy {self.id} of {self.domain})"


def parse_txt(strings: Iterable[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT records, or None: no record starting
    with ``v=STSv1``, more than one (3.1: then there is none), or a malformed one."""
    found = [s for s in strings if s.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1" or not _ID.match(fields.get("id", "")):
        return None
    return fields["id"]


def parse_policy(text: str, domain: str, id: str, fetched: float) -> StsPolicy:
    """The policy body (3.2: ``key: value`` lines, CRLF or LF); PolicyInvalid if it is
    not one."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            if line.strip():
                raise PolicyInvalid(f"not a policy line: {line[:80]!r}")
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyInvalid("no version: STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyInvalid(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyInvalid(f"max_age {age!r} is not a number of seconds")
    bad = [p for p in mx if not _PATTERN.match(p)]
    if bad:
        raise PolicyInvalid(f"mx {bad[0]!r} is not a host name pattern")
    if not mx and mode != "none":
        raise PolicyInvalid("no mx line")
    return StsPolicy(domain, id, mode, tuple(mx), min(int(age), MAX_AGE), fetched, text)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """HTTPS to the policy host at the address the relay's own DNS lookups give (the same
    resolver as MX delivery), the certificate verified for the host name."""

    def __init__(self, reactor, address: str, trust) -> None:
        self.reactor, self.address, self.trust = reactor, address, trust

    def endpointForURI(self, uri):
        tcp = (endpoints.TCP6ClientEndpoint if ":" in self.address else
               endpoints.TCP4ClientEndpoint)(self.reactor, self.address, uri.port,
                                             timeout=FETCH_TIMEOUT)
        creator = BrowserLikePolicyForHTTPS(self.trust).creatorForNetloc(uri.host, uri.port)
        return endpoints.wrapClientTLS(creator, tcp)


class _Capped(protocol.Protocol):
    """Collects a response body up to ``limit`` bytes; more aborts the connection."""

    def __init__(self, limit: int, done: defer.Deferred) -> None:
        self.limit, self.done, self.parts, self.size = limit, done, [], 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.give_up(f"the policy is larger than {self.limit} bytes")
            return
        self.parts.append(data)

    def give_up(self, why: str) -> None:
        if not self.done.called:
            self.done.errback(PolicyError(why))
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(PolicyError(f"the policy's body was cut off ({reason.value})"))


def trust_root(ca_file: str = ""):
    """Trust roots for verified certificates: the PEM file ``ca_file``, else the
    system's."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        data = f.read()
    end = b"-----END CERTIFICATE-----"
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(b + end) for b in data.split(end) if b"-----BEGIN" in b])


class Pkix:
    """The certificate check of MTA-STS in mode testing, where the connection itself does
    not verify: OpenSSL's chain check against the trust roots (``ca_file``, else the
    system's bundle, read once here at startup) and service-identity's name check, as
    enforce's verified TLS makes them."""

    def __init__(self, ca_file: str = "") -> None:
        import ssl as stdlib_ssl

        self.store = crypto.X509Store()
        paths = stdlib_ssl.get_default_verify_paths()
        bundle = ca_file or paths.cafile or paths.openssl_cafile
        if bundle and os.path.exists(bundle):
            self.store.load_locations(bundle)

    def problem(self, chain, names: Iterable[str]) -> str | None:
        """None when ``chain`` (cryptography certificates, the leaf first) verifies for
        one of ``names``, else why not."""
        if not chain:
            return "the server sent no certificate"
        leaf, *rest = [crypto.X509.from_cryptography(c) for c in chain]
        try:
            crypto.X509StoreContext(self.store, leaf, rest).verify_certificate()
        except crypto.X509StoreContextError as e:
            return f"TLS handshake failed: certificate verify failed ({e})"
        for name in names:
            try:
                verify_certificate_hostname(chain[0], name)
                return None
            except (VerificationError, CertificateError):
                continue
        return "TLS certificate does not match the host name"


class Fetcher:
    """Fetches policies over HTTPS (``port``: 443; another only for tests)."""

    def __init__(self, reactor, lookup, ca_file: str = "", port: int = 443) -> None:
        self.reactor, self.lookup, self.port = reactor, lookup, port
        self.trust = trust_root(ca_file)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        address = await self._address(host)
        agent = Agent.usingEndpointFactory(self.reactor,
                                           _Endpoints(self.reactor, address, self.trust),
                                           pool=self.pool)
        port = "" if self.port == 443 else f":{self.port}"
        url = f"https://{host}{port}/.well-known/mta-sts.txt".encode("ascii")
        request = agent.request(b"GET", url, Headers({b"User-Agent": [b"mailrelay"]}))
        reader: list[_Capped] = []  # the body's reader, once the headers are in

        def expire() -> None:  # the whole fetch, headers and body, has FETCH_TIMEOUT
            request.cancel()
            if reader:
                reader[0].give_up(f"{host}: no answer in {FETCH_TIMEOUT:g} s")

        timer = self.reactor.callLater(FETCH_TIMEOUT, expire)
        try:
            try:
                response = await request
            except defer.CancelledError:
                raise PolicyError(f"{host}: no answer in {FETCH_TIMEOUT:g} s")
            except Exception as e:
                reason = _reason(e)
                kind = PolicyUnverified if reason.startswith("TLS") else PolicyError
                raise kind(f"{host}: {reason}")
            if response.code != 200:  # 3.3: redirects are not followed
                response.deliverBody(protocol.Protocol())
                raise PolicyError(f"{host}: HTTP {response.code}")
            kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
            if kind.split(b";")[0].strip().lower() != b"text/plain":
                response.deliverBody(protocol.Protocol())
                raise PolicyError(f"{host}: served as {kind.decode('latin-1')!r}, "
                                  "not text/plain")
            done: defer.Deferred[bytes] = defer.Deferred()
            reader.append(_Capped(MAX_POLICY, done))
            response.deliverBody(reader[0])
            body = await done
        finally:
            if timer.active():
                timer.cancel()
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyInvalid(f"{host}: the policy is not UTF-8 text")

    async def _address(self, host: str) -> str:
        for rtype in ("A", "AAAA"):
            try:
                answer = await self.lookup.lookup(host, rtype)
            except NoSuchName:
                break
            except LookupFailure as e:
                raise PolicyError(f"{host}: DNS: {e or type(e).__name__}")
            if answer.records:
                return answer.records[0]
        raise PolicyError(f"{host} has no address")


def _reason(e: Exception) -> str:
    # Agent wraps what went wrong in ResponseNeverReceived and the like: their reasons.
    reasons = getattr(e, "reasons", None)
    if reasons:
        e = reasons[0].value
    from mailrelay.delivery.client import _describe

    return _describe(e)


class PolicyCache:
    """MTA-STS policies by domain: the TXT record's id checked each time, the policy
    fetched when it changed or is missing, kept on disk under ``directory``.

    ``fetch(domain)`` fires with the policy's text; ``in_thread(f, *args)`` runs the disk
    reads and writes off the reactor; ``on_failure(domain, error)`` hears of each failed
    fetch (TLS reporting)."""

    def __init__(self, lookup, fetch: Callable[[str], Awaitable[str]], directory: str,
                 clock, in_thread: Callable = threads.deferToThread,
                 on_failure: Callable[[str, PolicyError], None] | None = None) -> None:
        self.lookup = lookup
        self.fetch = fetch
        self.directory = directory
        self.clock = clock
        self.in_thread = in_thread
        self.on_failure = on_failure
        self._memory: dict[str, StsPolicy | None] = {}
        self._pending: dict[str, list[defer.Deferred[StsPolicy]]] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in force for ``domain`` now (mode none included), or None."""
        domain = domain.lower().rstrip(".")
        if domain not in self._memory:
            self._memory.setdefault(domain, await self.in_thread(self._load, domain))
        cached = self._memory[domain]
        now = self.clock.seconds()
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            answer = await self.lookup.lookup(f"_mta-sts.{domain}", "TXT")
            id = parse_txt(answer.records)
        except NoSuchName:
            id = None
        except LookupFailure:  # the cached policy, if any, stands
            id = cached.id if cached else None
        if cached is not None and id in (None, cached.id):
            if now - cached.fetched > min(REFRESH, cached.max_age / 2):  # in the background
                self._refresh(domain, cached.id).addErrback(lambda f: f.trap(PolicyError))
            return cached
        if id is None:
            return None
        try:
            return await self._refresh(domain, id)
        except PolicyError:
            return cached

    def _refresh(self, domain: str, id: str) -> defer.Deferred[StsPolicy]:
        """The fetch of ``domain``'s policy: one at a time per domain, shared."""
        waiter: defer.Deferred[StsPolicy] = defer.Deferred()
        if domain in self._pending:
            self._pending[domain].append(waiter)
        else:
            self._pending[domain] = [waiter]
            defer.ensureDeferred(self._fetch(domain, id)).addBoth(self._fetched, domain)
        return waiter

    def _fetched(self, result, domain: str) -> None:
        for waiter in self._pending.pop(domain, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _fetch(self, domain: str, id: str) -> StsPolicy:
        try:
            text = await self.fetch(domain)
            policy = parse_policy(text, domain, id, self.clock.seconds())
        except PolicyError as e:
            log.warn("delivery: MTA-STS policy of {domain} not fetched: {why}",
                     domain=domain, why=str(e))
            if self.on_failure is not None:
                self.on_failure(domain, e)
            raise
        self._memory[domain] = policy
        log.info("delivery: MTA-STS policy {id} of {domain}: mode {mode}, mx {mx}, "
                 "max_age {age}", id=policy.id, domain=domain, mode=policy.mode,
                 mx=" ".join(policy.mx) or "-", age=policy.max_age)
        try:
            await self.in_thread(self._save, policy)
        except OSError as e:  # still in force, in memory
            log.warn("delivery: MTA-STS policy of {domain} not saved: {e}", domain=domain,
                     e=str(e))
        return policy

    def _path(self, domain: str) -> str:
        return os.path.join(self.directory, f"{domain}.json")

    def _load(self, domain: str) -> StsPolicy | None:
        try:
            with open(self._path(domain), "rb") as f:
                doc = json.loads(f.read())
            doc["mx"] = tuple(doc["mx"])
            return StsPolicy(**doc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warn("delivery: cached MTA-STS policy of {domain} unreadable ({e}), "
                     "fetched again", domain=domain, e=str(e))
            return None

    def _save(self, policy: StsPolicy) -> None:
        save_file(self._path(policy.domain), json.dumps(asdict(policy)).encode())
