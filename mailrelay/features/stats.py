"""Statistics per account, user and hour (UTC), plus opens/clicks/unsubscribes per message.

Writes are batched: ``StatsRecorder.record`` only adds to counters in memory (reactor-safe,
no I/O); every ``interval`` seconds, or at once when ``max_pending`` events have piled up,
the counters are written in one SQLite transaction in a pool thread. One transaction per
second costs one commit instead of one per event, never blocks the reactor, and loses at
most the last second's counts in a crash: acceptable for statistics (the spool, not the
statistics, is what must not lose anything). Stopping the service writes what is pending.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from twisted.logger import Logger

from mailrelay.features.db import SqliteStore
from mailrelay.flushing import BatchWriter

log = Logger()

HOUR = 3600
DAY = 86400


class Event(enum.StrEnum):
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    REJECTED = "rejected"
    SANDBOXED = "sandboxed"
    SUPPRESSED = "suppressed"
    OPENS = "opens"
    CLICKS = "clicks"
    UNSUBSCRIBES = "unsubscribes"
    COMPLAINTS = "complaints"  # spam reports (RFC 5965) that came back to a bounce domain


TRACKED = (Event.OPENS, Event.CLICKS, Event.UNSUBSCRIBES)


@dataclass(frozen=True)
class Tracked:
    """One open, click or unsubscribe of one recipient's copy of one message."""

    time: float
    account: str
    user: str
    queue_id: str
    recipient: str
    event: Event
    url: str | None = None


@dataclass(frozen=True)
class Period:
    start: float  # unix time of the period's start (UTC)
    account: str
    user: str
    counts: dict[str, int] = field(default_factory=dict)


Key = tuple[str, str, int, str]  # account, user, hour number, event


class StatsStore(SqliteStore):
    # Schema versions (db.py); 1: the schema from before files carried a version.
    MIGRATIONS = {1: """
    CREATE TABLE IF NOT EXISTS counters (
        account TEXT NOT NULL,
        user TEXT NOT NULL,
        hour INTEGER NOT NULL,
        event TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (account, user, hour, event)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS tracked (
        time REAL NOT NULL,
        account TEXT NOT NULL,
        user TEXT NOT NULL,
        queue_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT
    );
    CREATE INDEX IF NOT EXISTS tracked_by_message ON tracked (account, queue_id);
    """}

    def add(self, counts: dict[Key, int], tracked: list[Tracked] = ()) -> None:
        """Add counters and tracking rows in one transaction."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO counters VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                " (account, user, hour, event) DO UPDATE SET n = n + excluded.n",
                [(*key, n) for key, n in counts.items()],
            )
            db.executemany(
                "INSERT INTO tracked VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (t.time, t.account, t.user, t.queue_id, t.recipient, t.event.value, t.url)
                    for t in tracked
                ],
            )

    def query(
        self,
        account: str | None = None,
        user: str | None = None,
        since: float | None = None,
        period: str | None = None,
    ) -> dict[str, int] | list[Period]:
        """Totals per event (``period`` None: every event present, 0 when none), or rows
        per ``"hour"`` or ``"day"`` and account and user, oldest first."""
        where, params = where_clause(account, user, since)
        if period is None:
            rows = self.fetch(f"SELECT event, SUM(n) FROM counters {where} GROUP BY event", params)
            return totals_of(rows)
        size = {"hour": 1, "day": 24}[period]
        rows = self.fetch(
            f"SELECT hour / {size} AS p, account, user, event, SUM(n) FROM counters {where}"
            " GROUP BY p, account, user, event ORDER BY p, account, user",
            params,
        )
        return periods_of(rows, size)

    def retire_user(self, user: str, label: str) -> int:
        """Move the counters and tracking rows of the user named ``user`` (in any account)
        to ``label``, which no user can be named (see manage.users.retired_name): the
        history stays in the account's totals, and a new user of that name starts from
        nothing. Returns how many counter rows moved."""
        return self._retire("user", user, label)

    def retire_account(self, account: str, label: str) -> int:
        """Move every counter and tracking row of ``account`` to ``label``, a name no
        account can have (the account is deleted): a new account of that name starts from
        nothing. Returns how many counter rows moved."""
        return self._retire("account", account, label)

    def _retire(self, column: str, name: str, label: str) -> int:
        assert column in ("account", "user")  # a column name, never data
        keep = "account, ?" if column == "user" else "?, user"
        with self.transaction() as db:
            moved = db.execute(
                f"INSERT INTO counters SELECT {keep}, hour, event, n FROM counters"
                f" WHERE {column} = ? ON CONFLICT (account, user, hour, event)"
                " DO UPDATE SET n = n + excluded.n",
                (label, name),
            ).rowcount
            db.execute(f"DELETE FROM counters WHERE {column} = ?", (name,))
            db.execute(f"UPDATE tracked SET {column} = ? WHERE {column} = ?", (label, name))
            return moved

    def tracked(
        self, account: str, queue_id: str | None = None, since: float | None = None
    ) -> list[Tracked]:
        """Opens, clicks and unsubscribes of ``account``'s messages, oldest first."""
        sql = "SELECT * FROM tracked WHERE account = ?"
        params: list = [account]
        if queue_id is not None:
            sql += " AND queue_id = ?"
            params.append(queue_id)
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        rows = self.fetch(sql + " ORDER BY time", params)
        return [Tracked(t, a, u, q, r, Event(e), url) for t, a, u, q, r, e, url in rows]


def totals_of(rows) -> dict[str, int]:
    """(event, sum) rows: every event, 0 when none."""
    totals = {e.value: 0 for e in Event}
    totals.update({e: int(n) for e, n in rows})
    return totals


def periods_of(rows, size: int) -> list[Period]:
    """(period number, account, user, event, sum) rows, ordered: one Period each."""
    out: dict[tuple[int, str, str], Period] = {}
    for p, acc, usr, event, n in rows:
        row = out.setdefault((p, acc, usr), Period(p * size * HOUR, acc, usr, {}))
        row.counts[event] = int(n)
    return list(out.values())


def where_clause(account, user, since, mark: str = "?", user_column: str = "user"
           ) -> tuple[str, list]:  # fmt: skip
    """The WHERE clause of a query (``mark``: the driver's placeholder)."""
    clauses, params = [], []
    for column, value in (("account", account), (user_column, user)):
        if value is not None:
            clauses.append(f"{column} = {mark}")
            params.append(value)
    if since is not None:
        clauses.append(f"hour >= {mark}")
        params.append(int(since // HOUR))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


class StatsRecorder(BatchWriter):
    """Counts in memory, written to ``store`` in a thread every ``interval`` seconds or
    when ``max_pending`` records are waiting. ``clock`` drives the timer (a task.Clock in
    tests); ``reactor`` runs the thread pool."""

    what = "statistics"

    def __init__(
        self,
        store: StatsStore,
        reactor,
        clock=None,
        interval: float = 1.0,
        max_pending: int = 1000,
        threadpool=None,
    ) -> None:
        super().__init__(reactor, clock, interval, threadpool)
        self.store = store
        self.max_pending = max_pending
        self._counts: Counter[Key] = Counter()
        self._tracked: list[Tracked] = []
        self._pending = 0

    def record(
        self, event: Event, account: str, user: str, n: int = 1, when: float | None = None
    ) -> None:
        when = self._clock.seconds() if when is None else when
        self._counts[(account, user, int(when // HOUR), Event(event).value)] += n
        self._added()

    def track(
        self,
        event: Event,
        account: str,
        user: str,
        queue_id: str,
        recipient: str,
        url: str | None = None,
        when: float | None = None,
    ) -> None:
        """An open, click or unsubscribe: counted, and kept per message and recipient."""
        when = self._clock.seconds() if when is None else when
        self._tracked.append(Tracked(when, account, user, queue_id, recipient, event, url))
        self.record(event, account, user, 1, when)

    def _added(self) -> None:
        self._pending += 1
        if self._pending >= self.max_pending and self._writing is None:
            self.flush()

    def _take(self):
        if not self._counts and not self._tracked:
            return None
        batch = (self._counts, self._tracked)
        self._counts, self._tracked, self._pending = Counter(), [], 0
        return batch

    def _write(self, batch) -> None:
        self.store.add(*batch)

    def _put_back(self, batch) -> None:
        counts, tracked = batch
        self._counts.update(counts)
        self._tracked[:0] = tracked
