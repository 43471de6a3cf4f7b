"""Sender verification: a sender added through the control panel is used only once it is
confirmed -- an address by following a link mailed to it, a domain by publishing a DNS
TXT record -- as hosted relays require before a new sender is used.

The state lives with the user: ``SmtpUser.unverified`` holds the scope entries still
waiting. Every other entry counts as verified, so senders added with ``mailrelay-admin``
(and LDAP users, which the panel cannot change) are verified implicitly. The sender checks
(policy/sender.py) ask ``is_verified(user, sender)`` at MAIL FROM: no I/O, the user the
session already has.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from twisted.logger import Logger

from mailrelay.dnscheck import txt_records
from mailrelay.model import Envelope, SmtpUser
from mailrelay.scope import domain_of, is_address, to_ascii_address
from mailrelay.signing import BadSignature, MalformedToken, Signer, load_or_create_key

log = Logger()

TXT_PREFIX = "mailrelay-verification="
LINK_LIFETIME = 7 * 86400.0
MAX_LINK_TOKEN = 2048  # longer input is refused before any work
_CONTEXT = b"mailrelay-sender-verification-v1\0"


class VerificationError(ValueError):
    """A link that this relay did not make, was altered, or has expired."""


def is_verified(user: SmtpUser, sender: str) -> bool:
    """False when every scope entry that covers ``sender`` (its address, its domain) is
    still waiting for confirmation. Whether the sender is in scope at all is the scope
    check's business: a sender no entry covers is not refused here."""
    if not user.unverified:
        return True
    address = to_ascii_address(sender.strip())
    if address is None:
        return True
    scope = user.effective_scope()
    covering = [e for e in (address, domain_of(address)) if e in scope.addresses | scope.domains]
    return not covering or any(e not in user.unverified for e in covering)


def entries_to_verify(
    before: SmtpUser | None, after: SmtpUser, neighbours: Iterable[SmtpUser]
) -> frozenset[str]:
    """The scope entries of ``after`` that a change through the panel leaves waiting: those
    it added (all of them for a new user, ``before`` None), minus entries another user of
    the same account already has verified (an organisation confirms its domain once) and
    addresses at such a verified domain."""
    from mailrelay.directory.filedir import scope_entries

    added = scope_entries(after) - (scope_entries(before) if before is not None else frozenset())
    vouched: set[str] = set()
    for other in neighbours:
        if other.username != after.username and other.account == after.account:
            vouched |= scope_entries(other) - other.unverified
    waiting = (after.unverified | added) - vouched
    # An address at a domain the account has verified needs no confirmation of its own.
    return frozenset(e for e in waiting if not ("@" in e and domain_of(e) in vouched))


@dataclass(frozen=True)
class LinkClaim:
    username: str
    address: str
    expires: float


class VerificationTokens:
    """Signs confirmation links and derives the DNS TXT value of a domain (HMAC-SHA256
    under the panel's key; without the key neither can be made)."""

    def __init__(self, key: bytes) -> None:
        self._links = Signer(key, _CONTEXT + b"link\0", "the verification key")
        self._dns = Signer(key, _CONTEXT + b"dns\0", "the verification key")

    @classmethod
    def from_key_file(cls, path: str) -> VerificationTokens:
        """Use the key in ``path``, made (mode 0600) on first use. Blocking: at start-up."""
        return cls(load_or_create_key(path))

    def link_token(self, username: str, address: str, expires: float) -> str:
        payload = json.dumps([username, address, int(expires)], separators=(",", ":")).encode()
        return self._links.seal(payload)

    def check_link(self, token: str, now: float) -> LinkClaim:
        try:
            payload = self._links.open(token, MAX_LINK_TOKEN)
        except MalformedToken:
            raise VerificationError("malformed link")
        except BadSignature:
            raise VerificationError("this link was not made by this relay")
        username, address, expires = json.loads(payload)
        if now > expires:
            raise VerificationError("this link has expired; ask for a new one")
        return LinkClaim(username, address, float(expires))

    def txt_value(self, account: str, domain: str) -> str:
        """The TXT record ``domain`` must publish for users of ``account``."""
        tag = self._dns.tag(f"{account}\0{domain.lower()}".encode())
        return TXT_PREFIX + base64.b32encode(tag).decode("ascii").rstrip("=").lower()


def confirmation_message(
    hostname: str, postmaster: str, username: str, address: str, url: str, expires: float,
    now: float,
) -> bytes:
    """The confirmation mail: canonical CRLF lines, as the spool stores a body."""
    moment = datetime.fromtimestamp(now, UTC)
    until = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"From: Mail relay {hostname} <{postmaster}>",
        f"To: <{address}>",
        f"Subject: Confirm {address} as a sender on {hostname}",
        f"Date: {format_datetime(moment)}",
        f"Message-ID: <{secrets.token_hex(12)}@{hostname}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"The mail relay {hostname} was asked to let its SMTP user",
        f"    {username}",
        f"send mail as {address}. To allow it, open this link and press Confirm:",
        "",
        f"    {url}",
        "",
        f"The link works until {until}. If you did not expect this message,",
        f"ignore it: nothing will be sent as {address} through this relay.",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class Verifier:
    """What the control panel needs to verify senders: confirmation mail through the spool,
    links that point at the panel (``base_url``), and TXT lookups with ``resolver`` (a
    twisted.names resolver, e.g. delivery.router.make_resolver(dns_servers))."""

    def __init__(
        self,
        tokens: VerificationTokens,
        spool,
        resolver,
        base_url: str,
        hostname: str,
        postmaster: str,
        clock,
        link_lifetime: float = LINK_LIFETIME,
    ) -> None:
        self.tokens = tokens
        self.spool = spool
        self.resolver = resolver
        self.base_url = base_url.rstrip("/")
        self.hostname = hostname
        self.postmaster = postmaster
        self.clock = clock
        self.link_lifetime = link_lifetime

    def link(self, username: str, address: str) -> tuple[str, float]:
        expires = self.clock.seconds() + self.link_lifetime
        token = self.tokens.link_token(username, address, expires)
        return f"{self.base_url}/verify/{token}", expires

    async def send_link(self, user: SmtpUser, address: str) -> str:
        """Queue the confirmation mail to ``address``; returns its queue id. Raises
        errors.StorageError when the spool refuses it (disk full)."""
        if not is_address(address):
            raise ValueError(f"{address!r} is not an address")
        url, expires = self.link(user.username, address)
        now = self.clock.seconds()
        body = confirmation_message(
            self.hostname, self.postmaster, user.username, address, url, expires, now
        )
        envelope = Envelope(
            id="", sender="", recipients=[address], user=None, account=user.account,
            client_ip=None, helo=None, tls=False, received_at=now, priority=1,
        )  # fmt: skip
        message = self.spool.create(envelope)
        message.write(body)
        queue_id = await message.commit()
        log.info(
            "queued the confirmation of sender {address} for user {user}: {queue_id}",
            address=address, user=user.username, queue_id=queue_id,
        )  # fmt: skip
        return queue_id

    def txt_record(self, user: SmtpUser, domain: str) -> dict[str, str]:
        return {"name": domain, "type": "TXT", "value": self.tokens.txt_value(user.account, domain)}

    async def domain_published(self, user: SmtpUser, domain: str) -> bool:
        """True when ``domain`` has the TXT record; False when it has not (or does not
        exist). Raises on a DNS failure (timeout, SERVFAIL) so the caller can say so."""
        expected = self.tokens.txt_value(user.account, domain)
        return expected in await txt_records(self.resolver, domain)
