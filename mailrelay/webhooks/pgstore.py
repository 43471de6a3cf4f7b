"""Webhook endpoints shared by the nodes (``[cluster] postgres``): the endpoints (URL,
secrets, filters, state) in PostgreSQL, so an endpoint added through any node receives
the events of every node; each node keeps its own outbox in its SQLite file (store.py):
it is that node's durable queue of what it has to send, and its failed events are listed
and sent again on that node.

Each process (the relay, its delivery process) appends and sends with an in-memory copy
of the endpoints, read again whenever one changes: every change is announced with NOTIFY
(``mailrelay_webhooks``) and each node's Listener (postgres/db.py) drops the copy, so a
410 that disabled an endpoint on one node, a new secret, a new or deleted endpoint are in
force on every node within moments. The outbox rows of an endpoint disabled or deleted on
another node are failed (disabled) or dropped (deleted) by this node when they come due.
What management shows (mailrelay-admin, the API, the panel) is read from the database.

While PostgreSQL is away the copy keeps serving (events are still queued and sent);
management calls fail with the database's error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.logger import Logger

from mailrelay.postgres.db import Database, Listener, PgStore, notify
from mailrelay.webhooks import signing
from mailrelay.webhooks.store import (
    _DELIVERY,
    _ENDPOINT,
    FAILED,
    PENDING,
    Delivery,
    Endpoint,
    WebhookStore,
    _delivery,
    _endpoint,
    rotated,
)

log = Logger()

CHANNEL = "mailrelay_webhooks"


def _scope(account: str | None) -> tuple[str, list]:
    return ("", []) if account is None else (" AND account = %s", [account])


class PgEndpoints(PgStore):
    """The endpoints in PostgreSQL (blocking, called in a thread) and this process's copy
    of them (``cached``), dropped by ``changed`` (the Listener's callback)."""

    COMPONENT = "webhooks"
    MIGRATIONS = {
        1: """
            CREATE TABLE webhook_endpoints (
                id BIGSERIAL PRIMARY KEY,
                account TEXT NOT NULL,
                url TEXT NOT NULL,
                users TEXT NOT NULL DEFAULT '',
                kinds TEXT NOT NULL DEFAULT '',
                secrets TEXT NOT NULL,
                enabled BOOLEAN NOT NULL DEFAULT TRUE,
                disabled_reason TEXT NOT NULL DEFAULT '',
                created DOUBLE PRECISION NOT NULL
            );
            CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account);
        """,
    }

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self._lock = threading.Lock()
        self._copy: dict[int, Endpoint] | None = None
        self._generation = 0  # bumped by each change: a copy read meanwhile is not kept

    # ---- this process's copy

    def changed(self, channel: str = CHANNEL, payload: str | None = None) -> None:
        with self._lock:
            self._generation += 1
            self._copy = None

    def cached(self) -> dict[int, Endpoint]:
        """Every endpoint by id, as last read (read now when a change dropped it)."""
        with self._lock:
            if self._copy is not None:
                return self._copy
            generation = self._generation
        endpoints = {e.id: e for e in self.endpoints()}
        with self._lock:
            if generation == self._generation:
                self._copy = endpoints
        return endpoints

    def listener(self, reactor) -> Listener:
        """The service that drops the copy when another process changes an endpoint."""
        return Listener(self.db, [CHANNEL], self.changed, reactor)

    # ---- the endpoints (what store.WebhookStore does with its own table)

    def endpoints(self, account: str | None = None) -> list[Endpoint]:
        where, args = _scope(account)
        with self.db.transaction() as conn:
            rows = conn.execute(f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE TRUE"
                                f"{where} ORDER BY id", args).fetchall()  # fmt: skip
        return [_endpoint(r) for r in rows]

    def endpoint(self, endpoint_id: int, account: str | None = None) -> Endpoint | None:
        with self.db.transaction() as conn:
            return self._one(conn, endpoint_id, account)

    @staticmethod
    def _one(conn, endpoint_id: int, account: str | None) -> Endpoint | None:
        where, args = _scope(account)
        row = conn.execute(f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE id = %s{where}",
                           [endpoint_id, *args]).fetchone()  # fmt: skip
        return None if row is None else _endpoint(row)

    @contextmanager
    def _change(self) -> Iterator:
        """A transaction whose changes every process is told of: the others by NOTIFY at
        its commit, this one's copy dropped after it (a copy read meanwhile is not kept)."""
        try:
            with self.db.transaction() as conn:
                yield conn
        finally:
            self.changed()

    def add_endpoint(self, account: str, url: str, users: list[str], kinds: list[str],
                     now: float) -> Endpoint:  # fmt: skip
        secrets = json.dumps([[signing.new_secret(), None]])
        with self._change() as conn:
            row = conn.execute(
                f"INSERT INTO webhook_endpoints (account, url, users, kinds, secrets, created) "
                f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_ENDPOINT}",
                (account, url, " ".join(u.lower() for u in users), " ".join(kinds), secrets,
                 now)).fetchone()  # fmt: skip
            notify(conn, CHANNEL, str(row[0]))
        return _endpoint(row)

    def remove_endpoint(self, endpoint_id: int, account: str | None = None) -> bool:
        where, args = _scope(account)
        with self._change() as conn:
            gone = conn.execute(f"DELETE FROM webhook_endpoints WHERE id = %s{where}",
                                [endpoint_id, *args]).rowcount  # fmt: skip
            if gone:
                notify(conn, CHANNEL, str(endpoint_id))
        return bool(gone)

    def rotate_secret(self, endpoint_id: int, account: str | None, now: float,
                      overlap: float) -> Endpoint | None:  # fmt: skip
        with self._change() as conn:
            where, args = _scope(account)
            row = conn.execute(f"SELECT secrets FROM webhook_endpoints WHERE id = %s{where} "
                               "FOR UPDATE", [endpoint_id, *args]).fetchone()  # fmt: skip
            if row is None:
                return None
            secrets = rotated(json.loads(row[0]), now, overlap)
            conn.execute("UPDATE webhook_endpoints SET secrets = %s WHERE id = %s",
                         (json.dumps(secrets), endpoint_id))
            notify(conn, CHANNEL, str(endpoint_id))
            return self._one(conn, endpoint_id, None)

    def set_enabled(self, endpoint_id: int, account: str | None, enabled: bool,
                    reason: str = "") -> bool:  # fmt: skip
        where, args = _scope(account)
        with self._change() as conn:
            changed = conn.execute(
                f"UPDATE webhook_endpoints SET enabled = %s, disabled_reason = %s "
                f"WHERE id = %s{where}",
                [enabled, "" if enabled else reason, endpoint_id, *args]).rowcount
            if changed:
                notify(conn, CHANNEL, str(endpoint_id))
        return bool(changed)


_shared: dict[int, PgEndpoints] = {}
_shared_lock = threading.Lock()


def endpoints_of(db: Database) -> PgEndpoints:
    """This process's PgEndpoints of ``db`` (one copy and one Listener per process)."""
    with _shared_lock:
        found = _shared.get(id(db))
        if found is None:
            found = _shared[id(db)] = PgEndpoints(db)
        return found


class SharedWebhookStore(WebhookStore):
    """The outbox in this node's SQLite file ``path``, the endpoints in PostgreSQL
    (``endpoints``): the same methods as WebhookStore, for the sink, the sender and
    management alike."""

    def __init__(self, path: str, endpoints: PgEndpoints) -> None:
        super().__init__(path)
        self.shared = endpoints

    def listener(self, reactor) -> Listener:
        return self.shared.listener(reactor)

    # ---- the endpoints: the database's

    def add_endpoint(self, account, url, users, kinds, now) -> Endpoint:
        return self.shared.add_endpoint(account, url, users, kinds, now)

    def endpoints(self, account=None) -> list[Endpoint]:
        return self.shared.endpoints(account)

    def endpoint(self, endpoint_id, account=None) -> Endpoint | None:
        return self.shared.endpoint(endpoint_id, account)

    def remove_endpoint(self, endpoint_id, account=None) -> bool:
        """Its events go from this node's outbox now, from the others' when due."""
        gone = self.shared.remove_endpoint(endpoint_id, account)
        if gone:
            self._drop([endpoint_id])
        return gone

    def rotate_secret(self, endpoint_id, account, now, overlap) -> Endpoint | None:
        return self.shared.rotate_secret(endpoint_id, account, now, overlap)

    def set_enabled(self, endpoint_id, account, enabled, reason="") -> bool:
        changed = self.shared.set_enabled(endpoint_id, account, enabled, reason)
        if changed and not enabled:
            with self.transaction() as db:
                self._fail_pending(db, [endpoint_id], reason)
        return changed

    def _drop(self, endpoint_ids: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM outbox WHERE endpoint = ?",
                           [(i,) for i in endpoint_ids])

    # ---- the outbox: this node's, with the copy of the endpoints

    def _enabled(self, db) -> list[Endpoint]:
        return [e for e in self.shared.cached().values() if e.enabled]

    def due(self, now: float, limit: int, busy: set[int] = frozenset()) -> list[
            tuple[Delivery, Endpoint]]:  # fmt: skip
        """As WebhookStore.due; the rows of an endpoint disabled meanwhile fail, those of
        one deleted go (on this node their endpoint's change did so already)."""
        endpoints = self.shared.cached()
        rows = [_delivery(r) for r in self.fetch(
            f"SELECT {_DELIVERY} FROM outbox WHERE state = ? AND next_attempt <= ? "
            "ORDER BY next_attempt, id LIMIT ?", (PENDING, now, limit + len(busy)))]
        gone = {d.endpoint for d in rows if d.endpoint not in endpoints}
        disabled = {d.endpoint for d in rows if d.endpoint in endpoints
                    and not endpoints[d.endpoint].enabled}  # fmt: skip
        if gone:
            self._drop(sorted(gone))
        for endpoint_id in disabled:
            with self.transaction() as db:
                self._fail_pending(db, [endpoint_id], endpoints[endpoint_id].disabled_reason)
        return [(d, endpoints[d.endpoint]) for d in rows if d.id not in busy
                and d.endpoint in endpoints and endpoints[d.endpoint].enabled][:limit]

    def failed(self, account=None, limit=500) -> list[Delivery]:
        known = self.shared.cached()
        return [d for d in super().failed(account, limit) if d.endpoint in known]

    def failed_event(self, delivery_id, account=None) -> Delivery | None:
        found = super().failed_event(delivery_id, account)
        return found if found is not None and found.endpoint in self.shared.cached() else None

    def retry(self, delivery_id: int, account: str | None, now: float) -> str:
        found = self.failed_event(delivery_id, account)
        if found is None:
            return "unknown"
        endpoint = self.shared.endpoint(found.endpoint)
        if endpoint is None:
            return "unknown"
        if not endpoint.enabled:
            return "disabled"
        with self.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, attempts = 0, next_attempt = ? "
                       "WHERE id = ? AND state = ?", (PENDING, now, delivery_id, FAILED))
        return "retried"
