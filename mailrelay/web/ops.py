"""The control panel's operations, shared by the JSON API and the web page.

Each takes the Services and plain values, checks them, acts through the management layer
(mailrelay.manage, as mailrelay-admin does) and returns plain data (the same JSON
documents ``mailrelay-admin ... --json`` prints, where there is one). A refusal is an
HttpError with the status that fits: 400 bad input, 404 unknown, 405 read-only (LDAP),
409 conflict, 503 when the directory or the spool cannot answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailrelay.auth.passwords import generate_password
from mailrelay.control import DeliveryNotRunning, DeliveryOff, NotQuotaHeld
from mailrelay.directory.changes import user_changes
from mailrelay.directory.filedir import (
    DirectoryFileError,
    EntryConflict,
    UnknownEntry,
    check_account,
)
from mailrelay.errors import StorageError
from mailrelay.features.stats import Event
from mailrelay.features.suppressions import Reason
from mailrelay.interfaces import ReadOnly
from mailrelay.manage import dkim as manage_dkim
from mailrelay.manage import explain as manage_explain
from mailrelay.manage import stats as manage_stats
from mailrelay.manage.queue import QueueReader
from mailrelay.manage.stores import LDAP_MANAGED, threaded
from mailrelay.manage.suppressions import suppression_json
from mailrelay.manage.users import Forgotten, UserManager, account_json, user_json
from mailrelay.manage.webhooks import endpoint_json, failed_json
from mailrelay.model import Account, SmtpUser
from mailrelay.scope import ScopeError, is_address, parse_domains
from mailrelay.spool.queueid import is_queue_id
from mailrelay.web.routing import HttpError

log = Logger()


@dataclass
class Services:
    """Everything the panel works with; built by site.make_admin_site."""

    directory: Any  # IDirectory
    manager: UserManager  # users and accounts, over the IUserStore
    queue: QueueReader
    control: Any  # IQueueControl: the relay's retry, flush and delete
    suppressions: Any  # ISuppressionLists (manage.suppressions)
    stats: Any  # features.stats.StatsStore
    access: Any  # manage.access.AccessFile
    verifier: Any  # verification.Verifier, or None when verification is off
    ip_auth: Any  # auth.ipauth.IpAuthTable
    address_auth: Any  # auth.ipauth.AddressAuth
    reactor: Any
    dkim: Any = None  # IDkimKeys (manage.dkim.DkimKeys, key generation in a thread)
    resolver: Any = None  # where DKIM records are looked up (None: they are not)
    config: Any = None  # the relay's Config: [dkim] relay_domain, what domain check reads
    last_logins: Any = None  # auth.lifecycle.LoginStore, or None: no login recorded here
    webhooks: Any = None  # IWebhooks (manage.webhooks), or None: webhooks are off

    @property
    def users(self) -> UserManager | None:
        """None when users and accounts cannot be changed here (LDAP)."""
        return self.manager if self.manager.writable else None


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """The directory's refusals as HTTP errors."""
    try:
        yield
    except ReadOnly as e:
        raise HttpError(405, str(e), allow=["GET"])
    except UnknownEntry as e:
        raise HttpError(404, str(e))
    except EntryConflict as e:
        raise HttpError(409, str(e))
    except (DirectoryFileError, ScopeError) as e:
        raise HttpError(400, str(e))
    except OSError as e:
        raise HttpError(503, f"the user file cannot be changed now: {e.strerror}")


def writer(s: Services) -> UserManager:
    """The manager, or 405 when users and accounts are read-only here (LDAP)."""
    if s.users is None:
        raise HttpError(405, LDAP_MANAGED, allow=["GET"])
    return s.users


# ---- users ----


def user_doc(user: SmtpUser, account: Account | None,
             last_login: tuple[float, str] | None = None) -> dict[str, Any]:
    return user_json(user, account, last_login) | {"unverified": sorted(user.unverified)}


async def last_logins(s: Services) -> dict[str, tuple[float, str]]:
    """Every user's last login, read in a thread (the relay writes them in batches)."""
    if s.last_logins is None:
        return {}
    return await threaded(s.reactor)(s.last_logins.all)


async def list_users(s: Services, account: str | None = None, within: str | None = None
                     ) -> list[dict[str, Any]]:  # fmt: skip
    """``within``: the one account the caller may see (tenancy.py), None: all."""
    account = account or within
    users, accounts = await s.manager.users(account)
    if account is not None and account not in accounts:
        raise HttpError(404, f"unknown account {account!r}")
    logins = await last_logins(s)
    return [user_doc(u, accounts.get(u.account), logins.get(u.username)) for u in users]


async def user_with_login(s: Services, user: SmtpUser, account: Account | None
                          ) -> dict[str, Any]:  # fmt: skip
    if s.last_logins is None:
        return user_doc(user, account)
    last = await threaded(s.reactor)(s.last_logins.get, user.username)
    return user_doc(user, account, last)


async def find_user(s: Services, username: str) -> tuple[SmtpUser, Account | None]:
    user, account = await s.manager.get(username)
    if user is None:
        raise HttpError(404, f"unknown user {username!r}")
    return user, account


async def get_user(s: Services, username: str) -> dict[str, Any]:
    return await user_with_login(s, *await find_user(s, username))


async def add_user(s: Services, doc: dict[str, Any]) -> dict[str, Any]:
    """Fires with {"user", "password", "verification"}; the password only here."""
    username = doc.get("username")
    if not isinstance(username, str) or not username.strip():
        raise HttpError(400, "username is required (a domain, an address or a name)")
    username = username.strip()
    password = generate_password()
    with refusals():
        s.manager.check_writable()
        settings = {k: v for k, v in doc.items() if k != "username"}
        new = SmtpUser(username, **user_changes(settings, SmtpUser(username)))
        user = await s.manager.add(new, password)
    log.info("control panel: added user {user}", user=user.username)
    left = await s.manager.forget(user.username)
    if left.suppressions or left.stats:
        log.info("control panel: left by an earlier user {user}: {what}", user=user.username,
                 what=left.said())  # fmt: skip
    account = await s.manager.store.getAccount(user.account)
    return {
        "user": user_doc(user, account),
        "password": password,
        "verification": await start_verification(s, user, user.unverified),
    }


async def edit_user(s: Services, username: str, doc: dict[str, Any]) -> dict[str, Any]:
    if not doc:
        raise HttpError(400, "nothing to change")
    found, _ = await find_user(s, username)
    with refusals():
        before, user = await s.manager.update(found.username,
                                              lambda current: user_changes(doc, current))
    log.info("control panel: changed user {user}", user=user.username)
    account = await s.manager.store.getAccount(user.account)
    return {
        "user": await user_with_login(s, user, account),
        "verification": await start_verification(s, user, user.unverified - before.unverified),
    }


async def delete_user(s: Services, username: str) -> Forgotten:
    """Its suppressions go, its statistics stay under another name (admin.user)."""
    with refusals():
        user = await s.manager.delete(username)
    forgotten = await s.manager.forget(user.username)
    log.info("control panel: deleted user {user}; its suppressions and statistics: {what}",
             user=user.username, what=forgotten.said())  # fmt: skip
    return forgotten


async def reset_password(s: Services, username: str) -> dict[str, str]:
    password = generate_password()
    with refusals():
        user = await s.manager.set_password(username, password)
    log.info("control panel: new password for user {user}", user=user.username)
    return {"username": user.username, "password": password}


# ---- sender verification ----


def sender_docs(s: Services, user: SmtpUser) -> list[dict[str, Any]]:
    scope = user.effective_scope()
    out = []
    for entry in sorted(scope.domains) + sorted(scope.addresses):
        kind = "address" if "@" in entry else "domain"
        doc: dict[str, Any] = {"sender": entry, "kind": kind,
                               "verified": entry not in user.unverified}  # fmt: skip
        if not doc["verified"] and s.verifier is not None:
            doc["method"] = "link" if kind == "address" else "dns"
            if kind == "domain":
                doc["record"] = s.verifier.txt_record(user, entry)
        out.append(doc)
    return out


async def start_verification(s: Services, user: SmtpUser, entries) -> list[dict[str, Any]]:
    """Send a link to each new waiting address; say which TXT record each domain needs."""
    out = []
    if s.verifier is None:
        return out
    for entry in sorted(entries):
        if "@" in entry:
            out.append(await _send_link(s, user, entry))
        else:
            out.append({"sender": entry, "method": "dns",
                        "record": s.verifier.txt_record(user, entry)})  # fmt: skip
    return out


async def _send_link(s: Services, user: SmtpUser, address: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"sender": address, "method": "link"}
    try:
        doc["queue_id"] = await s.verifier.send_link(user, address)
    except StorageError as e:  # the spool refused it (disk full): the admin can resend later
        log.warn("confirmation to {address} not queued: {reply}", address=address, reply=e)
        doc["error"] = f"the confirmation could not be queued: {e}"
    return doc


async def verify_sender(s: Services, username: str, sender: str) -> dict[str, Any]:
    """An address: mail its link again. A domain: look its TXT record up now and mark it
    verified when it is there."""
    user, _ = await find_user(s, username)
    sender = sender.strip().lower()
    scope = user.effective_scope()
    if sender not in scope.domains | scope.addresses:
        raise HttpError(404, f"{sender} is not a sender of user {user.username}")
    if sender not in user.unverified:
        return {"sender": sender, "verified": True}
    if s.verifier is None:
        raise HttpError(409, "sender verification is switched off in this relay")
    if "@" in sender:
        return await _send_link(s, user, sender) | {"verified": False}
    try:
        published = await s.verifier.domain_published(user, sender)
    except Exception as e:
        raise HttpError(503, f"DNS cannot answer for {sender} now: {e.__class__.__name__}")
    if published:
        await confirm(s, user.username, sender)
    return {"sender": sender, "verified": published, "method": "dns",
            "record": s.verifier.txt_record(user, sender)}  # fmt: skip


async def confirm(s: Services, username: str, sender: str) -> bool:
    with refusals():
        user = await s.manager.confirm(username, sender)
    if user is not None:
        log.info("sender {sender} of user {user} verified", sender=sender, user=username)
    return user is not None


# ---- accounts ----


async def list_accounts(s: Services, within: str | None = None) -> list[dict[str, Any]]:
    return [account_json(a, users) for a, users in await s.manager.accounts(within)]


async def get_account(s: Services, name: str) -> dict[str, Any]:
    found = await s.manager.account(name)
    if found is None:
        raise HttpError(404, f"unknown account {name!r}")
    return account_json(*found)


_ACCOUNT_FIELDS = {"domains": str, "notify": (str, type(None)), "note": str,
                   "bounce_domain": (str, type(None)), "quota_day": (int, type(None)),
                   "quota_month": (int, type(None))}


def _account_changes(doc: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(doc) - set(_ACCOUNT_FIELDS))
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(unknown)} (known: "
                        f"{', '.join(_ACCOUNT_FIELDS)})")  # fmt: skip
    changes: dict[str, Any] = {}
    for key, value in doc.items():
        if not isinstance(value, _ACCOUNT_FIELDS[key]) or isinstance(value, bool):
            kind = "a whole number or null" if key.startswith("quota") else "text"
            raise HttpError(400, f"{key} must be {kind}, not {value!r}")
    with refusals():
        if "domains" in doc:
            changes["domains"] = parse_domains(doc["domains"])
    if "notify" in doc:
        changes["notify"] = (doc["notify"] or "").strip() or None
    if "note" in doc:
        changes["note"] = doc["note"]
    if "bounce_domain" in doc:
        changes["bounce_domain"] = (doc["bounce_domain"] or "").strip().lower() or None
    for key in ("quota_day", "quota_month"):
        if key in doc:
            changes[key] = doc[key] or None  # 0: no quota, as null
    return changes


async def add_account(s: Services, doc: dict[str, Any]) -> dict[str, Any]:
    name = doc.get("name")
    if not isinstance(name, str):
        raise HttpError(400, "name is required")
    account = Account(name, **_account_changes({k: v for k, v in doc.items() if k != "name"}))
    with refusals():
        check_account(account)
        await s.manager.add_account(account)
    return account_json(account, [])


async def edit_account(s: Services, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    changes = _account_changes(doc)
    if not changes:
        raise HttpError(400, "nothing to change")
    with refusals():
        await s.manager.update_account(name, lambda current: changes)
    return await get_account(s, name)


async def delete_account(s: Services, name: str) -> None:
    with refusals():
        await s.manager.delete_account(name)
    forgotten = await s.manager.forget_account(name)
    if forgotten is not None:
        log.info("control panel: deleted account {account}; its suppressions and "
                 "statistics: {said}", account=name, said=forgotten.said())


# ---- IP authentication (from the configuration: read-only) ----


def ip_auth(s: Services) -> dict[str, Any]:
    return {
        "networks": [{"network": str(n), "username": u} for n, u in s.ip_auth.networks],
        "addresses": sorted(s.address_auth.addresses),
        "read_only": True,
        "configured_in": "[policy] ip_auth and address_auth of the configuration file",
    }


# ---- suppressions ----


suppression_doc = suppression_json


async def suppression_level(
    s: Services, user: str | None, account: str | None
) -> tuple[str | None, str | None]:
    """(account, user) for the store; (None, None) is the global list."""
    if user and account:
        raise HttpError(400, "give user or account, not both")
    if user:
        found, _ = await find_user(s, user)
        return found.account, found.username
    if account:
        if await s.manager.store.getAccount(account) is None:
            raise HttpError(404, f"unknown account {account!r}")
        return account, None
    return None, None


async def list_suppressions(s: Services, user=None, account=None, everything=True,
                            within: str | None = None):  # fmt: skip
    if everything and not user and not account:
        entries = await s.suppressions.all(within)
    else:
        level = await suppression_level(s, user, account)
        entries = await s.suppressions.list(*level)
    return [suppression_doc(e) for e in entries]


async def add_suppression(s: Services, doc: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(doc) - {"address", "user", "account", "reason"})
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(unknown)}")
    address = doc.get("address")
    if not isinstance(address, str) or not is_address(address.strip()):
        raise HttpError(400, f"address {address!r} is not an email address")
    for key in ("user", "account", "reason"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise HttpError(400, f"{key} must be text")
    try:
        reason = Reason(doc.get("reason") or Reason.MANUAL.value)
    except ValueError:
        raise HttpError(400, f"reason must be one of {', '.join(r.value for r in Reason)}")
    account, user = await suppression_level(s, doc.get("user"), doc.get("account"))
    added = await s.suppressions.add(address.strip(), account, user, reason)
    if not added:
        raise HttpError(409, f"{address.strip().lower()} is already on that list")
    entries = await s.suppressions.list(account, user)
    return next(suppression_doc(e) for e in entries if e.address == address.strip().lower()
                and e.user == user)  # fmt: skip


async def delete_suppression(s: Services, address: str, user=None, account=None) -> None:
    level = await suppression_level(s, user, account)
    removed = await s.suppressions.remove(address, *level)
    if not removed:
        raise HttpError(404, f"{address} is not on that list")


# ---- webhooks ----


def _webhooks(s: Services):
    if s.webhooks is None:
        raise HttpError(503, "webhooks are off in this relay ([webhooks] enabled = no)")
    return s.webhooks


def _number(text: str | int, what: str) -> int:
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit() and len(text) < 19):
        return int(text)
    raise HttpError(404, f"no {what} {text!r}")


async def _known_account(s: Services, account: str | None) -> str | None:
    if account and await s.manager.store.getAccount(account) is None:
        raise HttpError(404, f"unknown account {account!r}")
    return account or None


async def list_webhooks(s: Services, account: str | None = None, within: str | None = None
                        ) -> list[dict[str, Any]]:  # fmt: skip
    """``within``: the one account the caller may see (tenancy.py), None: all; so for the
    other calls below, which then find only that account's objects."""
    hooks = _webhooks(s)
    return [endpoint_json(e) for e in await hooks.list(await _known_account(s, account or
                                                                            within))]


async def get_webhook(s: Services, endpoint_id: str, within: str | None = None
                      ) -> dict[str, Any]:  # fmt: skip
    found = await _webhooks(s).get(_number(endpoint_id, "webhook endpoint"), within)
    if found is None:
        raise HttpError(404, f"no webhook endpoint {endpoint_id}")
    return endpoint_json(found)


def _texts(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise HttpError(400, f"{key} must be a list of names")
    return value


async def add_webhook(s: Services, doc: dict[str, Any], within: str | None = None
                      ) -> dict[str, Any]:  # fmt: skip
    """The new endpoint with its secret (shown here and by rotate-secret only); of the
    caller's account when it is limited to one and names none."""
    hooks = _webhooks(s)
    unknown = sorted(set(doc) - {"account", "url", "users", "events"})
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(unknown)}")
    account, url = doc.get("account") or within, doc.get("url")
    if within is not None and account != within:
        raise HttpError(404, f"unknown account {account!r}")
    if not isinstance(account, str) or not account or not isinstance(url, str):
        raise HttpError(400, "account and url are required")
    await _known_account(s, account)
    try:
        endpoint = await hooks.add(account, url, _texts(doc, "users"), _texts(doc, "events"))
    except ValueError as e:
        raise HttpError(400, str(e))
    log.info("control panel: webhook endpoint {id} for {account}: {url}", id=endpoint.id,
             account=account, url=endpoint.url)
    return endpoint_json(endpoint, secrets=True)


async def delete_webhook(s: Services, endpoint_id: str, within: str | None = None) -> None:
    if not await _webhooks(s).remove(_number(endpoint_id, "webhook endpoint"), within):
        raise HttpError(404, f"no webhook endpoint {endpoint_id}")
    log.info("control panel: deleted webhook endpoint {id}", id=endpoint_id)


async def rotate_webhook_secret(s: Services, endpoint_id: str, within: str | None = None
                                ) -> dict[str, Any]:  # fmt: skip
    found = await _webhooks(s).rotateSecret(_number(endpoint_id, "webhook endpoint"), within)
    if found is None:
        raise HttpError(404, f"no webhook endpoint {endpoint_id}")
    return endpoint_json(found, secrets=True)


async def enable_webhook(s: Services, endpoint_id: str, within: str | None = None
                         ) -> dict[str, Any]:  # fmt: skip
    number = _number(endpoint_id, "webhook endpoint")
    if not await _webhooks(s).enable(number, within):
        raise HttpError(404, f"no webhook endpoint {endpoint_id}")
    return await get_webhook(s, endpoint_id, within)


async def failed_webhooks(s: Services, account: str | None = None, within: str | None = None
                          ) -> list[dict[str, Any]]:  # fmt: skip
    hooks = _webhooks(s)
    return [failed_json(d) for d in await hooks.failed(await _known_account(s, account or
                                                                            within))]


async def retry_webhook(s: Services, event: str, within: str | None = None) -> dict[str, Any]:
    outcome = await _webhooks(s).retry(_number(event, "failed event"), within)
    if outcome == "unknown":
        raise HttpError(404, f"no failed event {event}")
    if outcome == "disabled":
        raise HttpError(409, f"the endpoint of event {event} is disabled: enable it first")
    log.info("control panel: webhook event {id} to send again", id=event)
    return {"id": int(event), "retry": "scheduled now"}


# ---- queue ----


def _queue_id(queue_id: str) -> str:
    if not is_queue_id(queue_id):
        raise HttpError(404, f"no message {queue_id!r} in the queue")
    return queue_id


async def list_queue(s: Services, limit: int = 500, within: str | None = None
                     ) -> dict[str, Any]:  # fmt: skip
    messages, total = await s.queue.list(limit, within)
    return {"total": total, "messages": messages}


async def show_queued(s: Services, queue_id: str) -> dict[str, Any]:
    doc = await s.queue.show(_queue_id(queue_id))
    if doc is None:
        raise HttpError(404, f"no message {queue_id!r} in the queue")
    return doc


async def retry_queued(s: Services, queue_id: str) -> dict[str, Any]:
    _queue_id(queue_id)
    try:
        queued = await s.control.retry(queue_id)
    except DeliveryOff:
        raise HttpError(409, "delivery is not running in this relay ([delivery] enabled = no)")
    except DeliveryNotRunning:
        raise HttpError(503, "the delivery process is restarting; try again in a few seconds")
    if not queued:
        raise HttpError(404, f"no message {queue_id!r} waiting in the queue")
    log.info("control panel: retry {queue_id} now", queue_id=queue_id)
    return {"id": queue_id, "retry": "scheduled now"}


async def release_queued(s: Services, queue_id: str) -> dict[str, Any]:
    """Deliver a message held over its user's quota now, counted in the current period
    (policy/quotahold.py); 404 when it is not held, 409 when it is a sandboxed user's."""
    try:
        released = await s.control.release(_queue_id(queue_id))
    except KeyError:
        raise HttpError(404, f"no message {queue_id!r} held in the queue")
    except NotQuotaHeld as e:
        raise HttpError(409, str(e))
    if not released:
        raise HttpError(409, f"{queue_id} is being released already")
    log.info("control panel: released {queue_id}", queue_id=queue_id)
    return {"id": queue_id, "released": True}


async def delete_queued(s: Services, queue_id: str) -> None:
    try:
        place = await s.control.delete(_queue_id(queue_id))
    except KeyError:
        raise HttpError(404, f"no message {queue_id!r} in the queue")
    log.info("control panel: deleted {queue_id} from {place}", queue_id=queue_id, place=place)


# ---- DKIM keys ----


@contextlib.contextmanager
def dkim_refusals() -> Iterator[None]:
    try:
        yield
    except manage_dkim.UnknownKey as e:
        raise HttpError(404, str(e))
    except manage_dkim.KeyConflict as e:
        raise HttpError(409, str(e))
    except manage_dkim.DkimError as e:
        raise HttpError(400, str(e))
    except OSError as e:
        raise HttpError(503, f"the DKIM key directory cannot be changed now: {e.strerror}")


async def list_dkim(s: Services, within: str | None = None) -> list[dict[str, Any]]:
    with dkim_refusals():
        return await manage_dkim.listed(s.dkim, s.resolver, within)


async def show_dkim(s: Services, domain: str) -> list[dict[str, Any]]:
    """The domain's keys with the TXT records to publish (never a private key) and
    whether each is published."""
    with dkim_refusals():
        return await manage_dkim.shown(s.dkim, domain, s.resolver)


_DKIM_FIELDS = {"domain": (str,), "selector": (str, type(None)), "type": (str,), "bits": (int,)}


async def add_dkim(s: Services, doc: dict[str, Any]) -> dict[str, Any]:
    """A key for an authorized domain of one account (or for the relay domain), active at
    once when it is the domain's first of its type, else pending; fires with its document
    and its TXT record."""
    unknown = sorted(set(doc) - set(_DKIM_FIELDS))
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(unknown)} (known: "
                        f"{', '.join(_DKIM_FIELDS)})")  # fmt: skip
    if "domain" not in doc:
        raise HttpError(400, "domain is required")
    for key, value in doc.items():
        if not isinstance(value, _DKIM_FIELDS[key]) or isinstance(value, bool):
            raise HttpError(400, f"{key}: {value!r} is not of the right type")
    if not 1024 <= doc.get("bits", 2048) <= 4096:
        raise HttpError(400, f"bits {doc['bits']}: from 1024 to 4096 (2048 is the usual)")
    with dkim_refusals():
        domain = manage_dkim.domain_name(doc["domain"])
        account = await manage_dkim.key_owner(s.manager, domain, _relay_domain(s))
        key = await s.dkim.add(domain, account, doc.get("selector") or None,
                               doc.get("type", "rsa"), doc.get("bits", 2048))
        record = await s.dkim.txtRecord(key)
    log.info("control panel: DKIM key {selector} made for {domain}", selector=key.selector,
             domain=domain)  # fmt: skip
    return manage_dkim.dkim_json(key, record)


def _relay_domain(s: Services) -> str:
    return getattr(getattr(s.config, "dkim", None), "relay_domain", "")


async def activate_dkim(s: Services, domain: str, selector: str) -> dict[str, Any]:
    """``dkim activate``: the pending key signs from now on, if its record is in DNS
    (else 409); fires with ``{"active": key, "retiring": [keys]}``."""
    with dkim_refusals():
        key, old = await manage_dkim.activate(s.dkim, s.resolver, domain, selector.lower())
    log.info("control panel: {domain} is signed with DKIM selector {selector} from now on",
             domain=key.domain, selector=key.selector)  # fmt: skip
    return {"active": manage_dkim.dkim_json(key),
            "retiring": [manage_dkim.dkim_json(k) for k in old]}


async def retire_dkim(s: Services, domain: str, selector: str) -> dict[str, Any]:
    """``dkim retire``: delete a retiring key (409 for a key in another state)."""
    with dkim_refusals():
        key = await s.dkim.retire(domain, selector)
    log.info("control panel: retiring DKIM key {selector} of {domain} deleted",
             selector=key.selector, domain=key.domain)  # fmt: skip
    return manage_dkim.dkim_json(key)


async def delete_dkim(s: Services, domain: str, selector: str) -> dict[str, Any]:
    with dkim_refusals():
        key = await s.dkim.remove(domain, selector)
    log.info("control panel: DKIM key {selector} of {domain} deleted", selector=key.selector,
             domain=key.domain)  # fmt: skip
    return manage_dkim.dkim_json(key)


# ---- sending domains ----


async def sending_domains(s: Services, within: str | None = None) -> list[str]:
    """The domains the relay sends for: every account's authorized domains, the domains
    with DKIM keys and the relay domain (``within``: only that account's domains and
    those its keys sign, not the relay domain)."""
    with refusals():
        accounts = [a for a, _ in await s.manager.accounts(within)]
    with dkim_refusals():
        keys = await manage_dkim.owned(s.dkim, within)
    found = {d for a in accounts for d in a.domains} | {k.domain for k in keys}
    relay = {_relay_domain(s)} - {""} if within is None else set()
    return sorted(found | relay)


async def check_domain(s: Services, domain: str) -> dict[str, Any]:
    """``domain check --json``: SPF, DKIM and DMARC of a domain the relay sends for (404
    for any other), as published in DNS now."""
    from mailrelay.manage.domaincheck import bounce_domain_of, check_configured

    with dkim_refusals():
        name = manage_dkim.domain_name(domain)
    if name not in await sending_domains(s):
        raise HttpError(404, f"{name} is not a domain of any account, nor one with DKIM keys")
    with refusals():
        bounce_domain = bounce_domain_of(await s.manager.store.listAccounts(), name)
    with dkim_refusals():
        return await check_configured(s.config, s.dkim, s.resolver, name, bounce_domain)


# ---- statistics ----


def parse_since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return manage_stats.since(text)
    except ValueError:
        raise HttpError(400, f"since {text!r}: not a date (2026-11-01) or a duration (7d)")


async def stats(
    s: Services, user: str | None = None, account: str | None = None,
    since: str | None = None, period: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    if period not in (None, "hour", "day"):
        raise HttpError(400, "period must be hour or day")
    start = parse_since(since)
    username = None
    if user:
        found, _ = await find_user(s, user)
        username, account = found.username, account or found.account
    elif account and await s.manager.store.getAccount(account) is None:
        raise HttpError(404, f"unknown account {account!r}")
    call = threaded(s.reactor)
    totals = await call(s.stats.query, account, username, start)
    out: dict[str, Any] = {"user": username, "account": account, "since": start,
                           "period": period, "totals": totals}  # fmt: skip
    if period:
        rows = await call(s.stats.query, account, username, start, period)
        out["periods"] = [
            {"start": p.start, "account": p.account, "user": p.user,
             **{e.value: p.counts.get(e.value, 0) for e in Event}}
            for p in rows
        ]  # fmt: skip
    return out


# -- explain: what the relay would answer a user (manage/explain.py)

MAX_EXPLAIN_COUNT = 10**12  # recipients, size: past any configured limit
_EXPLAIN_FIELDS = {"username": str, "sender": str, "from_header": str, "ip": str,
                   "recipients": int, "size": int}


async def explain(s: Services, doc: dict[str, Any]) -> dict[str, Any]:
    """The steps of one submission (manage.explain.Explanation.to_json); the running
    relay's rate-limit state asked over its control socket, as mailrelay-admin does."""
    unknown = sorted(set(doc) - set(_EXPLAIN_FIELDS))
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(unknown)} (known: "
                        f"{', '.join(_EXPLAIN_FIELDS)})")  # fmt: skip
    for key in ("username", "sender"):
        if key not in doc:
            raise HttpError(400, f"{key} is required")
    for key, value in doc.items():
        kind = _EXPLAIN_FIELDS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise HttpError(400, f"{key}: {value!r} is not of the right type")
        least = 1 if key == "recipients" else 0
        if kind is int and not least <= value <= MAX_EXPLAIN_COUNT:
            raise HttpError(400, f"{key}: from {least} to {MAX_EXPLAIN_COUNT}")
    ip = None
    if doc.get("ip"):
        try:
            ip = manage_explain.client_address(doc["ip"])
        except ValueError as e:
            raise HttpError(400, str(e))
    user, account = await find_user(s, doc["username"])
    control_socket = s.config.server.control_socket
    result = await manage_explain.explain(
        user, account, manage_explain.Settings.of(s.config), doc["sender"],
        doc.get("from_header"), doc.get("recipients", 1), doc.get("size"),
        lambda u, a: manage_explain.relay_limits(s.reactor, control_socket, u, ip, a), ip,
    )
    return result.to_json()
