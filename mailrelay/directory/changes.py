"""Requested user settings -> SmtpUser field changes, checked the same way whether they come
from ``mailrelay-admin user add|set`` options or from the management API's JSON.

The caller then applies them with UserStore.add_user / update_user, which check the user
as a whole (scope within the account, priority range, ...).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from mailrelay.auth.ipauth import IpAuthError
from mailrelay.auth.lifecycle import parse_networks
from mailrelay.directory.filedir import DirectoryFileError, quota_action
from mailrelay.model import SmtpUser, Status
from mailrelay.scope import Scope, parse_addresses

# Each setting and the JSON types it accepts; None allowed means "the configured default".
USER_SETTINGS: dict[str, tuple[type, ...]] = {
    "account": (str,),
    "domains": (str,),
    "addresses": (str,),
    "note": (str,),
    "status": (str,),
    "rate_limit": (int, type(None)),
    "priority": (int,),
    "max_connections": (int, type(None)),
    "quota_day": (int, type(None)),  # messages per UTC day; 0: none
    "quota_month": (int, type(None)),  # messages per UTC month; 0: none
    "quota_action": (str,),  # over a quota: "refuse" (451) or "hold" (held until it resets)
    "archive": (bool,),
    "audit_bcc": (str,),
    "bounce_notify": (str,),
    "unsubscribe_footer": (bool,),
    "open_tracking": (bool,),
    "click_tracking": (bool,),
    "expires": (str, type(None)),  # a date (valid through that day, UTC) or a time; null: never
    "allow_from": (str,),  # networks, "203.0.113.0/24;2001:db8::/32"; "": anywhere
}


def _check_type(name: str, value: Any) -> None:
    types = USER_SETTINGS[name]
    # bool is an int in Python: a priority of true is still a mistake.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = {str: "text", int: "a whole number", bool: "true or false", type(None): "null"}
        expected = " or ".join(names[t] for t in types)
        raise DirectoryFileError(f"{name} must be {expected}, not {value!r}")


def parse_expiry(text: str | None) -> float | None:
    """``2027-01-31`` (the user may log in through that day, UTC), ``2027-01-31T12:00``
    (UTC unless an offset is given), or None/empty for never: the unix time it expires."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if len(text) == 10:
            day = datetime.date.fromisoformat(text)
            return datetime.datetime.combine(
                day + datetime.timedelta(days=1), datetime.time(), datetime.UTC
            ).timestamp()
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise DirectoryFileError(
            f"expires {text!r} is not a date (2027-01-31) or a time (2027-01-31T18:00Z)"
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def user_changes(settings: Mapping[str, Any], current: SmtpUser) -> dict[str, Any]:
    """The SmtpUser fields that ``settings`` (setting name -> new value, only those given)
    change. Raises DirectoryFileError or scope.ScopeError naming the bad setting."""
    unknown = sorted(set(settings) - set(USER_SETTINGS))
    if unknown:
        raise DirectoryFileError(
            f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(USER_SETTINGS)})"
        )
    for name, value in settings.items():
        _check_type(name, value)
    changes: dict[str, Any] = {}
    if "account" in settings:
        changes["account"] = settings["account"]
    if "domains" in settings or "addresses" in settings:
        changes["scope"] = Scope.parse(
            settings.get("domains", current.scope.domains_text()),
            settings.get("addresses", current.scope.addresses_text()),
        )
    if "status" in settings:
        try:
            changes["status"] = Status(settings["status"])
        except ValueError:
            raise DirectoryFileError(
                f"status {settings['status']!r} is not one of allowed, blocked, sandboxed"
            )
    plain = ("note", "priority", "rate_limit", "max_connections", "quota_day", "quota_month",
             "archive",
             "unsubscribe_footer", "open_tracking", "click_tracking")  # fmt: skip
    for name in plain:
        if name in settings:
            changes[name] = settings[name]
    if "quota_action" in settings:
        changes["quota_action"] = quota_action(settings["quota_action"])
    if "audit_bcc" in settings:
        changes["audit_bcc"] = tuple(sorted(parse_addresses(settings["audit_bcc"])))
    if "expires" in settings:
        changes["expires"] = parse_expiry(settings["expires"])
    if "allow_from" in settings:
        try:
            changes["allow_from"] = parse_networks(settings["allow_from"])
        except IpAuthError as e:
            raise DirectoryFileError(f"allow_from: {e}")
    if "bounce_notify" in settings:
        value = settings["bounce_notify"].strip()
        changes["bounce_notify"] = value.lower() if value.lower() in ("off", "sender") else value
    return changes
