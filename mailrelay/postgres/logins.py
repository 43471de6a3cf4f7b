"""The last login of each user in PostgreSQL, with ``[cluster] postgres``: written by every
node's LoginRecorder in batches (auth/lifecycle.py), so ``user list``, the API and the
panel show a user's last login whichever node it logged in to. The same methods as the
SQLite LoginStore; a batch keeps each user's latest login, an older one never overwrites
a newer one from another node.

``claim`` elects one node for a periodic job (the dormant-user check): the node whose
UPDATE moves the job's next time forward runs it, the others skip that round.
"""

from __future__ import annotations

from mailrelay.postgres.db import PgStore


class PgLoginStore(PgStore):
    COMPONENT = "logins"
    MIGRATIONS = {1: """
    CREATE TABLE mailrelay_last_login (
        username TEXT PRIMARY KEY,
        time DOUBLE PRECISION NOT NULL,
        ip TEXT NOT NULL
    );
    CREATE TABLE mailrelay_jobs (
        name TEXT PRIMARY KEY,
        next DOUBLE PRECISION NOT NULL
    );
    """}

    def add(self, logins: dict[str, tuple[float, str]]) -> None:
        with self.db.transaction() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO mailrelay_last_login (username, time, ip) VALUES (%s, %s, %s) "
                "ON CONFLICT (username) DO UPDATE SET time = EXCLUDED.time, ip = EXCLUDED.ip "
                "WHERE EXCLUDED.time > mailrelay_last_login.time",
                # In one order, so two nodes' batches never wait on each other's rows.
                [(name, when, ip) for name, (when, ip) in sorted(logins.items())])

    def all(self) -> dict[str, tuple[float, str]]:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT username, time, ip FROM mailrelay_last_login")
            return {name: (when, ip) for name, when, ip in rows}

    def get(self, username: str) -> tuple[float, str] | None:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT time, ip FROM mailrelay_last_login WHERE username = %s",
                               (username,)).fetchone()
            return (row[0], row[1]) if row else None

    def close(self) -> None:
        """The pool is the process's (postgres.db.database), closed with it."""

    def claim(self, job: str, now: float, interval: float) -> bool:
        """True for the one node that runs ``job`` now; its next turn is ``interval`` on.
        A little early still counts (timers drift), so a node runs it at most once a round."""
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO mailrelay_jobs (name, next) VALUES (%s, 0) "
                         "ON CONFLICT (name) DO NOTHING", (job,))
            row = conn.execute("UPDATE mailrelay_jobs SET next = %s WHERE name = %s AND "
                               "next <= %s RETURNING name",
                               (now + interval, job, now + interval / 10)).fetchone()
            return row is not None
