"""The statistics in PostgreSQL (``[cluster] postgres``), counted per node and written in
batches with an id, and the journal that keeps a node's unwritten batches across a crash.

Each process of each node (the relay counts what it accepts and the tracking clicks, its
delivery process what it delivers) keeps its own counters in memory and writes them every
``[features] stats_flush_interval`` as one batch: one transaction that records the
batch's id in ``stats_batches`` and adds the counts to that node's rows. A batch whose id
is already there is skipped, so a write retried after an unknown outcome (a lost
connection at commit, a kill during the flush) never counts twice. Reading sums the
nodes' rows: the same totals and periods as the SQLite store (features/stats.py).

The journal (``StatsJournal``): every count is appended to a file of the open batch under
``<data_dir>/stats-journal/<process>/`` as it is counted, before the counters in memory
change; a batch's file is removed once its transaction committed. A node killed (kill -9)
at any moment finds its unwritten batches there when it starts again and writes them
with their own ids: each counted once. The appends are not fsynced: the journal survives
the process, not a crash of the machine (that loses what the OS had not written, at most
a few seconds of counts).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from twisted.logger import Logger

from mailrelay.features.stats import (
    DAY,
    HOUR,
    Event,
    Key,
    Period,
    StatsRecorder,
    Tracked,
    periods_of,
    totals_of,
    where_clause,
)
from mailrelay.postgres.db import PgStore

log = Logger()

# How long a batch id is remembered; a journal older than that is not written (it could
# count twice) but kept for a person to look at.
BATCH_MEMORY = 30 * DAY


class PgStatsStore(PgStore):
    COMPONENT = "stats"
    MIGRATIONS = {1: """
    CREATE TABLE stats_counters (
        account TEXT NOT NULL,
        user_name TEXT NOT NULL,
        hour INTEGER NOT NULL,
        event TEXT NOT NULL,
        node TEXT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (account, user_name, hour, event, node)
    );
    CREATE INDEX stats_counters_by_user ON stats_counters (user_name);
    CREATE INDEX stats_counters_by_hour ON stats_counters (hour);
    CREATE TABLE stats_tracked (
        time DOUBLE PRECISION NOT NULL,
        account TEXT NOT NULL,
        user_name TEXT NOT NULL,
        queue_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT
    );
    CREATE INDEX stats_tracked_by_message ON stats_tracked (account, queue_id);
    CREATE TABLE stats_batches (
        node TEXT NOT NULL,
        batch TEXT NOT NULL,
        applied DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (node, batch)
    );
    CREATE INDEX stats_batches_by_time ON stats_batches (applied);
    """}

    def __init__(self, db, clock=time.time) -> None:
        super().__init__(db)
        self._clock = clock
        self._pruned = 0.0

    def add(self, counts: dict[Key, int], tracked: list[Tracked] = (), node: str = "",
            batch: str | None = None) -> bool:
        """Add counters and tracking rows of ``node`` in one transaction; with a ``batch``
        id, only if that batch was not added before. Whether it was added now."""
        now = self._clock()
        with self.db.transaction() as conn:
            if batch is not None:
                if not conn.execute("INSERT INTO stats_batches VALUES (%s, %s, %s) "
                                    "ON CONFLICT DO NOTHING", (node, batch, now)).rowcount:
                    return False
                if now - self._pruned > HOUR:
                    conn.execute("DELETE FROM stats_batches WHERE node = %s AND applied < %s",
                                 (node, now - BATCH_MEMORY))
                    self._pruned = now
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO stats_counters VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT"
                    " (account, user_name, hour, event, node) DO UPDATE"
                    " SET n = stats_counters.n + EXCLUDED.n",
                    [(*key, node, n) for key, n in sorted(counts.items())])
                cursor.executemany(
                    "INSERT INTO stats_tracked VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [(t.time, t.account, t.user, t.queue_id, t.recipient, t.event.value, t.url)
                     for t in tracked])  # fmt: skip
        return True

    def query(self, account: str | None = None, user: str | None = None,
              since: float | None = None, period: str | None = None
              ) -> dict[str, int] | list[Period]:  # fmt: skip
        """As StatsStore.query, summed over the nodes."""
        where, params = where_clause(account, user, since, "%s", "user_name")
        with self.db.transaction() as conn:
            if period is None:
                return totals_of(conn.execute("SELECT event, SUM(n) FROM stats_counters "
                                              f"{where} GROUP BY event", params))
            size = {"hour": 1, "day": 24}[period]
            rows = conn.execute(
                f"SELECT hour / {size} AS p, account, user_name, event, SUM(n) FROM "
                f"stats_counters {where} GROUP BY p, account, user_name, event "
                'ORDER BY p, account COLLATE "C", user_name COLLATE "C"', params).fetchall()
        return periods_of(rows, size)

    def retire_user(self, user: str, label: str) -> int:
        return self._retire("user_name", user, label)

    def retire_account(self, account: str, label: str) -> int:
        return self._retire("account", account, label)

    def _retire(self, column: str, name: str, label: str) -> int:
        assert column in ("account", "user_name")  # a column name, never data
        keep = "account, %s" if column == "user_name" else "%s, user_name"
        with self.db.transaction() as conn:
            moved = conn.execute(
                f"INSERT INTO stats_counters SELECT {keep}, hour, event, node, n FROM "
                f"stats_counters WHERE {column} = %s ON CONFLICT (account, user_name, hour,"
                " event, node) DO UPDATE SET n = stats_counters.n + EXCLUDED.n",
                (label, name)).rowcount
            conn.execute(f"DELETE FROM stats_counters WHERE {column} = %s", (name,))
            conn.execute(f"UPDATE stats_tracked SET {column} = %s WHERE {column} = %s",
                         (label, name))
            return moved

    def tracked(self, account: str, queue_id: str | None = None,
                since: float | None = None) -> list[Tracked]:  # fmt: skip
        sql = ("SELECT time, account, user_name, queue_id, recipient, event, url "
               "FROM stats_tracked WHERE account = %s")
        params: list = [account]
        if queue_id is not None:
            sql += " AND queue_id = %s"
            params.append(queue_id)
        if since is not None:
            sql += " AND time >= %s"
            params.append(since)
        with self.db.transaction() as conn:
            rows = conn.execute(sql + " ORDER BY time", params).fetchall()
        return [Tracked(t, a, u, q, r, Event(e), url) for t, a, u, q, r, e, url in rows]

    def close(self) -> None:
        pass  # the pool is the process's (postgres.db.database)


@dataclass
class Batch:
    id: str
    counts: Counter = field(default_factory=Counter)
    tracked: list[Tracked] = field(default_factory=list)


class StatsJournal:
    """One file per batch, ``<id>.journal``: a JSON array per line, ``["c", account,
    user, hour, event, n]`` for a count, ``["t", time, account, user, queue_id,
    recipient, event, url]`` for a tracked event. Written in the reactor thread (a
    write(2) of one line, no fsync); removed in the writer's thread once written."""

    SUFFIX = ".journal"

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._fd: int | None = None

    def path(self, batch: str) -> str:
        return os.path.join(self.directory, batch + self.SUFFIX)

    def append(self, batch: str, entry: list) -> None:
        if self._fd is None:
            self._fd = os.open(self.path(batch), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(self._fd, json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def close_batch(self) -> None:
        """The open batch is complete; the next append starts another file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def done(self, batch: str) -> None:
        try:
            os.unlink(self.path(batch))
        except FileNotFoundError:
            pass

    def unsent(self, now: float) -> list[Batch]:
        """The batches left by the last run: counted, perhaps written, not known to be."""
        batches = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(self.SUFFIX):
                continue
            path = os.path.join(self.directory, name)
            if now - os.stat(path).st_mtime > BATCH_MEMORY - DAY:
                log.warn("statistics journal {path} is too old to know whether it was "
                         "written; left as it is, not counted", path=path)
                continue
            batch = Batch(name[: -len(self.SUFFIX)])
            with open(path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # the process died within this write: never counted
                    kind, *fields = json.loads(line)
                    if kind == "c":
                        *key, n = fields
                        batch.counts[tuple(key)] += n
                    elif kind == "t":
                        t, a, u, q, r, e, url = fields
                        batch.tracked.append(Tracked(t, a, u, q, r, Event(e), url))
            batches.append(batch)
        return batches


class JournaledStatsRecorder(StatsRecorder):
    """A StatsRecorder for PgStatsStore: every count goes to the journal first, each
    flush closes the open batch and writes every unsent batch with its id (the batches of
    a failed write are retried with the same ids); the journal's batches from a previous
    run are written first."""

    def __init__(self, store: PgStatsStore, reactor, journal: StatsJournal, node: str,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(store, reactor, **kwargs)
        self.journal = journal
        self.node = node
        self._batch = Batch(uuid.uuid4().hex)
        self._unsent: list[Batch] = []

    def startService(self) -> None:
        unsent = [b for b in self.journal.unsent(self._clock.seconds())
                  if b.id != self._batch.id]  # not what this run counted already
        self._unsent[:0] = unsent
        super().startService()
        if unsent:  # now, not one interval later
            log.info("statistics: {n} batch(es) from the journal to write", n=len(unsent))
            self._clock.callLater(0, self.flush)

    def record(self, event: Event, account: str, user: str, n: int = 1,
               when: float | None = None) -> None:  # fmt: skip
        when = self._clock.seconds() if when is None else when
        key = (account, user, int(when // HOUR), Event(event).value)
        self._journal(["c", *key, n])
        self._batch.counts[key] += n
        self._added()

    def track(self, event: Event, account: str, user: str, queue_id: str, recipient: str,
              url: str | None = None, when: float | None = None) -> None:  # fmt: skip
        when = self._clock.seconds() if when is None else when
        t = Tracked(when, account, user, queue_id, recipient, event, url)
        self._journal(["t", t.time, account, user, queue_id, recipient, t.event.value, url])
        self._batch.tracked.append(t)
        self.record(event, account, user, 1, when)

    def _journal(self, entry: list) -> None:
        try:
            self.journal.append(self._batch.id, entry)
        except OSError:
            log.failure("statistics journal not written: counted in memory only")

    def _take(self):
        if self._batch.counts or self._batch.tracked:
            self.journal.close_batch()
            self._unsent.append(self._batch)
            self._batch, self._pending = Batch(uuid.uuid4().hex), 0
        if not self._unsent:
            return None
        batches, self._unsent = self._unsent, []
        return batches

    def _write(self, batches: list[Batch]) -> None:
        for batch in batches:
            self.store.add(batch.counts, batch.tracked, self.node, batch.id)
            self.journal.done(batch.id)

    def _put_back(self, batches: list[Batch]) -> None:
        self._unsent[:0] = batches
