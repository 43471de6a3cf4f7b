"""The webhook endpoints and the outbox, in one SQLite file shared by the relay, its
delivery process and mailrelay-admin (features/db.py: WAL, a busy timeout).

An endpoint belongs to an account; it may name some of the account's SMTP users and some
kinds of event (none named: all). The outbox holds one row per event and endpoint: pending
until sent (then removed) or failed (kept ``failed_retention`` for the failed-events view,
where it can be sent again). Every lookup takes the account, so that what one account's
administrator sees and changes can be limited to that account (None: every account).
Methods block: the daemon calls them in a thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mailrelay.features.db import SqliteStore
from mailrelay.webhooks import signing

PENDING, FAILED = "pending", "failed"


@dataclass(frozen=True)
class Endpoint:
    id: int
    account: str
    url: str
    users: tuple[str, ...]  # empty: every user of the account
    kinds: tuple[str, ...]  # empty: every kind of event
    secrets: tuple[tuple[str, float | None], ...]  # (secret, expires), newest first
    enabled: bool
    disabled_reason: str
    created: float

    def wants(self, user: str | None, kind: str) -> bool:
        return ((not self.users or (user or "").lower() in self.users)
                and (not self.kinds or kind in self.kinds))  # fmt: skip

    def active_secrets(self, now: float) -> list[str]:
        return [s for s, expires in self.secrets if expires is None or expires > now]


@dataclass(frozen=True)
class Delivery:
    """One event on its way to one endpoint."""

    id: int
    event_id: str
    endpoint: int
    account: str
    kind: str
    body: bytes
    created: float
    state: str
    attempts: int
    next_attempt: float
    last_status: int | None
    last_error: str


@dataclass(frozen=True)
class Event:
    """An event as the sink hands it over: the JSON body is made already."""

    id: str
    account: str
    user: str | None
    kind: str
    body: bytes
    created: float


_ENDPOINT = "id, account, url, users, kinds, secrets, enabled, disabled_reason, created"
_DELIVERY = ("id, event_id, endpoint, account, kind, body, created, state, attempts, "
             "next_attempt, last_status, last_error")


def _endpoint(row: tuple) -> Endpoint:
    return Endpoint(row[0], row[1], row[2], tuple(row[3].split()), tuple(row[4].split()),
                    tuple((s, e) for s, e in json.loads(row[5])), bool(row[6]), row[7],
                    row[8])  # fmt: skip


def _delivery(row: tuple) -> Delivery:
    return Delivery(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), *row[6:])


def rotated(secrets, now: float, overlap: float) -> list[list]:
    """An endpoint's secrets after a rotation: a new one first; the ones still active stay
    valid ``overlap`` seconds more (requests are signed with each meanwhile), expired ones
    go."""
    kept = [[s, now + overlap if e is None else min(e, now + overlap)]
            for s, e in secrets if e is None or e > now]  # fmt: skip
    return [[signing.new_secret(), None], *([s, e] for s, e in kept if overlap > 0)]


def by_account(endpoints: list[Endpoint]) -> dict[str, list[Endpoint]]:
    found: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        found.setdefault(e.account, []).append(e)
    return found


def _scope(account: str | None, column: str = "account") -> tuple[str, list[Any]]:
    return ("", []) if account is None else (f" AND {column} = ?", [account])


class WebhookStore(SqliteStore):
    MIGRATIONS = {
        1: """
            CREATE TABLE IF NOT EXISTS endpoints (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                account TEXT NOT NULL,
                url TEXT NOT NULL,
                users TEXT NOT NULL DEFAULT '',
                kinds TEXT NOT NULL DEFAULT '',
                secrets TEXT NOT NULL,
                enabled INTEGER NOT NULL DEFAULT 1,
                disabled_reason TEXT NOT NULL DEFAULT '',
                created REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id TEXT NOT NULL,
                endpoint INTEGER NOT NULL,
                account TEXT NOT NULL,
                kind TEXT NOT NULL,
                body BLOB NOT NULL,
                created REAL NOT NULL,
                state TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt REAL NOT NULL,
                last_status INTEGER,
                last_error TEXT NOT NULL DEFAULT ''
            );
            CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt);
            CREATE INDEX IF NOT EXISTS outbox_account ON outbox (account, state);
        """,
    }

    # ---- endpoints

    def add_endpoint(self, account: str, url: str, users: list[str], kinds: list[str],
                     now: float) -> Endpoint:  # fmt: skip
        secrets = json.dumps([[signing.new_secret(), None]])
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO endpoints (account, url, users, kinds, secrets, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (account, url, " ".join(u.lower() for u in users), " ".join(kinds), secrets,
                 now))  # fmt: skip
            return self._one(db, cursor.lastrowid, None)

    def endpoints(self, account: str | None = None) -> list[Endpoint]:
        where, args = _scope(account)
        rows = self.fetch(f"SELECT {_ENDPOINT} FROM endpoints WHERE 1{where} ORDER BY id", args)
        return [_endpoint(r) for r in rows]

    def endpoint(self, endpoint_id: int, account: str | None = None) -> Endpoint | None:
        with self._lock:
            return self._one(self._db, endpoint_id, account)

    def _one(self, db, endpoint_id: int, account: str | None) -> Endpoint | None:
        where, args = _scope(account)
        row = db.execute(f"SELECT {_ENDPOINT} FROM endpoints WHERE id = ?{where}",
                         [endpoint_id, *args]).fetchone()  # fmt: skip
        return None if row is None else _endpoint(row)

    def remove_endpoint(self, endpoint_id: int, account: str | None = None) -> bool:
        """The endpoint and its outbox rows (pending and failed) go."""
        where, args = _scope(account)
        with self.transaction() as db:
            gone = db.execute(f"DELETE FROM endpoints WHERE id = ?{where}",
                              [endpoint_id, *args]).rowcount  # fmt: skip
            if gone:
                db.execute("DELETE FROM outbox WHERE endpoint = ?", (endpoint_id,))
            return bool(gone)

    def rotate_secret(self, endpoint_id: int, account: str | None, now: float,
                      overlap: float) -> Endpoint | None:  # fmt: skip
        """See ``rotated``."""
        with self.transaction() as db:
            found = self._one(db, endpoint_id, account)
            if found is None:
                return None
            secrets = rotated(found.secrets, now, overlap)
            db.execute("UPDATE endpoints SET secrets = ? WHERE id = ?",
                       (json.dumps(secrets), endpoint_id))
            return self._one(db, endpoint_id, None)

    def set_enabled(self, endpoint_id: int, account: str | None, enabled: bool,
                    reason: str = "") -> bool:  # fmt: skip
        """Disabling fails the endpoint's pending events (retry them once it is enabled)."""
        where, args = _scope(account)
        with self.transaction() as db:
            changed = db.execute(
                f"UPDATE endpoints SET enabled = ?, disabled_reason = ? WHERE id = ?{where}",
                [int(enabled), "" if enabled else reason, endpoint_id, *args]).rowcount
            if changed and not enabled:
                self._fail_pending(db, [endpoint_id], reason)
            return bool(changed)

    @staticmethod
    def _fail_pending(db, endpoint_ids: list[int], reason: str) -> None:
        db.executemany("UPDATE outbox SET state = ?, last_error = ? WHERE endpoint = ? AND "
                       "state = ?", [(FAILED, f"endpoint disabled: {reason}", i, PENDING)
                                     for i in endpoint_ids])  # fmt: skip

    # ---- the outbox

    def append(self, events: list[Event]) -> int:
        """One pending row per event and enabled endpoint that wants it; how many."""
        with self.transaction() as db:
            accounts = by_account(self._enabled(db))
            rows = [(event.id, e.id, event.account, event.kind, event.body, event.created,
                     event.created)
                    for event in events for e in accounts.get(event.account, ())
                    if e.wants(event.user, event.kind)]  # fmt: skip
            db.executemany("INSERT INTO outbox (event_id, endpoint, account, kind, body, "
                           "created, next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            return len(rows)

    def _enabled(self, db) -> list[Endpoint]:
        return [_endpoint(r) for r in db.execute(
            f"SELECT {_ENDPOINT} FROM endpoints WHERE enabled = 1")]

    def due(self, now: float, limit: int, busy: set[int] = frozenset()) -> list[
            tuple[Delivery, Endpoint]]:  # fmt: skip
        """Pending rows whose time has come, oldest first, with their endpoint; not those
        in ``busy`` (being sent)."""
        rows = self.fetch(
            f"SELECT {', '.join('o.' + c for c in _DELIVERY.split(', '))}, "
            f"{', '.join('e.' + c for c in _ENDPOINT.split(', '))} "
            "FROM outbox o JOIN endpoints e ON e.id = o.endpoint "
            "WHERE o.state = ? AND o.next_attempt <= ? AND e.enabled = 1 "
            "ORDER BY o.next_attempt, o.id LIMIT ?", (PENDING, now, limit + len(busy)))
        n = len(_DELIVERY.split(", "))
        out = [(_delivery(r[:n]), _endpoint(r[n:])) for r in rows]
        return [(d, e) for d, e in out if d.id not in busy][:limit]

    def sent(self, delivery_id: int) -> None:
        self.record([(delivery_id, None, 0.0, None, "")])

    def attempted(self, delivery_id: int, state: str, next_attempt: float,
                  status: int | None, error: str) -> None:  # fmt: skip
        self.record([(delivery_id, state, next_attempt, status, error)])

    def record(self, outcomes: list[tuple]) -> list[None]:
        """Several answers in one transaction, each ``(delivery_id, state, next_attempt,
        status, error)`` as for ``attempted``, or ``(delivery_id, None, ...)``: sent."""
        with self.transaction() as db:
            for delivery_id, state, next_attempt, status, error in outcomes:
                if state is None:
                    db.execute("DELETE FROM outbox WHERE id = ?", (delivery_id,))
                else:
                    db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, "
                               "next_attempt = ?, last_status = ?, last_error = ? "
                               "WHERE id = ?",
                               (state, next_attempt, status, error[:500], delivery_id))
        return [None] * len(outcomes)

    def failed(self, account: str | None = None, limit: int = 500) -> list[Delivery]:
        where, args = _scope(account)
        rows = self.fetch(f"SELECT {_DELIVERY} FROM outbox WHERE state = ?{where} "
                          "ORDER BY id DESC LIMIT ?", [FAILED, *args, limit])
        return [_delivery(r) for r in rows]

    def failed_event(self, delivery_id: int, account: str | None = None) -> Delivery | None:
        where, args = _scope(account)
        rows = self.fetch(f"SELECT {_DELIVERY} FROM outbox WHERE id = ? AND state = ?{where}",
                          [delivery_id, FAILED, *args])  # fmt: skip
        return _delivery(rows[0]) if rows else None

    def pending_count(self, account: str | None = None) -> int:
        where, args = _scope(account)
        return self.fetch(f"SELECT count(*) FROM outbox WHERE state = ?{where}",
                          [PENDING, *args])[0][0]  # fmt: skip

    def retry(self, delivery_id: int, account: str | None, now: float) -> str:
        """A failed row pending again, due now, its attempts counted from zero:
        "retried", "unknown" (no such failed row) or "disabled" (its endpoint is)."""
        where, args = _scope(account, "o.account")
        with self.transaction() as db:
            row = db.execute(f"SELECT e.enabled FROM outbox o JOIN endpoints e ON "
                             f"e.id = o.endpoint WHERE o.id = ? AND o.state = ?{where}",
                             [delivery_id, FAILED, *args]).fetchone()  # fmt: skip
            if row is None:
                return "unknown"
            if not row[0]:
                return "disabled"
            db.execute("UPDATE outbox SET state = ?, attempts = 0, next_attempt = ? "
                       "WHERE id = ?", (PENDING, now, delivery_id))
            return "retried"

    def prune(self, before: float) -> int:
        """Failed rows older than ``before`` go."""
        with self.transaction() as db:
            return db.execute("DELETE FROM outbox WHERE state = ? AND created < ?",
                              (FAILED, before)).rowcount
