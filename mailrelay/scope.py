"""Sender scopes: which envelope and header senders a login may use.

A scope is a set of authorized domains and a set of authorized addresses, written the way
the control panels of hosted relays write them: ``a.com;b.com`` and ``x@a.com;y@b.com``.
A domain authorizes exactly that domain; subdomains are listed explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import idna

# RFC 1035 labels (letters, digits, hyphen; not starting or ending with a hyphen), at least
# two labels, the last alphabetic or an IDNA "xn--" label.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}})$")
# A dot-atom local part (RFC 5322 3.2.3); quoted local parts are not accepted in scopes.
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
# The same with RFC 6532's UTF8-non-ascii in atext: an SMTPUTF8 sender's local part, which
# a domain of the scope authorizes (address entries stay ASCII).
_ATEXT_UTF8 = r"[a-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]"
_LOCAL_UTF8_RE = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*")


class ScopeError(ValueError):
    """A scope, domain or address that cannot be accepted; the text says why."""


# Both are asked several times per message about the same few names (login, sender,
# scope): the answers are kept, for a bounded number of strings.
@lru_cache(maxsize=4096)
def is_domain(text: str) -> bool:
    """An ASCII domain name (IDNA names in their ``xn--`` form; see to_ascii_domain)."""
    # fullmatch: "$" alone would also accept a trailing newline ("a.com\n").
    return len(text) <= 253 and bool(_DOMAIN_RE.fullmatch(text.lower()))


@lru_cache(maxsize=4096)
def is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return (
        bool(at)
        and len(text) <= 254
        and len(local) <= 64
        and bool(_LOCAL_RE.fullmatch(local.lower()))
        and is_domain(domain)
    )


def to_ascii_domain(text: str) -> str:
    """Lower-case ``text``; an internationalized name (``bücher.de``) becomes its IDNA 2008
    A-label form (``xn--bcher-kva.de``), the form scopes store and compare."""
    text = text.lower()
    if text.isascii():
        return text
    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except UnicodeError as e:  # idna.IDNAError is a UnicodeError
        raise ScopeError(f"{text!r} is not a valid internationalized domain name: {e}")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _split(text: str, what: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    if "," in text:
        raise ScopeError(f"{what} are separated by semicolons, not commas: {text!r}")
    items = [item.strip() for item in text.split(";")]
    if any(not item for item in items):
        raise ScopeError(f"empty entry in {what}: {text!r}")
    return items


def parse_domains(text: str) -> frozenset[str]:
    """``a.com;b.com`` -> {"a.com", "b.com"}; ScopeError names the bad entry."""
    out = set()
    for item in _split(text, "domains"):
        if "@" in item:
            raise ScopeError(f"{item!r} is an address, not a domain")
        domain = to_ascii_domain(item)
        if not is_domain(domain):
            raise ScopeError(f"{item!r} is not a valid domain name{_hint(item)}")
        out.add(domain)
    return frozenset(out)


def parse_addresses(text: str) -> frozenset[str]:
    """``x@a.com;y@b.com`` -> {"x@a.com", "y@b.com"}; ScopeError names the bad entry."""
    out = set()
    for item in _split(text, "addresses"):
        address = to_ascii_address(item)
        if address is None or not is_address(address):
            raise ScopeError(f"{item!r} is not a valid email address{_hint(item)}")
        out.add(address)
    return frozenset(out)


def to_ascii_address(text: str) -> str | None:
    """``Local@Bücher.de`` -> ``local@xn--bcher-kva.de``; None when the domain is not valid.

    Only the domain is converted (U-labels and A-labels name one domain): non-ASCII local
    parts (SMTPUTF8) are not accepted in scopes' address entries.
    """
    local, at, domain = text.rpartition("@")
    if not at:
        return None
    try:
        return f"{local.lower()}@{to_ascii_domain(domain)}"
    except ScopeError:
        return None


def ascii_form(address: str) -> str | None:
    """``address`` as it is written where SMTPUTF8 is not (a next hop without it, a
    header): its domain as A-labels (RFC 6531 3.2 lets a relay convert the domain), the
    local part untouched; None when the local part is not ASCII (only SMTPUTF8 can carry
    it) or the domain is not a valid IDNA name."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{to_ascii_domain(domain)}"
    except ScopeError:
        return None


def _hint(item: str) -> str:
    return " (separate entries with semicolons)" if any(c.isspace() for c in item) else ""


@dataclass(frozen=True)
class Scope:
    domains: frozenset[str] = field(default_factory=frozenset)
    addresses: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, domains: str = "", addresses: str = "") -> Scope:
        return cls(parse_domains(domains), parse_addresses(addresses))

    def allows(self, address: str) -> bool:
        """True when ``address`` (an envelope or header sender) is inside this scope.

        Comparison is case-insensitive; the null sender is never in scope.
        """
        address = to_ascii_address(address.strip())
        if address is None:
            return False
        if is_address(address):
            return address in self.addresses or domain_of(address) in self.domains
        # An SMTPUTF8 local part (jöhn@doe.com): only a domain entry can authorize it.
        local, _, domain = address.rpartition("@")
        return (domain in self.domains and len(local.encode("utf-8")) <= 64
                and _LOCAL_UTF8_RE.fullmatch(local) is not None
                and not any(c.isspace() or not c.isprintable() for c in local))

    def within(self, domains: frozenset[str]) -> Scope:
        """This scope limited to ``domains`` (an account's authorized domains)."""
        return Scope(
            frozenset(d for d in self.domains if d in domains),
            frozenset(a for a in self.addresses if domain_of(a) in domains),
        )

    def outside(self, domains: frozenset[str]) -> list[str]:
        """Entries of this scope that lie outside ``domains``, for a clear admin error."""
        return sorted(d for d in self.domains if d not in domains) + sorted(
            a for a in self.addresses if domain_of(a) not in domains
        )

    @property
    def empty(self) -> bool:
        return not self.domains and not self.addresses

    def domains_text(self) -> str:
        return ";".join(sorted(self.domains))

    def addresses_text(self) -> str:
        return ";".join(sorted(self.addresses))

    def __str__(self) -> str:
        return ";".join(sorted(self.domains) + sorted(self.addresses))
