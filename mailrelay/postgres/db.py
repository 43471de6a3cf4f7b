"""One PostgreSQL database shared by the nodes (psycopg 3, blocking: called in threads).

``Database`` holds a small pool of connections; each ``transaction()`` takes one for the
calling thread and commits when the block ends (rolls back on an exception). The daemon
runs these calls in the reactor's thread pool (manage.stores.threaded), mailrelay-admin
in its own thread (at_once), as with the SQLite stores.

Schemas: each store names its component and lists its migrations, version -> SQL, as the
SQLite stores do (features/db.py); ``migrate`` applies the missing ones in one transaction
under an advisory lock, so nodes starting together migrate once, and a database written by
a newer mailrelay is refused, never changed. Versions per component are kept in
``mailrelay_schema``.

Notifications: a change made on one node is announced with ``notify`` inside its
transaction (PostgreSQL sends it at commit, never for a rolled-back change); each node's
``Listener`` receives it within milliseconds and drops what it cached. After the listener
lost its connection it reports ``None`` (anything may have changed meanwhile) once it is
back, so caches reload instead of missing a change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.application.service import Service
from twisted.internet import threads
from twisted.logger import Logger

log = Logger()
# The pool's own warnings (each failed reconnection) go to the standard library's logging,
# which would print them to mailrelay-admin's stderr before its one-line error; what the
# relay must know of an unreachable database it says itself.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
logging.getLogger("psycopg.pool").propagate = False

# Errors that say the database cannot be reached now (the caller answers 4xx or retries),
# as opposed to a bug in a query.
UNAVAILABLE = (psycopg.OperationalError, PoolTimeout)

_SCHEMA_LOCK = 0x6D61696C72656C  # pg_advisory_xact_lock key of the migrations ("mailrel")


class Unreachable(psycopg.OperationalError):
    """The database did not take a connection: libpq's reason, on one line."""

    def __init__(self, error: Exception) -> None:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        super().__init__("cannot connect: " + ("; ".join(lines) or type(error).__name__))


class NewerSchema(psycopg.DatabaseError):
    """A database written by a newer mailrelay: a component's version is past this code's."""

    def __init__(self, component: str, found: int, known: int) -> None:
        super().__init__(f"{component}: schema version {found} is from a newer mailrelay "
                         f"(this one knows versions up to {known})")


def connect_kwargs(password: str = "", application_name: str = "mailrelay") -> dict:
    kwargs: dict = {"application_name": application_name, "connect_timeout": 5}
    if password:  # else libpq's own sources: the DSN, PGPASSWORD, ~/.pgpass
        kwargs["password"] = password
    return kwargs


class Database:
    """``dsn``: a libpq connection string or URI (``postgresql://user@host/db``; TLS with
    ``sslmode=verify-full``); ``size``: connections at most (threads using it at once)."""

    def __init__(self, dsn: str, password: str = "", size: int = 4,
                 timeout: float = 5.0) -> None:  # fmt: skip
        self.dsn = dsn
        self.password = password
        # check: a connection is tried (an empty query) before it is lent, so the first
        # call after the database restarted gets a new connection instead of an error.
        self.pool = ConnectionPool(dsn, min_size=1, max_size=max(1, size), open=False,
                                   timeout=timeout, kwargs=connect_kwargs(password),
                                   check=ConnectionPool.check_connection,
                                   name="mailrelay")  # fmt: skip

    def open(self, wait: float = 10.0) -> None:
        """Connect; raises PoolTimeout (with the last connection error) if the database
        cannot be reached within ``wait`` seconds."""
        self.pool.open(wait=True, timeout=wait)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn

    def migrate(self, component: str, migrations: Mapping[int, str]) -> int:
        """Bring ``component``'s tables to the last of ``migrations``; its version."""
        known = max(migrations, default=0)
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS mailrelay_schema ("
                         " component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM mailrelay_schema WHERE component = %s",
                               (component,)).fetchone()
            found = row[0] if row else 0
            if found > known:
                raise NewerSchema(component, found, known)
            for version in sorted(v for v in migrations if v > found):
                conn.execute(migrations[version])
            if known > found:
                conn.execute("INSERT INTO mailrelay_schema (component, version) VALUES "
                             "(%s, %s) ON CONFLICT (component) DO UPDATE SET version = "
                             "EXCLUDED.version", (component, known))
                log.info("PostgreSQL: {component} schema {found} -> {known}",
                         component=component, found=found, known=known)
        return known


def notify(conn: psycopg.Connection, channel: str, payload: str = "") -> None:
    """Announce a change to every node's Listener when ``conn``'s transaction commits."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


Received = Callable[[str, str | None], None]  # (channel, payload; None: maybe missed some)


class Listener(Service):
    """LISTENs on ``channels`` over a connection of its own, in a thread of its own (a
    LISTEN connection waits for the server, it cannot share the pool), and calls
    ``received(channel, payload)`` in the reactor thread. Reconnects every ``retry``
    seconds while the database is away, then reports ``(channel, None)`` for each channel."""

    def __init__(self, db: Database, channels: list[str], received: Received, reactor,
                 retry: float = 1.0) -> None:  # fmt: skip
        self.db = db
        self.channels = list(channels)
        self.received = received
        self.reactor = reactor
        self.retry = retry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # set while LISTENing (the tests wait on it)

    def startService(self) -> None:
        super().startService()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mailrelay-pg-listen",
                                        daemon=True)
        self._thread.start()

    def stopService(self):
        super().stopService()
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                             thread.join, 5)
        return None

    def _run(self) -> None:
        lost = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.db.dsn, autocommit=True,
                                     **connect_kwargs(self.db.password)) as conn:
                    for channel in self.channels:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.listening.set()
                    if lost:
                        log.info("PostgreSQL notifications are back")
                        for channel in self.channels:
                            self.reactor.callFromThread(self.received, channel, None)
                        lost = False
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self.reactor.callFromThread(self.received, n.channel, n.payload)
            except psycopg.Error as e:
                self.listening.clear()
                if not lost:
                    log.warn("PostgreSQL notifications lost ({error}); reconnecting every "
                             "{retry}s", error=str(e).strip(), retry=self.retry)
                lost = True
                self._stop.wait(self.retry)
        self.listening.clear()


KNOWN: dict[str, int] = {}  # component -> the last schema version this code knows


class PgStore:
    """A store kept in PostgreSQL: ``COMPONENT`` names its tables' schema and
    ``MIGRATIONS`` lists it (version -> SQL), applied when the store is made. Its methods
    block, like the SQLite stores' (features/db.py): call them through a thread."""

    COMPONENT = ""
    MIGRATIONS: Mapping[int, str] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.COMPONENT:
            KNOWN[cls.COMPONENT] = max(cls.MIGRATIONS, default=0)

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(self.COMPONENT, self.MIGRATIONS)


def newer_schemas(db: Database) -> list[str]:
    """What in the database a newer mailrelay wrote (``KNOWN`` holds the versions of the
    stores imported), read without changing anything: for ``mailrelay-admin check``."""
    with db.transaction() as conn:
        if conn.execute("SELECT to_regclass('mailrelay_schema')").fetchone()[0] is None:
            return []
        rows = conn.execute("SELECT component, version FROM mailrelay_schema").fetchall()
    return [str(NewerSchema(c, v, KNOWN[c])) for c, v in rows if c in KNOWN and v > KNOWN[c]]


_pools: dict[tuple[str, str], Database] = {}
_pools_lock = threading.Lock()


def database(dsn: str, password: str = "", size: int = 4, wait: float = 10.0) -> Database:
    """This process's pool for ``dsn``, opened at first use: the stores of one process
    share it, so ``[cluster] postgres_connections`` bounds them all. Raises Unreachable
    (libpq's reason) or PoolTimeout if the database cannot be reached within ``wait``."""
    with _pools_lock:
        db = _pools.get((dsn, password))
        if db is None:
            try:  # one connection first: the pool's own error would not say why
                psycopg.connect(dsn, **connect_kwargs(password)).close()
            except psycopg.Error as e:
                raise Unreachable(e) from None
            db = Database(dsn, password, size)
            db.open(wait)
            _pools[(dsn, password)] = db
        return db


def of_config(config) -> Database | None:
    """The pool of ``[cluster] postgres``, or None when the stores are local files."""
    c = config.cluster
    if c is None or not c.postgres:
        return None
    return database(c.postgres, c.postgres_password, c.postgres_connections)
