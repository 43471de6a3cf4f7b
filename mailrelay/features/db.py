"""A small SQLite file shared by the daemon's threads and by mailrelay-admin.

One connection per store, used by any thread behind a lock; WAL mode and a busy timeout
let the admin command read and write while the daemon runs. Methods block: the daemon
calls them from a thread pool (or batches them, see stats.py).

Each file carries the version of its schema (``PRAGMA user_version``). A store lists its
schema as migrations, version -> the SQL (or a function of the connection) that brings a
file at the version before to it; opening a file applies the ones it lacks, all in one
transaction, so a file is at one version or the next, never in between. Version 1 is the
schema as it was before files carried a version, written with ``IF NOT EXISTS``: such a
file (``user_version`` 0) becomes version 1 as it is, rows and all. A file from a newer
mailrelay (a version this code has no migration to) is refused, never changed. A change
of schema is a new migration at the end of the table; a released one is never edited.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import quote

Migration = str | Callable[[sqlite3.Connection], None]


class NewerSchema(sqlite3.DatabaseError):
    """A file written by a newer mailrelay: its schema version is past this code's."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"schema version {found} is from a newer mailrelay (this one knows "
                         f"versions up to {known})")


def statements(script: str) -> list[str]:
    """The SQL statements of ``script``, one by one (``executescript`` would commit the
    transaction they must run in)."""
    out, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\r\n;"):
                out.append(current.strip())
            current = ""
    if current.strip(" \t\r\n;"):
        out.append(current.strip())
    return out


class SqliteStore:
    MIGRATIONS: Mapping[int, Migration] = {}  # version -> what brings the file to it

    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(
            path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        try:
            with self._lock:
                self._refuse_newer(self._db)  # before anything is written to it
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint
                self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def version(cls) -> int:
        """The schema version this code writes and reads."""
        if sorted(cls.MIGRATIONS) != list(range(1, len(cls.MIGRATIONS) + 1)):
            raise AssertionError(f"{cls.__name__}.MIGRATIONS must be numbered 1, 2, ...")
        return len(cls.MIGRATIONS)

    @classmethod
    def _refuse_newer(cls, db: sqlite3.Connection) -> int:
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > cls.version():
            raise NewerSchema(found, cls.version())
        return found

    @classmethod
    def check_file(cls, path: str) -> None:
        """What opening ``path`` would refuse, found without changing it (read-only):
        not a database SQLite can read, or a newer schema (NewerSchema)."""
        db = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchall()
            cls._refuse_newer(db)
        finally:
            db.close()

    def _migrate(self) -> None:
        """With the lock held: the migrations the file lacks, in one transaction."""
        target = self.version()
        if self._refuse_newer(self._db) == target:
            return
        with self._transaction() as db:
            found = self._refuse_newer(db)  # another process may have migrated it meanwhile
            for version in range(found + 1, target + 1):
                step = self.MIGRATIONS[version]
                if callable(step):
                    step(db)
                else:
                    for statement in statements(step):
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {target:d}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._transaction() as db:
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def fetch(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
