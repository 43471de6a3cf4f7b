"""LDAP entries -> SmtpUser and Account, with configurable attribute names.

A value that does not make sense is logged (with the entry's DN) and replaced by the safe
choice: an unknown status blocks the user, a bad domain or address is left out of the
scope, a bad number falls back to the configured default.
"""

from __future__ import annotations

import calendar
import re
import time

from twisted.logger import Logger

from mailrelay.auth.ipauth import IpAuthError
from mailrelay.auth.lifecycle import NOWHERE, parse_networks
from mailrelay.directory.ldap_client import Entry
from mailrelay.model import QUOTA_ACTIONS, Account, SmtpUser, Status, canonical_username
from mailrelay.scope import Scope, ScopeError, is_address, parse_addresses, parse_domains

log = Logger()

# Keys are what mailrelay means, values the LDAP attribute holding it (see etc/ldap/).
DEFAULT_ATTRIBUTES: dict[str, str] = {
    "username": "uid",  # the SmtpUser's username: a domain, an address or a name
    "password": "userPassword",  # read only in password_mode = compare
    "senderDomains": "mailrelaySenderDomain",
    "senderAddresses": "mailrelaySenderAddress",
    "status": "mailrelayStatus",
    "rateLimit": "mailrelayRateLimit",
    "priority": "mailrelayPriority",
    "maxConnections": "mailrelayMaxConnections",
    "note": "description",
    "account": "mailrelayAccount",
    "archive": "mailrelayArchive",
    "auditBcc": "mailrelayAuditBcc",
    "bounceNotify": "mailrelayBounceNotify",
    "unsubscribeFooter": "mailrelayUnsubscribeFooter",
    "openTracking": "mailrelayOpenTracking",
    "clickTracking": "mailrelayClickTracking",
    "updated": "modifyTimestamp",
    "expires": "mailrelayExpires",
    "allowFrom": "mailrelayAllowFrom",
    "quotaDay": "mailrelayQuotaDay",
    "quotaMonth": "mailrelayQuotaMonth",
    "quotaAction": "mailrelayQuotaAction",
    "accountName": "cn",
    "accountDomains": "mailrelayAccountDomain",
    "accountNotify": "mailrelayNotifyAddress",
    "accountNote": "description",
    "accountBounceDomain": "mailrelayBounceDomain",
    "accountQuotaDay": "mailrelayQuotaDay",
    "accountQuotaMonth": "mailrelayQuotaMonth",
}
_USER_KEYS = [k for k in DEFAULT_ATTRIBUTES if not k.startswith("account") or k == "account"]
_ACCOUNT_KEYS = ["accountName", "accountDomains", "accountNotify", "accountNote",
                 "accountBounceDomain", "accountQuotaDay", "accountQuotaMonth", "updated"]
# An attribute description: a name (with options) or a numeric OID.
_ATTRIBUTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)(?:;[A-Za-z0-9-]+)*$")
_TIMESTAMP_RE = re.compile(r"^(\d{14})(?:[.,]\d+)?Z$")


def attribute_names(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """DEFAULT_ATTRIBUTES with ``overrides`` applied; ValueError names a bad key or value.

    Keys match without regard to case or underscores (``senderDomains``, ``sender_domains``),
    so they survive configparser's lower-casing.
    """
    names = dict(DEFAULT_ATTRIBUTES)
    keys = {_key(k): k for k in names}
    for key, value in (overrides or {}).items():
        if _key(key) not in keys:
            raise ValueError(f"unknown LDAP attribute key {key!r} (known: {', '.join(names)})")
        if not _ATTRIBUTE_RE.match(value):
            raise ValueError(f"{value!r} is not an LDAP attribute name (for {key})")
        names[keys[_key(key)]] = value
    return names


def _key(key: str) -> str:
    return key.replace("_", "").lower()


def user_attributes(names: dict[str, str], *, with_password: bool = False) -> list[str]:
    """The attributes to request for a user entry."""
    wanted = [names[k] for k in _USER_KEYS if k != "password" or with_password]
    return list(dict.fromkeys(wanted))


def account_attributes(names: dict[str, str]) -> list[str]:
    return list(dict.fromkeys(names[k] for k in _ACCOUNT_KEYS))


def user_from_entry(
    entry: Entry, names: dict[str, str], login: str | None = None
) -> SmtpUser | None:
    """The SmtpUser for ``entry``; None (logged) when it has no username attribute.

    The username is the entry's ``username`` attribute (uid), whatever name the client
    logged in with (uid or mail): one entry is one SMTP user, with one rate limit and one
    set of statistics. Of several values, the one the client typed wins.
    """
    usernames = entry.values(names["username"])
    if not usernames:
        log.warn(
            "LDAP entry {dn} matched but has no {attribute}: it cannot log in",
            dn=entry.dn,
            attribute=names["username"],
        )
        return None
    username = usernames[0]
    if login is not None:
        wanted = canonical_username(login).lower()
        username = next((u for u in usernames if canonical_username(u).lower() == wanted), username)
    fields = _Fields(entry, names)
    return SmtpUser(
        username=canonical_username(username),
        account=(entry.first(names["account"]) or "default").strip() or "default",
        scope=Scope(
            fields.domains(names["senderDomains"]), fields.addresses(names["senderAddresses"])
        ),
        status=fields.status(),
        note=entry.first(names["note"]) or "",
        rate_limit=fields.integer(names["rateLimit"], 0),
        priority=fields.integer(names["priority"], 1, 5) or 3,
        max_connections=fields.integer(names["maxConnections"], 1),
        quota_day=fields.integer(names["quotaDay"], 0),
        quota_month=fields.integer(names["quotaMonth"], 0),
        quota_action=fields.quota_action(),
        archive=fields.boolean(names["archive"]),
        audit_bcc=tuple(sorted(fields.addresses(names["auditBcc"]))),
        bounce_notify=fields.bounce_notify(),
        unsubscribe_footer=fields.boolean(names["unsubscribeFooter"]),
        open_tracking=fields.boolean(names["openTracking"]),
        click_tracking=fields.boolean(names["clickTracking"]),
        updated=fields.timestamp(names["updated"]),
        expires=fields.expiry(names["expires"]),
        allow_from=fields.networks(names["allowFrom"]),
    )


def account_from_entry(entry: Entry, names: dict[str, str]) -> Account | None:
    name = entry.first(names["accountName"])
    if not name:
        log.warn(
            "LDAP account entry {dn} has no {attribute}",
            dn=entry.dn,
            attribute=names["accountName"],
        )
        return None
    fields = _Fields(entry, names)
    notify = fields.addresses(names["accountNotify"])
    domains = fields.domains(names["accountDomains"])
    bounce = fields.domains(names["accountBounceDomain"])
    bounce_domain = min(bounce) if bounce else None
    if bounce_domain is not None and not any(bounce_domain.endswith("." + d) for d in domains):
        fields._bad(names["accountBounceDomain"], bounce_domain,
                    "not a subdomain of the account's domains")
        bounce_domain = None
    return Account(
        name=name,
        domains=domains,
        notify=min(notify) if notify else None,
        note=entry.first(names["accountNote"]) or "",
        bounce_domain=bounce_domain,
        quota_day=fields.integer(names["accountQuotaDay"], 0),
        quota_month=fields.integer(names["accountQuotaMonth"], 0),
    )


class _Fields:
    """Typed reads of one entry's values, logging what had to be left out."""

    def __init__(self, entry: Entry, names: dict[str, str]) -> None:
        self.entry = entry
        self.names = names

    def _bad(self, attribute: str, value: str, why: str) -> None:
        log.warn(
            "LDAP entry {dn}: {attribute} {value!r} ignored: {why}",
            dn=self.entry.dn,
            attribute=attribute,
            value=value,
            why=why,
        )

    def domains(self, attribute: str) -> frozenset[str]:
        out: set[str] = set()
        for value in self.entry.values(attribute):
            try:
                out |= parse_domains(value)
            except ScopeError as e:
                self._bad(attribute, value, str(e))
        return frozenset(out)

    def addresses(self, attribute: str) -> frozenset[str]:
        out: set[str] = set()
        for value in self.entry.values(attribute):
            try:
                out |= parse_addresses(value)
            except ScopeError as e:
                self._bad(attribute, value, str(e))
        return frozenset(out)

    def status(self) -> Status:
        attribute = self.names["status"]
        value = self.entry.first(attribute)
        if value is None:
            return Status.ALLOWED
        try:
            return Status(value.strip().lower())
        except ValueError:
            self._bad(attribute, value, "not allowed, blocked or sandboxed; the user is blocked")
            return Status.BLOCKED

    def integer(self, attribute: str, low: int, high: int | None = None) -> int | None:
        value = self.entry.first(attribute)
        if value is None:
            return None
        try:
            number = int(value.strip())
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            limits = f"{low}..{high}" if high is not None else f">= {low}"
            self._bad(attribute, value, f"not a whole number {limits}; the default applies")
            return None
        return number

    def quota_action(self) -> str:
        attribute = self.names["quotaAction"]
        value = self.entry.first(attribute)
        if value is None:
            return "refuse"
        if value.strip().lower() in QUOTA_ACTIONS:
            return value.strip().lower()
        self._bad(attribute, value, "not refuse or hold; refuse applies")
        return "refuse"

    def boolean(self, attribute: str) -> bool:
        value = self.entry.first(attribute)
        if value is None:
            return False
        if value.strip().upper() in ("TRUE", "FALSE"):
            return value.strip().upper() == "TRUE"
        self._bad(attribute, value, "not TRUE or FALSE; FALSE applies")
        return False

    def bounce_notify(self) -> str:
        attribute = self.names["bounceNotify"]
        value = self.entry.first(attribute)
        if value is None:
            return "sender"
        text = value.strip().lower()
        if text in ("off", "sender") or is_address(text):
            return text
        self._bad(attribute, value, "not off, sender or an address; sender applies")
        return "sender"

    def networks(self, attribute: str) -> tuple[str, ...]:
        """The user's allowed networks. A bad value is left out, but a list left empty so
        would let the user in from anywhere: then it may log in from nowhere."""
        out: set[str] = set()
        values = self.entry.values(attribute)
        for value in values:
            try:
                out |= set(parse_networks(value))
            except IpAuthError as e:
                self._bad(attribute, value, str(e))
        if values and not out:
            self._bad(attribute, ";".join(values), "no valid network; the user cannot log in")
            return (NOWHERE,)
        return tuple(sorted(out))

    def expiry(self, attribute: str) -> float | None:
        value = self.entry.first(attribute)
        if value is None:
            return None
        when = self.timestamp(attribute)
        if not when:
            self._bad(attribute, value, "not a GeneralizedTime (20270201000000Z); the user "
                      "counts as expired")
            return 0.0
        return when

    def timestamp(self, attribute: str) -> float:
        """Unix time of a GeneralizedTime in UTC (modifyTimestamp); 0.0 when absent."""
        value = self.entry.first(attribute)
        match = _TIMESTAMP_RE.match(value or "")
        if match is None:
            return 0.0
        return float(calendar.timegm(time.strptime(match.group(1), "%Y%m%d%H%M%S")))
