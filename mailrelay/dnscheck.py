"""DNS checks of a sending domain, shared by sender verification (verification.py) and
``mailrelay-admin domain check``: TXT lookups through a twisted.names resolver
(delivery.router.make_resolver with ``[delivery] dns_servers``), SPF evaluation, and the
DKIM and DMARC records.

SPF is evaluated here rather than with pyspf or checkdmarc: both resolve with their own
blocking DNS clients, which neither run on the reactor nor ask the servers configured in
``dns_servers``. The subset evaluated is what published records use -- ip4, ip6, a, mx,
include, exists, all and redirect= -- with RFC 7208's limit of 10 DNS-querying terms;
``ptr`` never matches (RFC 7208 5.5 says not to use it) and a macro (``%{...}``) is
reported as not evaluated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dnserror

DNS_TIMEOUT = (2, 4)  # seconds per try of a lookup asked for by an admin
SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4: terms causing DNS queries
MX_LIMIT = 10  # RFC 7208 4.6.4: MX names looked up for one mx mechanism


class DnsFailure(Exception):
    """No answer: a timeout or SERVFAIL; the record's state is unknown."""


async def _lookup(resolver, method: str, name: str):
    """The answers of one lookup; [] when the name does not exist or has no such record.
    Raises DnsFailure when the servers do not answer."""
    try:
        answers, _, _ = await getattr(resolver, method)(name, timeout=DNS_TIMEOUT)
    except (dnserror.DNSNameError, dnserror.AuthoritativeDomainError):  # NXDOMAIN
        return []
    except (dnserror.DomainError, dnserror.DNSServerError, dnserror.DNSQueryRefusedError,
            defer.TimeoutError, dnserror.DNSQueryTimeoutError) as e:  # fmt: skip
        raise DnsFailure(f"{name}: {type(e).__name__}")
    return answers


async def txt_records(resolver, name: str) -> list[str]:
    """The TXT records of ``name``, each one record's character-strings joined (RFC 7208
    3.3, RFC 6376 3.6.2.2); [] when there is none or the name does not exist. Raises
    DnsFailure when the servers do not answer."""
    answers = await _lookup(resolver, "lookupText", name)
    return [b"".join(a.payload.data).decode("utf-8", "replace").strip()
            for a in answers if a.type == dns.TXT]  # fmt: skip


async def mx_records(resolver, name: str) -> list[tuple[int, str]]:
    """The MX records of ``name`` as (preference, host in lower case, no final dot), in
    preference order; [] when there is none. Raises DnsFailure when the servers do not
    answer."""
    answers = await _lookup(resolver, "lookupMailExchange", name)
    return sorted((a.payload.preference, str(a.payload.name).lower().rstrip("."))
                  for a in answers if a.type == dns.MX)


def tags(record: str) -> dict[str, str]:
    """The tag=value list of a DKIM or DMARC record (RFC 6376 3.2), tags lower-cased;
    folding whitespace inside values removed."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out.setdefault(name.strip().lower(), "".join(value.split()))
    return out


def spf_record(records: list[str]) -> list[str]:
    """The SPF records among a name's TXT records (RFC 7208 4.5)."""
    return [r for r in records if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]


class SpfError(Exception):
    """permerror: the record cannot be evaluated (RFC 7208 2.6.7)."""


@dataclass
class _Budget:
    left: int = SPF_LOOKUP_LIMIT

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise SpfError(f"more than {SPF_LOOKUP_LIMIT} DNS lookups")


async def _addresses(resolver, name: str, version: int) -> list:
    method = "lookupAddress" if version == 4 else "lookupIPV6Address"
    kind, make = (dns.A, ipaddress.IPv4Address) if version == 4 else (dns.AAAA,
                                                                      ipaddress.IPv6Address)
    return [make(a.payload.address) for a in await _lookup(resolver, method, name)
            if a.type == kind]  # fmt: skip


def _network(address, cidr: str | None):
    if cidr is None:
        return ipaddress.ip_network(address)
    return ipaddress.ip_network(f"{address}/{cidr}", strict=False)


def _cidrs(spec: str) -> tuple[str, str | None, str | None]:
    """``domain/24//64`` into the domain and its IPv4 and IPv6 prefix lengths."""
    spec, _, v6 = spec.partition("//")
    spec, _, v4 = spec.partition("/")
    return spec, v4 or None, v6 or None


async def spf_check(resolver, ip: str, domain: str, budget: _Budget | None = None) -> str:
    """RFC 7208's check_host() for ``ip`` sending as ``domain``: pass, fail, softfail,
    neutral or none. Raises SpfError (permerror) and DnsFailure (temperror)."""
    budget = budget or _Budget()
    address = ipaddress.ip_address(ip)
    found = spf_record(await txt_records(resolver, domain))
    if not found:
        return "none"
    if len(found) > 1:
        raise SpfError(f"{domain} publishes {len(found)} SPF records (one is allowed)")
    results = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
    redirect = None
    for term in found[0].split()[1:]:
        if "%{" in term:
            raise SpfError(f"{term!r}: macros are not evaluated")
        qualifier = term[0] if term[0] in results else "+"
        body = term.lstrip("+-~?")
        name, sep, arg = body.partition(":")
        name = name.lower()
        if "=" in name and not sep:  # a modifier
            key, _, value = body.partition("=")
            if key.lower() == "redirect":
                redirect = value
            continue
        if await _matches(resolver, address, domain, name, arg, budget):
            return results[qualifier]
    if redirect is not None:
        budget.spend()
        result = await spf_check(resolver, ip, redirect, budget)
        if result == "none":
            raise SpfError(f"redirect={redirect} has no SPF record")
        return result
    return "neutral"


async def _matches(resolver, address, domain: str, name: str, arg: str, budget) -> bool:
    version = address.version
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        if (name == "ip4") != (version == 4):
            return False
        try:
            return address in ipaddress.ip_network(arg, strict=False)
        except ValueError:
            raise SpfError(f"{name}:{arg} is not a network")
    if name.startswith(("a/", "mx/")) or name in ("a", "mx"):
        name, _, cidr = name.partition("/")
        arg = arg + ("/" + cidr if cidr else "")
    if name not in ("a", "mx", "include", "exists", "ptr"):
        raise SpfError(f"unknown mechanism {name!r}")
    budget.spend()
    if name == "ptr":
        return False
    if name == "include":
        result = await spf_check(resolver, str(address), arg, budget)
        if result == "none":
            raise SpfError(f"include:{arg} has no SPF record")
        return result == "pass"
    if name == "exists":
        return bool(await _addresses(resolver, arg, 4))
    target, v4, v6 = _cidrs(arg or domain)
    target = target or domain
    hosts = [target]
    if name == "mx":
        answers = await _lookup(resolver, "lookupMailExchange", target)
        hosts = [str(a.payload.name) for a in answers if a.type == dns.MX][:MX_LIMIT]
    for host in hosts:
        for found in await _addresses(resolver, host, version):
            if address in _network(found, v4 if version == 4 else v6):
                return True
    return False
