"""Admin logins and API keys in PostgreSQL (``[cluster] postgres``): an admin or a key made
on one node logs in on every node within a second.

Tables ``admin_logins`` and ``api_keys``: one row per login or key, its name (and a key's
hash) as columns, the rest as the JSONB document the access file holds for it
(manage.access's own _to_json/_from_json, so a field added to the file's entries is kept
here too). Password hashes and key hashes are secrets of a kind: docs/cluster.md.

PgAccessStore is manage.access.FileAccessStore with its reads and changes made here: a
change locks both tables for its transaction, applies the file store's own checks to the
rows as they are, writes the rows that differ and announces the change on
``mailrelay_access``. PgAccessView is the panel's cached view (manage.access.AccessFile's
``current``/``refresh``), read again in a thread on each notification.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from psycopg.types.json import Jsonb
from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.logger import Logger

from mailrelay.manage.access import (
    FORMAT_VERSION,
    AccessData,
    AccessStore,
    FileAccessStore,
    _from_json,
    _to_json,
)
from mailrelay.postgres.db import Database, Listener, PgStore, notify
from mailrelay.postgres.unavailable import guarded

log = Logger()
T = TypeVar("T")

CHANNEL = "mailrelay_access"
RETRY = 1.0  # seconds before a failed read is tried again
KINDS = ("admins", "api_keys")  # the access file's sections
_TABLE = {"admins": "admin_logins", "api_keys": "api_keys"}

MIGRATIONS = {
    1: """
    CREATE TABLE admin_logins (name TEXT PRIMARY KEY, doc JSONB NOT NULL);
    CREATE TABLE api_keys (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
                           doc JSONB NOT NULL);
    """,
}


class AccessTables(PgStore):
    """The two tables, blocking (call through a thread)."""

    COMPONENT = "access"
    MIGRATIONS = MIGRATIONS

    def _entries(self, conn) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": FORMAT_VERSION}
        for kind in KINDS:
            rows = conn.execute(f"SELECT name, doc FROM {_TABLE[kind]}").fetchall()
            doc[kind] = dict(rows)
        return doc

    def read(self) -> AccessData:
        with self.db.transaction() as conn:
            return _from_json(self._entries(conn))

    @contextlib.contextmanager
    def change(self) -> Iterator[AccessStore]:
        """The file store's ``change``: the block changes ``store.data``; the rows that
        differ are written when it ends without an error."""
        with self.db.transaction() as conn:
            conn.execute("LOCK TABLE admin_logins, api_keys IN SHARE ROW EXCLUSIVE MODE")
            rows = self._entries(conn)
            store = AccessStore("")
            store.data = _from_json(rows)
            # Compared as this code writes them: a row the block left alone is not written
            # again, and keeps the fields a newer node wrote that this one does not know.
            before = _to_json(_from_json(rows))
            yield store
            after = _to_json(store.data)
            changed = False
            for kind in KINDS:
                table = _TABLE[kind]
                for name in before[kind].keys() - after[kind].keys():
                    conn.execute(f"DELETE FROM {table} WHERE name = %s", (name,))
                    changed = True
                for name, entry in after[kind].items():
                    if before[kind].get(name) == entry:
                        continue
                    changed = True
                    if kind == "api_keys":
                        conn.execute("INSERT INTO api_keys (name, hash, doc) VALUES (%s, %s, %s)"
                                     " ON CONFLICT (name) DO UPDATE SET hash = EXCLUDED.hash,"
                                     " doc = EXCLUDED.doc", (name, entry["hash"], Jsonb(entry)))
                    else:
                        conn.execute("INSERT INTO admin_logins (name, doc) VALUES (%s, %s) ON "
                                     "CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc",
                                     (name, Jsonb(entry)))  # fmt: skip
            if changed:
                notify(conn, CHANNEL)


class PgAccessStore(FileAccessStore):
    """IAccessStore over the tables (mailrelay-admin's, through ``call``)."""

    def __init__(self, db: Database, call: Callable[..., defer.Deferred]) -> None:
        super().__init__("PostgreSQL", guarded(call))
        self.tables = AccessTables(db)

    def _read(self, f: Callable[[AccessData], T]) -> defer.Deferred[T]:
        return self.call(lambda: f(self.tables.read()))

    def _change(self, f: Callable[[AccessStore], T]) -> defer.Deferred[T]:
        def change() -> T:
            with self.tables.change() as store:
                return f(store)

        return self.call(change)


class PgAccessView(MultiService):
    """The panel's view of the tables: read when made (blocking, at startup), then again
    in a thread whenever a node announces a change (and after the listener was away).
    While the database is away the last logins and keys read stay in force."""

    def __init__(self, db: Database, reactor) -> None:
        super().__init__()
        self.tables = AccessTables(db)
        self.reactor = reactor
        self._data = self.tables.read()
        self._reading: defer.Deferred | None = None
        self._again = False
        Listener(db, [CHANNEL], self._changed, reactor).setServiceParent(self)

    def current(self) -> AccessData:
        return self._data

    def refresh(self) -> bool:
        """Nothing is read in the reactor's thread: a change is here once its
        notification is (milliseconds after the commit)."""
        return False

    def _changed(self, channel: str, payload: str | None) -> None:
        self._again = True
        if self._reading is None:  # else read again once this read is done
            self._read_again()

    def _read_again(self) -> None:
        self._again = False
        self._reading = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                  self.tables.read)  # fmt: skip
        self._reading.addCallbacks(self._read, self._failed).addCallback(self._done)

    def _read(self, data: AccessData) -> float:
        self._data = data
        return 0.0

    def _failed(self, failure) -> float:
        log.error("Keeping the previous admin access; cannot read it from PostgreSQL: "
                  "{error}", error=failure.getErrorMessage())
        self._again = True  # the change told is still to be read
        return RETRY

    def _done(self, wait: float) -> None:
        self._reading = None
        if self._again and wait:
            self.reactor.callLater(wait, self._changed, CHANNEL, None)
        elif self._again:
            self._read_again()
