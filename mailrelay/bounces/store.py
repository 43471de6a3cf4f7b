"""The return-path store: what each VERP token points to (SQLite, ``[bounces] db``).

Delivery records a message of an account with a bounce domain once, before its first
VERP transaction leaves: queue id, account, user, the client's envelope sender, where the
user's bounces go (``bounce_to`` as accepted), the recipients. The bounce listener looks
the queue id of a token up there when a report arrives, so a report is charged to the
sender of the message it is about, long after the message left the queue. Rows older
than ``[bounces] retention`` (30 days) are removed at startup and daily: a report about
older mail is taken, logged and dropped.

``ReturnPaths`` is delivery's side: the VERP sender of each recipient (verp.py) and the
record, written in the thread pool (one INSERT per attempt, for such messages only; in
PostgreSQL, the messages of a burst in one transaction).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from mailrelay.bounces.verp import Token, Verp
from mailrelay.features.batch import Coalescing
from mailrelay.features.db import SqliteStore
from mailrelay.model import Envelope

log = Logger()

DAY = 86400.0


@dataclass(frozen=True)
class ReturnPath:
    """The message and recipient a VERP address was the envelope sender of."""

    domain: str
    queue_id: str
    account: str
    user: str
    sender: str  # the client's envelope sender
    bounce_to: str | None  # the envelope's: None to the sender, "" nowhere, or an address
    recipient: str
    sent: float  # unix time it was recorded


class ReturnPathStore(SqliteStore):
    # Schema versions (features/db.py).
    MIGRATIONS = {1: """
    CREATE TABLE sent (
        queue_id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        user TEXT NOT NULL,
        sender TEXT NOT NULL,
        bounce_to TEXT,
        recipients TEXT NOT NULL,
        created REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sent_by_time ON sent (created);
    """}

    def record(self, envelope: Envelope, when: float | None = None) -> None:
        """The message's return paths are in use (kept as first recorded)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (envelope.id, envelope.account, envelope.user, envelope.sender,
                        envelope.bounce_to, json.dumps(envelope.recipients),
                        when or time.time()))

    def resolve(self, token: Token) -> ReturnPath | None:
        rows = self.fetch("SELECT account, user, sender, bounce_to, recipients, created "
                          "FROM sent WHERE queue_id = ?", (token.queue_id,))
        if not rows:
            return None
        account, user, sender, bounce_to, recipients, created = rows[0]
        recipients = json.loads(recipients)
        if token.index >= len(recipients):
            return None
        return ReturnPath(token.domain, token.queue_id, account, user, sender, bounce_to,
                          recipients[token.index], created)

    def prune(self, before: float) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM sent WHERE created < ?", (before,)).rowcount


class ReturnPaths:
    """Delivery's side: VERP senders, and the record that makes their bounces count."""

    def __init__(self, verp: Verp, store: ReturnPathStore, reactor) -> None:
        self.verp = verp
        self.store = store
        self.reactor = reactor
        # A store that can (PostgreSQL: a transaction costs a round trip and a commit)
        # records the messages of a burst together.
        self._many = (Coalescing(store.record_many, self._thread, many=True)
                      if hasattr(store, "record_many") else None)

    def _thread(self, f, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def address(self, envelope: Envelope, recipient: str) -> str | None:
        return self.verp.address(envelope, recipient)

    def record(self, envelope: Envelope) -> defer.Deferred:
        if self._many is not None:
            return self._many(envelope, self.reactor.seconds())
        return self._thread(self.store.record, envelope, self.reactor.seconds())


class Pruner(Service):
    """Removes records older than ``retention`` at start and then daily, in a thread."""

    def __init__(self, store: ReturnPathStore, retention: float, reactor) -> None:
        self.store = store
        self.retention = retention
        self.reactor = reactor
        self._loop = task.LoopingCall(self.prune)
        self._loop.clock = reactor

    def prune(self) -> defer.Deferred:
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self.store.prune, self.reactor.seconds() - self.retention)
        d.addCallback(lambda n: n and log.info("bounces: {n} return-path records older than "
                                               "{days:g} days removed", n=n,
                                               days=self.retention / DAY))
        return d.addErrback(lambda f: log.failure("bounces: pruning the records failed", f))

    def startService(self) -> None:
        super().startService()
        self._loop.start(DAY, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
