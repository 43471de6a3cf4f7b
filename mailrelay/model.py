"""The identity model: accounts, SMTP users and the envelope of a spooled message.

Plain frozen dataclasses, shared by every layer; no I/O here.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import lru_cache

from mailrelay.scope import Scope

QUOTA_ACTIONS = ("refuse", "hold")  # SmtpUser.quota_action


def utc_text(t: float) -> str:
    """``2026-12-07 00:00 UTC``: when a quota resets, as the relay says it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


class Status(enum.StrEnum):
    ALLOWED = "allowed"
    BLOCKED = "blocked"  # the login's mail is refused
    SANDBOXED = "sandboxed"  # accepted and recorded, never delivered


class Kind(enum.StrEnum):
    DOMAIN = "domain"  # username is a domain: may send from any address at it
    ADDRESS = "address"  # username is an address: may send only from it
    NAMED = "named"  # any other username: an explicit list of domains and addresses


@dataclass(frozen=True)
class Account:
    """Groups SMTP users; owns authorized domains, notification address, suppressions, stats."""

    name: str
    domains: frozenset[str] = frozenset()
    notify: str | None = None  # where domain sender notifications go
    note: str = ""
    # The return-path domain (bounces.example.com): delivered mail carries a VERP envelope
    # sender there, so that later bounces come back to the relay (mailrelay/bounces/).
    bounce_domain: str | None = None
    # Messages the account's users may send together per UTC day and month (None: no
    # quota); mailrelay/policy/quota.py.
    quota_day: int | None = None
    quota_month: int | None = None


@dataclass(frozen=True)
class SmtpUser:
    """An SMTP user as the directory knows it; the password hash never leaves the directory."""

    username: str
    account: str = "default"
    # For NAMED users the explicit scope; for DOMAIN/ADDRESS users it is derived from the
    # username (see effective_scope) and this field is ignored.
    scope: Scope = field(default_factory=Scope)
    status: Status = Status.ALLOWED
    note: str = ""
    rate_limit: int | None = None  # messages per hour; None: the configured default
    priority: int = 3  # 1 (highest) .. 5
    max_connections: int | None = None  # None: the configured default
    # Messages per UTC day and month (policy/quota.py); None: [limits] quota_per_day /
    # quota_per_month; 0: no quota.
    quota_day: int | None = None
    quota_month: int | None = None
    # What a message over a quota gets: "refuse" (451 4.7.1 at MAIL) or "hold" (accepted
    # into the spool's hold/, released when the quota resets: policy/quotahold.py).
    quota_action: str = "refuse"
    archive: bool = False
    audit_bcc: tuple[str, ...] = ()
    bounce_notify: str = "sender"  # "off", "sender", or an address
    unsubscribe_footer: bool = False
    open_tracking: bool = False
    click_tracking: bool = False
    updated: float = 0.0  # unix time of the last change
    # Sender scope entries (domains, addresses) added through the control panel and not yet
    # confirmed (mailrelay/verification.py); every other entry counts as verified.
    unverified: frozenset[str] = frozenset()
    # Credential lifecycle (auth/lifecycle.py): after ``expires`` (unix time) and from
    # outside ``allow_from`` (networks, normal form; empty: anywhere) logins are refused.
    expires: float | None = None
    allow_from: tuple[str, ...] = ()

    @property
    def kind(self) -> Kind:
        return kind_of(self.username)

    def effective_scope(self, account: Account | None = None) -> Scope:
        """The senders this login may use, limited to its account's domains when given."""
        if self.kind is Kind.DOMAIN:
            scope = Scope(domains=frozenset({self.username.lower()}))
        elif self.kind is Kind.ADDRESS:
            scope = Scope(addresses=frozenset({self.username.lower()}))
        else:
            scope = self.scope
        if account is not None:
            scope = scope.within(account.domains)
        return scope


@lru_cache(maxsize=4096)  # every login and every look-up asks, mostly about the same few
def kind_of(username: str) -> Kind:
    from mailrelay.scope import is_address, is_domain

    if is_address(username):
        return Kind.ADDRESS
    if is_domain(username):
        return Kind.DOMAIN
    return Kind.NAMED


@lru_cache(maxsize=4096)
def canonical_username(username: str) -> str:
    """The form a directory stores and looks up: domain and address usernames are matched
    case-insensitively (and IDNA names in A-label form); named usernames are kept as given."""
    from mailrelay.scope import ScopeError, is_address, is_domain, to_ascii_address, to_ascii_domain

    if "@" in username:
        candidate = to_ascii_address(username)
        return candidate if candidate is not None and is_address(candidate) else username
    try:
        candidate = to_ascii_domain(username)
    except ScopeError:
        return username
    return candidate if is_domain(candidate) else username


@dataclass
class Envelope:
    """What the spool keeps beside a message body: line 1 of the queue file, as JSON."""

    id: str
    sender: str  # "" for the null sender
    recipients: list[str]
    user: str | None  # the authenticated SMTP user (None for a bounce made by the relay)
    account: str | None
    client_ip: str | None
    helo: str | None
    tls: bool
    received_at: float  # unix time
    priority: int = 3
    sandboxed: bool = False
    bounce_to: str | None = None  # where a DSN goes instead of the sender, if set
    # The user's per-recipient features when the message was accepted ("footer", "opens",
    # "clicks"; features/envelope.py), and which recipients are audit BCC copies.
    personalize: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)
    # DSN requests (RFC 3461; dsnparams.py): RET, ENVID (decoded), and per recipient the
    # NOTIFY and ORCPT it gave; None and absent recipients: nothing asked.
    ret: str | None = None
    envid: str | None = None
    dsn: dict[str, dict[str, str]] = field(default_factory=dict)
    smtputf8: bool = False  # the client's MAIL had SMTPUTF8 (RFC 6531); delivery passes it on
    # The account's bounce domain when the message was accepted: delivery sends it with a
    # VERP envelope sender there (bounces/verp.py); ``sender`` stays the client's.
    return_path: str | None = None
    requiretls: bool = False  # the client's MAIL had REQUIRETLS (RFC 8689; requiretls.py)
    auth_method: str | None = None  # how ``user`` logged in: "password", "ip" or "address"
    # Over a quota of a user whose quota_action is "hold": kept in hold/ until ``held_until``
    # (unix time, the quota's reset), then released (policy/quotahold.py); ``held_quota``
    # names the quota (``daily quota of 500 messages of user app``).
    held_until: float | None = None
    held_quota: str = ""

    @property
    def quota_held(self) -> bool:
        """Held over a quota, to be released (a sandboxed user's mail never is)."""
        return self.held_until is not None and not self.sandboxed

    def held_text(self) -> str:
        """``held: daily quota of 5 messages of user app reached, released at ...``."""
        return f"held: {self.held_quota} reached, released at {utc_text(self.held_until or 0)}"

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict) -> Envelope:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
