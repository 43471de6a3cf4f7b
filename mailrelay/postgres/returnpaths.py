"""The bounce domains' return-path records in PostgreSQL (``[cluster] postgres``): what
each node sends with a VERP sender is recorded where every node's bounce listener finds
it, so a bounce is applied whichever node it reaches (the SQLite store: bounces/store.py).
"""

from __future__ import annotations

import time

from psycopg.types.json import Jsonb

from mailrelay.bounces.store import ReturnPath
from mailrelay.bounces.verp import Token
from mailrelay.model import Envelope
from mailrelay.postgres.db import PgStore


class PgReturnPathStore(PgStore):
    COMPONENT = "return_paths"
    MIGRATIONS = {1: """
    CREATE TABLE return_paths (
        queue_id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        user_name TEXT NOT NULL,
        sender TEXT NOT NULL,
        bounce_to TEXT,
        recipients JSONB NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX return_paths_by_time ON return_paths (created);
    """}

    def record(self, envelope: Envelope, when: float | None = None) -> None:
        """The message's return paths are in use (kept as first recorded)."""
        self.record_many([(envelope, when)])

    def record_many(self, calls: list[tuple[Envelope, float | None]]) -> list[None]:
        """``record`` for several messages in one transaction."""
        with self.db.transaction() as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO return_paths VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                [(e.id, e.account, e.user, e.sender, e.bounce_to, Jsonb(list(e.recipients)),
                  when or time.time()) for e, when in calls])  # fmt: skip
        return [None] * len(calls)

    def resolve(self, token: Token) -> ReturnPath | None:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT account, user_name, sender, bounce_to, "
                               "recipients -> %s, created FROM return_paths WHERE "
                               "queue_id = %s", (token.index, token.queue_id)).fetchone()
        if row is None or row[4] is None:
            return None
        account, user, sender, bounce_to, recipient, created = row
        return ReturnPath(token.domain, token.queue_id, account, user, sender, bounce_to,
                          recipient, created)

    def prune(self, before: float) -> int:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM return_paths WHERE created < %s",
                                (before,)).rowcount

    def close(self) -> None:
        pass  # the pool is the process's (postgres.db.database)
