"""Admins limited to one account: which account each route's object belongs to, and the
one check that refuses an account-limited admin (``mailrelay-admin admin add --account``,
``apikey add --account``) everything outside its account.

Every route of the API and of the panel declares its rule where it is added
(``Router.add(..., account=RULE)``):

- ``PUBLIC``: no login at all (the login form, the stylesheet, confirmation links, the
  OpenAPI document);
- ``SESSION``: nothing of any account (the home redirect, logging out, an empty form);
- ``LISTED``: a list the management layer filters by the caller's account
  (``Call.account``, passed to mailrelay/manage/*);
- ``RELAY_WIDE``: the relay as a whole (accounts, the global suppression list, IP
  authentication): refused to a limited admin;
- a rule made below (``user(path("username"))``, ``queued(...)``, ``every(...)``): the
  account(s) owning the object the path, the query or the body names.

``enforce`` runs before every handler. A limited admin gets **403** for a relay-wide
route (or one that declares no rule: refused rather than let through), and **404**, worded
as for an object that does not exist, for an object of another account, so a limited admin
cannot tell another account's user, message or domain from one that is not there. An
admin without an account is not checked at all.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mailrelay.directory.filedir import DEFAULT_ACCOUNT
from mailrelay.manage import dkim as manage_dkim
from mailrelay.spool.queueid import is_queue_id
from mailrelay.web.routing import Call, HttpError, Route


class Extent(enum.Enum):
    PUBLIC = "public"
    SESSION = "session"
    LISTED = "listed"
    RELAY_WIDE = "relay-wide"


PUBLIC, SESSION, LISTED, RELAY_WIDE = Extent


@dataclass(frozen=True)
class Owned:
    """The accounts the object named belongs to (none: there is no such object), and
    what anyone else is told: the words used when it does not exist."""

    accounts: frozenset[str]
    unknown: str


Verdict = Owned | Extent
Rule = Extent | Callable[[Any, Call], Awaitable[Verdict]]
Field = Callable[[Call], "str | None"]

RELAY_WIDE_REFUSAL = "account {account!r} only: this is relay-wide, for an admin of every account"
UNDECLARED = "account {account!r} only: this resource declares no account rule"


def is_public(route: Route) -> bool:
    return route.account is PUBLIC


async def enforce(services, route: Route, call: Call) -> None:
    """Let an account-limited caller through only to its own account's objects (HttpError
    403 or 404 otherwise, see above); anyone else always."""
    limit = call.account
    if limit is None or route.account in (PUBLIC, SESSION, LISTED):
        return
    if route.account is None:
        raise HttpError(403, UNDECLARED.format(account=limit))
    verdict = route.account if isinstance(route.account, Extent) else \
        await route.account(services, call)  # fmt: skip
    if verdict is RELAY_WIDE:
        raise HttpError(403, RELAY_WIDE_REFUSAL.format(account=limit))
    if isinstance(verdict, Owned) and limit not in verdict.accounts:
        raise HttpError(404, verdict.unknown)


# ---- where a rule finds the name of the object


def path(name: str) -> Field:
    return lambda call: call.params.get(name) or None


def query(name: str) -> Field:
    return lambda call: call.arg(name) or None


def body(name: str) -> Field:
    """A field of the JSON body (the API) or of the form (the panel); a body the handler
    will refuse (not JSON, not text) names nothing."""
    def get(call: Call) -> str | None:
        value = call.fields().get(name)
        return value.strip() or None if isinstance(value, str) else None

    return get


# ---- rules


def user(field: Field) -> Rule:
    """The account of the user named (a user named nowhere: nothing to check)."""
    async def rule(s, call: Call) -> Verdict:
        name = field(call)
        if name is None:
            return SESSION
        found, _ = await s.manager.get(name)
        return Owned(frozenset({found.account} if found else ()), f"unknown user {name!r}")

    return rule


def account(field: Field, default: str | None = None) -> Rule:
    """The account named (``default`` when none is)."""
    async def rule(s, call: Call) -> Verdict:
        name = field(call) or default
        if name is None:
            return SESSION
        return Owned(frozenset({name}), f"unknown account {name!r}")

    return rule


def queued(field: Field) -> Rule:
    """The account of the queued message named by its queue id."""
    async def rule(s, call: Call) -> Verdict:
        queue_id = field(call) or ""
        doc = await s.queue.show(queue_id) if is_queue_id(queue_id) else None
        return Owned(frozenset({doc["account"]} if doc and doc["account"] else ()),
                     f"no message {queue_id!r} in the queue")  # fmt: skip

    return rule


def domain(field: Field, selector: Field | None = None) -> Rule:
    """The accounts a sending domain is authorized for and those its DKIM keys sign for
    (the relay domain's keys sign for every account: no account owns them). With
    ``selector``, the account of that one key, when there is one."""
    async def rule(s, call: Call) -> Verdict:
        name = field(call) or ""
        unknown = f"unknown domain {name!r}"
        try:
            name = manage_dkim.domain_name(name)
        except manage_dkim.DkimError:
            return Owned(frozenset(), unknown)
        keys = await s.dkim.ofDomain(name)
        chosen = selector(call) if selector is not None else None
        key = next((k for k in keys if k.selector == (chosen or "").lower()), None)
        if key is not None:
            return Owned(frozenset({key.account} if key.account else ()), unknown)
        accounts = {a.name for a, _ in await s.manager.accounts() if name in a.domains}
        return Owned(frozenset(accounts | {k.account for k in keys if k.account}), unknown)

    return rule


def _number(text: str) -> int | None:
    """An object id as the handlers take it (web/ops.py), else None."""
    return int(text) if text.isdigit() and len(text) < 19 else None


def webhook(field: Field) -> Rule:
    """The account of the webhook endpoint named by its id."""
    async def rule(s, call: Call) -> Verdict:
        text = field(call) or ""
        number = _number(text)
        found = None if s.webhooks is None or number is None else \
            await s.webhooks.get(number)  # fmt: skip
        return Owned(frozenset({found.account} if found else ()),
                     f"no webhook endpoint {text}")  # fmt: skip

    return rule


def failed_event(field: Field) -> Rule:
    """A failed webhook event goes by its endpoint's account (an event whose endpoint is
    gone is no one's)."""
    async def rule(s, call: Call) -> Verdict:
        text = field(call) or ""
        number = _number(text)
        event = None if s.webhooks is None or number is None else \
            await s.webhooks.failedEvent(number)  # fmt: skip
        endpoint = None if event is None else await s.webhooks.get(event.endpoint)
        return Owned(frozenset({endpoint.account} if endpoint else ()),
                     f"no failed event {text}")  # fmt: skip

    return rule


def level(user_field: Field, account_field: Field, unnamed: Extent = RELAY_WIDE) -> Rule:
    """A suppression list or statistics: a user's, an account's (both must be the
    caller's when both are named), or, when neither is named, ``unnamed``: the global list
    (RELAY_WIDE) or every account's (LISTED: filtered)."""
    named = every(user(user_field), account(account_field))

    async def rule(s, call: Call) -> Verdict:
        if user_field(call) or account_field(call):
            return await named(s, call)
        return unnamed

    return rule


def relay_wide_if(field: Field) -> Rule:
    """Relay-wide when ``field`` is given (``?global=1``: the global suppression list)."""
    async def rule(s, call: Call) -> Verdict:
        return RELAY_WIDE if field(call) else SESSION

    return rule


def every(*rules: Rule) -> Rule:
    """Allowed only where each of ``rules`` allows (e.g. the user changed and the account
    it is moved to)."""
    async def rule(s, call: Call) -> Verdict:
        limit = call.account
        for each in rules:
            verdict = each if isinstance(each, Extent) else await each(s, call)
            if verdict is RELAY_WIDE or (isinstance(verdict, Owned)
                                         and limit not in verdict.accounts):
                return verdict
        return SESSION

    return rule


DKIM_KEY = domain(path("domain"), path("selector"))  # /dkim/{domain}/{selector}/...
NEW_USER = account(body("account"), DEFAULT_ACCOUNT)  # a new user's account: given or default
CHANGED_USER = every(user(path("username")), account(body("account")))
