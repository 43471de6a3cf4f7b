"""The suppression lists in PostgreSQL (``[cluster] postgres``): the same three levels and
answers as the SQLite store (features/suppressions.py), shared by every node.

Every change is announced on the ``mailrelay_suppressions`` channel in its transaction.
The delivery process answers "is this recipient suppressed?" from ``SuppressionCache``, a
copy of the lists in memory kept current by those notifications: no query per message,
and a suppression added on any node (API, CLI, a hard bounce, an unsubscribe, a
complaint) is in force on every node within milliseconds of its commit.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable

from twisted.application.service import Service
from twisted.internet import threads
from twisted.logger import Logger

from mailrelay.features.suppressions import Reason, Suppression, _key
from mailrelay.postgres.db import Listener, PgStore, notify

log = Logger()

CHANNEL = "mailrelay_suppressions"


class PgSuppressionStore(PgStore):
    COMPONENT = "suppressions"
    MIGRATIONS = {1: """
    CREATE TABLE suppressions (
        account TEXT NOT NULL,
        user_name TEXT NOT NULL,
        address TEXT NOT NULL,
        reason TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (account, user_name, address)
    );
    CREATE INDEX suppressions_by_address ON suppressions (address);
    CREATE INDEX suppressions_by_user ON suppressions (user_name);
    """}

    def add(self, address: str, account: str | None = None, user: str | None = None,
            reason: Reason = Reason.MANUAL, when: float | None = None) -> bool:
        """Suppress ``address``; False if it already was (the first entry is kept)."""
        key, address = _key(account, user), address.strip().lower()
        with self.db.transaction() as conn:
            added = conn.execute(
                "INSERT INTO suppressions VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (*key, address, Reason(reason).value, when or time.time())).rowcount == 1
            if added:
                notify(conn, CHANNEL, json.dumps(["add", *key, address]))
            return added

    def remove(self, address: str, account: str | None = None, user: str | None = None) -> bool:
        key, address = _key(account, user), address.strip().lower()
        with self.db.transaction() as conn:
            gone = conn.execute("DELETE FROM suppressions WHERE account = %s AND user_name = %s"
                                " AND address = %s", (*key, address)).rowcount == 1
            if gone:
                notify(conn, CHANNEL, json.dumps(["del", *key, address]))
            return gone

    def remove_user(self, user: str) -> int:
        if not user:
            raise ValueError("empty user name")
        return self._remove_all("user_name", "del-user", user)

    def remove_account(self, account: str) -> int:
        if not account:
            raise ValueError("empty account name")
        return self._remove_all("account", "del-account", account)

    def _remove_all(self, column: str, op: str, name: str) -> int:
        assert column in ("account", "user_name")  # a column name, never data
        with self.db.transaction() as conn:
            n = conn.execute(f"DELETE FROM suppressions WHERE {column} = %s", (name,)).rowcount
            if n:
                notify(conn, CHANNEL, json.dumps([op, name]))
            return n

    def of_user(self, user: str) -> list[Suppression]:
        return self._select("user_name = %s", (user,), "account, address")

    def list(self, account: str | None = None, user: str | None = None) -> list[Suppression]:
        if account is None:
            where, params = "account = '' AND user_name = ''", ()
        elif user is None:
            where, params = "account = %s", (account,)
        else:
            where, params = "account = %s AND user_name = %s", _key(account, user)
        return self._select(where, params, "address, user_name")

    def all(self) -> list[Suppression]:
        return self._select("TRUE", (), "account, user_name, address")

    def _select(self, where: str, params: tuple, order: str) -> list[Suppression]:
        # Byte order, as SQLite sorts, whatever the database's locale.
        order = ", ".join(f'{column} COLLATE "C"' for column in order.split(", "))
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT address, account, user_name, reason, created FROM "
                                f"suppressions WHERE {where} ORDER BY {order}",
                                params).fetchall()  # fmt: skip
        return [Suppression(a, acc or None, u or None, Reason(r), c) for a, acc, u, r, c in rows]

    def suppressed(self, account: str, user: str, addresses: Iterable[str]) -> set[str]:
        wanted: dict[str, list[str]] = {}
        for address in addresses:
            wanted.setdefault(address.strip().lower(), []).append(address)
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT address FROM suppressions WHERE address = ANY(%s) AND ("
                "(account = '' AND user_name = '') OR (account = %s AND user_name IN ('', %s)))",
                (list(wanted), account, user)).fetchall()
        return {given for (address,) in rows for given in wanted[address]}

    def contains(self, address: str, account: str, user: str) -> bool:
        return bool(self.suppressed(account, user, [address]))

    def keys(self) -> set[tuple[str, str, str]]:
        """Every entry as (account, user, address): what SuppressionCache holds."""
        with self.db.transaction() as conn:
            return {_entry(*row) for row in conn.execute(
                "SELECT account, user_name, address FROM suppressions")}  # fmt: skip

    def close(self) -> None:
        pass  # the pool is the process's (postgres.db.database)


class SuppressionCache:
    """Every node's delivery process keeps the lists in memory (about 180 bytes an entry)
    and answers ``suppressed`` from there, at once, without a thread or a query. Loaded
    when its Listener first listens (changes committed meanwhile are applied after the
    load, in order), updated by each notification, loaded again when notifications were
    lost. Until the first load it asks the database. Writes go to the store."""

    def __init__(self, store: PgSuppressionStore, reactor) -> None:
        self.store = store
        self.reactor = reactor
        self.loaded = False
        self._keys: set[tuple[str, str, str]] = set()
        self._loading: list | None = None  # changes seen while a load runs
        self.listener = Listener(store.db, [CHANNEL], self._received, reactor)
        self._watch = None

    def __getattr__(self, name: str):  # add, remove, list, ...: the store's
        return getattr(self.store, name)

    def start(self) -> None:
        """Load once the listener listens (checked every 50 ms while it runs)."""
        if self.listener.listening.is_set():
            self._load()
        elif self.listener.running:
            self.reactor.callLater(0.05, self.start)

    def _received(self, channel: str, payload: str | None) -> None:
        if payload is None:  # notifications were lost: anything may have changed
            self._load()
            return
        change = json.loads(payload)
        if self._loading is not None:
            self._loading.append(change)
        self._apply(self._keys, change)

    @staticmethod
    def _apply(keys: set, change: list) -> None:
        op, *args = change
        if op == "add":
            keys.add(_entry(*args))
        elif op == "del":
            keys.discard(_entry(*args))
        elif op in ("del-user", "del-account"):
            at = 1 if op == "del-user" else 0
            keys.difference_update([k for k in keys if k[at] == args[0]])

    def _load(self) -> None:
        if self._loading is not None:
            return  # one under way; it keeps what arrives meanwhile
        self._loading = []

        def loaded(keys: set) -> None:
            for change in self._loading:
                self._apply(keys, change)
            self._keys, self._loading, self.loaded = keys, None, True
            log.info("suppression lists loaded: {n} entries", n=len(keys))

        def failed(failure) -> None:
            self._loading = None
            log.failure("loading the suppression lists failed; asking the database until "
                        "they load", failure)
            self.reactor.callLater(1, self._load)

        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self.store.keys)
        d.addCallbacks(loaded, failed)

    def suppressed(self, account: str, user: str, addresses: Iterable[str]) -> set[str]:
        if not self.loaded:
            return self.store.suppressed(account, user, addresses)
        keys = self._keys
        found = set()
        for given in addresses:
            address = given.strip().lower()
            if (("", "", address) in keys or (account, "", address) in keys
                    or (account, user, address) in keys):
                found.add(given)
        return found

    def contains(self, address: str, account: str, user: str) -> bool:
        return bool(self.suppressed(account, user, [address]))


def _entry(account: str, user: str, address: str) -> tuple[str, str, str]:
    # One copy of each account and user name, however many entries name it.
    return sys.intern(account), sys.intern(user), address


class _Loading(Service):
    """Starts the cache's listener, then its first load."""

    def __init__(self, cache: SuppressionCache) -> None:
        self.cache = cache

    def startService(self) -> None:
        super().startService()
        self.cache.listener.startService()
        self.cache.start()

    def stopService(self):
        super().stopService()
        return self.cache.listener.stopService()


def cached(store: PgSuppressionStore, reactor, parent) -> SuppressionCache:
    """``store`` behind a cache whose listener runs with ``parent`` (a delivery process)."""
    cache = SuppressionCache(store, reactor)
    _Loading(cache).setServiceParent(parent)
    return cache
