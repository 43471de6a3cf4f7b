"""The PostgreSQL foundation against a real server: migrations once and in order, a newer
schema refused, nodes migrating at once, notifications across connections, and the
listener telling its caches to reload after the database was away."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import pg_server
import psycopg
import pytest
from psycopg_pool import PoolTimeout
from twisted.internet import reactor as global_reactor
from twisted.trial import unittest

from mailrelay.postgres.db import Database, Listener, NewerSchema, notify

V1 = "CREATE TABLE things (name TEXT PRIMARY KEY)"
V2 = "ALTER TABLE things ADD COLUMN size INTEGER NOT NULL DEFAULT 0"


class MigrationTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dsn = pg_server.shared_server().create_database()
        self.db = Database(self.dsn)
        self.db.open()
        self.addCleanup(self.db.close)

    def columns(self) -> list[str]:
        with self.db.transaction() as conn:
            return [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = "
                "'things' ORDER BY ordinal_position")]  # fmt: skip

    def test_applies_missing_versions_once_and_keeps_rows(self) -> None:
        self.assertEqual(self.db.migrate("things", {1: V1}), 1)
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO things (name) VALUES ('kept')")
        self.assertEqual(self.db.migrate("things", {1: V1, 2: V2}), 2)
        self.assertEqual(self.db.migrate("things", {1: V1, 2: V2}), 2)  # again: nothing
        self.assertEqual(self.columns(), ["name", "size"])
        with self.db.transaction() as conn:
            self.assertEqual(conn.execute("SELECT name, size FROM things").fetchall(),
                             [("kept", 0)])

    def test_a_newer_schema_is_refused_and_left_as_it_is(self) -> None:
        self.db.migrate("things", {1: V1, 2: V2})
        with self.assertRaises(NewerSchema) as caught:
            self.db.migrate("things", {1: V1})
        self.assertIn("newer mailrelay", str(caught.exception))
        self.assertEqual(self.columns(), ["name", "size"])

    def test_a_failing_migration_changes_nothing(self) -> None:
        self.db.migrate("things", {1: V1})
        with self.assertRaises(psycopg.Error):
            self.db.migrate("things", {1: V1, 2: V2, 3: "ALTER TABLE nowhere ADD x INT"})
        self.assertEqual(self.columns(), ["name"])  # version 2 rolled back with 3

    def test_nodes_starting_together_migrate_once(self) -> None:
        errors: list[Exception] = []

        def node() -> None:
            db = Database(self.dsn)
            db.open()
            try:
                db.migrate("things", {1: V1, 2: V2})
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                db.close()

        nodes = [threading.Thread(target=node) for _ in range(4)]
        for t in nodes:
            t.start()
        for t in nodes:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(self.columns(), ["name", "size"])

    def test_an_unreachable_database_is_reported_within_the_wait(self) -> None:
        with TemporaryDirectory() as tmp:
            server = pg_server.PostgresServer(Path(tmp))  # never started: nothing listens
            db = Database(server.dsn(), timeout=1)
            with self.assertRaises(PoolTimeout):
                db.open(wait=1)
            db.close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class ListenerTests(unittest.TestCase):
    """Runs the listener's thread against the real reactor's callFromThread, spun here."""

    def received_until(self, got: list, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(got) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {n} notifications: {got}")
            global_reactor.runUntilCurrent()
            time.sleep(0.01)

    def test_a_committed_change_is_received_and_a_rolled_back_one_is_not(self) -> None:
        db = Database(pg_server.shared_server().create_database())
        db.open()
        self.addCleanup(db.close)
        got: list = []
        listener = Listener(db, ["users"], lambda c, p: got.append((c, p)), global_reactor)
        listener.startService()
        self.addCleanup(listener._stop.set)
        wait_for(listener.listening.is_set)
        with pytest.raises(RuntimeError), db.transaction() as conn:
            notify(conn, "users", "rolled-back")
            raise RuntimeError("abort")
        with db.transaction() as conn:
            notify(conn, "users", "alice@example.com")
        self.received_until(got, 1)
        self.assertEqual(got, [("users", "alice@example.com")])

    def test_after_the_database_was_away_the_listener_says_reload(self) -> None:
        server = pg_server.PostgresServer()  # a directory of its own, for its user
        server.start()
        self.addCleanup(server.stop)
        db = Database(server.dsn())
        got: list = []
        listener = Listener(db, ["users"], lambda c, p: got.append((c, p)),
                            global_reactor, retry=0.2)
        listener.startService()
        self.addCleanup(listener._stop.set)
        wait_for(listener.listening.is_set)
        server.halt()  # the database goes away (fast shutdown)...
        wait_for(lambda: not listener.listening.is_set())
        server.start_again()  # ...and comes back on the same port
        self.received_until(got, 1, timeout=20)
        self.assertEqual(got, [("users", None)])


class RestartTests(unittest.TestCase):
    def test_the_first_call_after_the_database_restarted_is_served(self) -> None:
        server, db = pg_server.private(self, timeout=5)
        with db.transaction() as conn:  # the pool's connection, now idle
            self.assertEqual(conn.execute("SELECT 1").fetchone(), (1,))
        server.halt()
        server.start_again()
        with db.transaction() as conn:  # not the dead connection: a new one
            self.assertEqual(conn.execute("SELECT 2").fetchone(), (2,))


def test_every_store_is_known_to_the_startup_check():
    """A store missing from STORE_MODULES would escape the newer-schema check at startup."""
    import re

    from mailrelay.postgres import STORE_MODULES

    root = Path(__file__).resolve().parent.parent
    defining = {
        ".".join(path.relative_to(root).with_suffix("").parts)
        for path in (root / "mailrelay").rglob("*.py")
        if re.search(r'^\s+COMPONENT = "\w+"', path.read_text(), re.M)
    }
    assert defining == set(STORE_MODULES)
