"""Webhook endpoints as management sees them: the JSON documents (``webhook list
--json``, the API) and IWebhooks over the SQLite store, whose blocking calls run through
``call`` (manage.stores.threaded in the daemon, at_once in mailrelay-admin)."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

from zope.interface import implementer

from mailrelay.events import EventKind
from mailrelay.interfaces import IWebhooks
from mailrelay.manage.stores import Caller
from mailrelay.webhooks.store import Delivery, Endpoint, WebhookStore
from mailrelay.webhooks.targetcheck import literal, refused

KINDS = [k.value for k in EventKind]


def endpoint_json(e: Endpoint, secrets: bool = False) -> dict[str, Any]:
    """``secrets``: with the active secrets, newest first (shown when made)."""
    doc: dict[str, Any] = {"id": e.id, "account": e.account, "url": e.url,
                           "users": list(e.users), "events": list(e.kinds),
                           "enabled": e.enabled, "disabled_reason": e.disabled_reason,
                           "created": e.created}  # fmt: skip
    if secrets:
        doc["secrets"] = e.active_secrets(time.time())
    return doc


def failed_json(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "event_id": d.event_id, "endpoint": d.endpoint,
            "account": d.account, "type": d.kind, "created": d.created,
            "attempts": d.attempts, "last_attempt": d.next_attempt,
            "last_status": d.last_status, "last_error": d.last_error,
            "payload": json.loads(d.body)}  # fmt: skip


def check_url(url: str, allowed=()) -> str:
    """An http(s) URL with a host; an IP address refused by the target check is refused
    here already (a name is checked on each connection). ValueError otherwise."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put no user or password in the URL (requests are signed)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{url!r}: the port is not a number in 1..65535")
    address = literal(parts.hostname)
    if address is not None and refused(address, allowed):
        raise ValueError(f"{parts.hostname} is a private or local address ([webhooks] "
                         "allow_private)")
    return url


def check_kinds(kinds: list[str]) -> list[str]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown event(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    return kinds


@implementer(IWebhooks)
class Webhooks:
    """``allowed``: ``[webhooks] allow_private``; ``overlap``: ``secret_overlap``;
    ``now()``: the time."""

    def __init__(self, store: WebhookStore, call: Caller, allowed=(),
                 overlap: float = 86400.0, now=time.time) -> None:  # fmt: skip
        self.store = store
        self.call = call
        self.allowed = tuple(allowed)
        self.overlap = overlap
        self._now = now

    def list(self, account=None):
        return self.call(self.store.endpoints, account)

    def get(self, endpoint_id, account=None):
        return self.call(self.store.endpoint, endpoint_id, account)

    def add(self, account, url, users, kinds):
        url, kinds = check_url(url, self.allowed), check_kinds(list(kinds))
        return self.call(self.store.add_endpoint, account, url, list(users), kinds, self._now())

    def remove(self, endpoint_id, account=None):
        return self.call(self.store.remove_endpoint, endpoint_id, account)

    def rotateSecret(self, endpoint_id, account=None):
        return self.call(self.store.rotate_secret, endpoint_id, account, self._now(),
                         self.overlap)

    def enable(self, endpoint_id, account=None):
        return self.call(self.store.set_enabled, endpoint_id, account, True)

    def failed(self, account=None, limit=500):
        return self.call(self.store.failed, account, limit)

    def failedEvent(self, delivery_id, account=None):
        return self.call(self.store.failed_event, delivery_id, account)

    def retry(self, delivery_id, account=None):
        return self.call(self.store.retry, delivery_id, account, self._now())
