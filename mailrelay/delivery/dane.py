"""Outbound TLS policy per destination, and DANE's certificate check (RFC 7672).

Levels, as Postfix's ``smtp_tls_security_level`` names them:

- ``none``: no STARTTLS.
- ``may``: STARTTLS when offered, any certificate (opportunistic, RFC 7435).
- ``encrypt``: STARTTLS required, any certificate.
- ``dane``: DANE when the MX host has DNSSEC-validated TLSA records, else ``may``. The
  default when a trusted validating resolver is configured.
- ``dane-only``: DANE required: no validated TLSA records means the message waits.
- ``verify``: STARTTLS required, the certificate verified against the MX host name with
  the system's trust roots.

With DANE (RFC 7672): TLS is required and the server's certificate chain must match a
usable TLSA record: DANE-EE(3) (the leaf; names and dates are not checked) or DANE-TA(2)
(a certificate of the chain the leaf chains up to, the leaf's names and dates checked
against the MX host name); selector 0 (the whole certificate) or 1 (its public key);
matching 0 (exact), 1 (SHA-256) or 2 (SHA-512). PKIX-TA(0) and PKIX-EE(1) are unusable
for SMTP (3.1.3) and left out; when every record is unusable TLS is still mandatory but
the certificate is not checked (2.2). The check runs as the TLS handshake completes,
before anything is sent inside TLS; a mismatch, a missing STARTTLS or a failed TLSA
lookup defers the message: there is no fallback to cleartext or to a weaker policy.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailrelay.delivery.dnssec import TLSA

LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "verify")
ENCRYPTED = ("encrypt", "verify", "dane", "mta-sts")  # a hop's levels that require TLS
VERIFIED = ("verify", "mta-sts")  # a hop's levels that verify the certificate (PKIX)
DANE_TA, DANE_EE = 2, 3
STATUS = "4.7.5"  # RFC 3463: cryptographic failure


@dataclass(frozen=True)
class TlsPolicy:
    """What a hop's TLS must satisfy. ``level`` is the one applied (``dane`` only when
    validated TLSA records were found), ``why`` says where it came from, for the log and
    the queue. ``tlsa``: the usable records; ``names``: the reference identifiers a
    DANE-TA chain's leaf must carry. Level ``mta-sts`` is a domain's MTA-STS policy in
    mode enforce (delivery/mtasts.py); ``sts`` that policy, in mode testing too, where
    ``pkix`` checks the certificate only to report what would have failed. ``domain``:
    the recipient domain whose policy (DANE or MTA-STS) this is, for TLS reporting
    (delivery/tlsrpt.py); its connections carry that domain's mail only."""

    level: str = "may"
    why: str = "default"
    tlsa: tuple[TLSA, ...] = ()
    names: tuple[str, ...] = ()
    sts: object = None  # mtasts.StsPolicy
    domain: str = ""
    pkix: object = field(default=None, compare=False)  # mtasts.Pkix, for testing

    def __str__(self) -> str:
        return f"{self.level} ({self.why})"

    @property
    def dane(self) -> bool:
        return self.level == "dane"

    @property
    def testing(self) -> bool:
        """An MTA-STS policy in mode testing: checked, reported, never enforced."""
        return self.sts is not None and self.level != "mta-sts" and self.pkix is not None

    @property
    def checked(self) -> bool:
        """The certificate is checked against a policy the recipient domain published
        (DANE with usable TLSA records, MTA-STS enforce): what REQUIRETLS needs."""
        return (self.dane and bool(self.tlsa)) or self.level == "mta-sts"

    def check(self, chain: Sequence[x509.Certificate],
              now: datetime.datetime | None = None) -> str | None:
        """None when ``chain`` (the leaf first, as the server sent it) satisfies the
        policy, else why not."""
        if self.testing:
            return self.pkix.problem(chain, self.names)
        if not self.dane or not self.tlsa:
            return None  # no DANE, or only unusable records: encrypted is enough
        return match(self.tlsa, chain, self.names, now)


def usable(records: Iterable[TLSA]) -> tuple[TLSA, ...]:
    """The records DANE for SMTP can use (RFC 7672 3.1.3), each once."""
    seen: dict[TLSA, None] = {}
    for r in records:
        if r.usage in (DANE_TA, DANE_EE) and r.selector in (0, 1) and r.mtype in (0, 1, 2):
            seen.setdefault(r)
    return tuple(seen)


def _digest(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    data = (cert.public_bytes(Encoding.DER) if selector == 0 else
            cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _matches(record: TLSA, cert: x509.Certificate) -> bool:
    return _digest(cert, record.selector, record.mtype) == record.data


def match(records: Iterable[TLSA], chain: Sequence[x509.Certificate],
          names: Iterable[str] = (), now: datetime.datetime | None = None) -> str | None:
    """None when ``chain`` matches one of ``records`` (usable ones), else the reason."""
    if not chain:
        return "the server sent no certificate"
    records = usable(records)
    leaf = chain[0]
    if any(r.usage == DANE_EE and _matches(r, leaf) for r in records):
        return None
    anchors = [r for r in records if r.usage == DANE_TA]
    for depth in range(1, len(chain)):
        if not any(_matches(r, chain[depth]) for r in anchors):
            continue
        problem = _chain_problem(chain[:depth + 1], now)
        if problem is None:
            problem = _name_problem(leaf, names)
        if problem is None:
            return None
        return f"the certificate chains to a DANE-TA record, but {problem}"
    return "no TLSA record matches the certificate chain"


def _chain_problem(chain: Sequence[x509.Certificate],
                   now: datetime.datetime | None) -> str | None:
    """Each certificate signed by the next; those below the anchor within their dates."""
    now = now or datetime.datetime.now(datetime.UTC)
    for cert, issuer in zip(chain, chain[1:], strict=False):
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            return f"{_cn(cert)} is not signed by {_cn(issuer)}"
    for cert in chain[:-1]:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return f"the certificate of {_cn(cert)} has expired or is not yet valid"
    return None


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"


def _name_problem(leaf: x509.Certificate, names: Iterable[str]) -> str | None:
    names = [n.lower().rstrip(".") for n in names]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        presented = [d.lower() for d in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:  # RFC 7672 3.2.3: then the common name
        presented = [a.value.lower() for a in
                     leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                     if isinstance(a.value, str)]
    if any(_name_matches(p, n) for p in presented for n in names):
        return None
    return (f"its names ({', '.join(presented) or 'none'}) do not include "
            f"{' or '.join(names) or 'the host name'}")


def _name_matches(pattern: str, name: str) -> bool:
    """A name, or a wildcard for exactly the leftmost label (RFC 6125 6.4.3)."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return False


class PolicyTable:
    """The level for each recipient domain: ``[tls_policy]`` (exact domain, then its
    parent domains as ``.example.com`` entries), else ``default``."""

    def __init__(self, table: dict[str, str] | None = None, default: str = "may",
                 default_why: str = "default") -> None:
        self.table = {k.lower().rstrip("."): v for k, v in (table or {}).items()}
        self.default = default
        self.default_why = default_why

    def level(self, domain: str) -> tuple[str, str]:
        domain = domain.lower().rstrip(".")
        if domain in self.table:
            return self.table[domain], f"tls_policy {domain}"
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self.table:
                return self.table[parent], f"tls_policy {parent}"
        return self.default, self.default_why
