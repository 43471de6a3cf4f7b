"""The DKIM keys in PostgreSQL (``[cluster] postgres``): every node signs with the same
keys, and a key made, activated, retired or deleted on one node signs (or stops signing)
on every node's delivery process within a second.

Table ``dkim_keys``: one row per key, ``(domain, selector)`` its key, ``state`` as a column,
the whole DkimKey as a JSONB document (its own to_json/from_json: a field added later
flows through), and the private key as PEM text. Private keys are secrets: whoever reads
the table can sign as the domains (docs/cluster.md: a private database, TLS off-host).

PgDkimKeys is manage.dkim.DkimKeys with its storage here: a change takes the table's lock
for its transaction (the file store's lock file), so the relays' scheduled record checks
and mailrelay-admin take turns; the second to activate a pending key finds it active
already (UnknownKey, which the check passes over). A change that alters what signs
(a key added, removed, or in another state) is announced on ``mailrelay_dkim``.

PgSigner is the delivery process's dkim.Signer over the same table: it reads the active
keys when a notification says they changed (or the listener was away), not on a timer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.types.json import Jsonb

from mailrelay.dkim import DkimKey, Signer
from mailrelay.manage.dkim import DkimKeys, UnknownKey
from mailrelay.postgres.db import Database, Listener, PgStore, notify
from mailrelay.postgres.unavailable import guarded

CHANNEL = "mailrelay_dkim"

MIGRATIONS = {
    1: """
    CREATE TABLE dkim_keys (
        domain TEXT NOT NULL,
        selector TEXT NOT NULL,
        state TEXT NOT NULL,
        doc JSONB NOT NULL,
        private_key TEXT NOT NULL,
        PRIMARY KEY (domain, selector)
    )""",
}


def _signs(doc: dict | None) -> tuple | None:
    """What of a key the signers use (a change of its DNS check result is not theirs)."""
    return None if doc is None else (doc.get("state"), doc.get("account"), doc.get("type"))


class PgDkimKeys(DkimKeys, PgStore):
    COMPONENT = "dkim"
    MIGRATIONS = MIGRATIONS

    def __init__(self, db: Database, call, clock=time,
                 retire_after: float = 7 * 86400.0) -> None:  # fmt: skip
        DkimKeys.__init__(self, "", guarded(call), clock, retire_after)
        PgStore.__init__(self, db)
        self._tx = threading.local()  # the transaction of the change this thread makes

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        conn = getattr(self._tx, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.db.transaction() as conn:
            yield conn

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.db.transaction() as conn:
            # Writers take turns (readers are not held up); committed at the block's end.
            conn.execute("LOCK TABLE dkim_keys IN SHARE ROW EXCLUSIVE MODE")
            self._tx.conn, self._tx.signs = conn, False
            try:
                yield
                if self._tx.signs:
                    notify(conn, CHANNEL)
            finally:
                self._tx.conn = None

    def _keys(self) -> list[DkimKey]:
        with self._conn() as conn:
            rows = conn.execute("SELECT doc FROM dkim_keys").fetchall()
        keys = [DkimKey.from_json(doc) for (doc,) in rows]
        return sorted(keys, key=lambda k: (k.domain, k.selector))  # as the index is kept

    def _save(self, keys: list[DkimKey]) -> None:
        wanted = {(k.domain, k.selector): k.to_json() for k in keys}
        with self._conn() as conn:
            rows = conn.execute("SELECT domain, selector, doc FROM dkim_keys").fetchall()
            for domain, selector, doc in rows:
                new = wanted.get((domain, selector))
                if new == doc:
                    continue
                if _signs(new) != _signs(doc):
                    self._tx.signs = True
                if new is None:
                    conn.execute("DELETE FROM dkim_keys WHERE domain = %s AND selector = %s",
                                 (domain, selector))  # fmt: skip
                else:
                    conn.execute("UPDATE dkim_keys SET state = %s, doc = %s WHERE domain = %s"
                                 " AND selector = %s", (new["state"], Jsonb(new), domain,
                                                         selector))  # fmt: skip

    def _store_private(self, key: DkimKey, pem: bytes) -> None:
        with self._conn() as conn:
            conn.execute("INSERT INTO dkim_keys (domain, selector, state, doc, private_key) "
                         "VALUES (%s, %s, %s, %s, %s)",
                         (key.domain, key.selector, key.state, Jsonb(key.to_json()),
                          pem.decode("ascii")))  # fmt: skip
        self._tx.signs = True

    def _drop_private(self, key: DkimKey) -> None:
        pass  # the row went with _save

    def _private_pem(self, key: DkimKey) -> bytes:
        with self._conn() as conn:
            row = conn.execute("SELECT private_key FROM dkim_keys WHERE domain = %s AND "
                               "selector = %s", (key.domain, key.selector)).fetchone()
        if row is None:
            raise UnknownKey(f"{key.domain} has no key with selector {key.selector!r}")
        return row[0].encode("ascii")


class PgSigner(Signer):
    """The active keys of ``dkim_keys``, read again after a notification of a change
    (``listener``: a service of the delivery process). A failed read keeps the keys in
    use and is tried again after ``every`` seconds."""

    def __init__(self, db: Database, reactor, relay_domain: str = "", clock=time,
                 every: float = 2.0) -> None:  # fmt: skip
        super().__init__("PostgreSQL", clock, every, relay_domain)
        self.db = db
        self._stale = True
        self._not_before = float("-inf")
        self.listener = Listener(db, [CHANNEL], self._changed, reactor)

    def _changed(self, channel: str, payload: str | None) -> None:
        self._stale = True

    def due(self) -> bool:
        return self._stale and self.clock.time() >= self._not_before

    def refresh(self) -> None:
        self._stale = False  # first: a change told while reading makes it due again
        try:
            with self.db.transaction() as conn:
                rows = conn.execute("SELECT doc, private_key FROM dkim_keys WHERE state = "
                                    "'active'").fetchall()  # fmt: skip
        except Exception:
            self._stale, self._not_before = True, self.clock.time() + self.every
            raise
        keys = [(DkimKey.from_json(doc), pem.encode("ascii")) for doc, pem in rows]
        pems = {(k.domain, k.selector): pem for k, pem in keys}
        self._use([k for k, _ in keys], lambda key: pems[(key.domain, key.selector)])
