"""Suppression lists as management sees them: the JSON document (``suppression list
--json``, the API) and ISuppressionLists over the SQLite store, whose blocking calls run
through ``call`` (manage.stores.threaded in the daemon, at_once in mailrelay-admin)."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from mailrelay.features.suppressions import Reason, Suppression, SuppressionStore
from mailrelay.interfaces import ISuppressionLists
from mailrelay.manage.stores import Caller


def suppression_json(e: Suppression) -> dict[str, Any]:
    return {"address": e.address, "account": e.account, "user": e.user,
            "reason": e.reason.value, "created": e.created}  # fmt: skip


@implementer(ISuppressionLists)
class SuppressionLists:
    def __init__(self, store: SuppressionStore, call: Caller) -> None:
        self.store = store
        self.call = call

    def list(self, account: str | None = None, user: str | None = None):
        return self.call(self.store.list, account, user)

    def all(self, account: str | None = None):
        """Every entry; with ``account``, only that account's (never the global list)."""
        if account is not None:
            return self.list(account)
        return self.call(self.store.all)

    def ofUser(self, user: str):
        return self.call(self.store.of_user, user)

    def add(self, address: str, account: str | None, user: str | None, reason: Reason):
        return self.call(self.store.add, address, account, user, reason)

    def remove(self, address: str, account: str | None = None, user: str | None = None):
        return self.call(self.store.remove, address, account, user)
