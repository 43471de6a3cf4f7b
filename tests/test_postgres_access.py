"""Admin logins and API keys in PostgreSQL (postgres/access.py) against a real server: the
access file's cases (test_manage.AccessStoreCases), the panel's view of another node's
change arriving by notification, and fields this code does not know kept as they are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pg_server
from harness import env
from test_manage import AccessStoreCases
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.auth.passwords import hash_password
from mailrelay.manage.access import Access
from mailrelay.manage.stores import at_once
from mailrelay.postgres.access import PgAccessStore, PgAccessView
from mailrelay.postgres.db import Database


def open_db(case: unittest.TestCase, dsn: str) -> Database:
    """A pool of its own, as each node (and each mailrelay-admin) has."""
    db = Database(dsn)
    db.open()
    case.addCleanup(db.close)
    return db


class PgAccessStoreTests(AccessStoreCases, unittest.TestCase):
    """The store mailrelay-admin uses on one node, the panel's view on another."""

    def setUp(self):
        self.dsn = pg_server.shared_server().create_database()
        self.db = open_db(self, self.dsn)
        self.store = PgAccessStore(self.db, at_once)

    def stored(self) -> str:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT name, doc::text FROM admin_logins UNION ALL "
                                "SELECT name || ' ' || hash, doc::text FROM api_keys").fetchall()
        return json.dumps(rows)

    def view(self) -> PgAccessView:
        view = PgAccessView(open_db(self, self.dsn), reactor)
        view.startService()
        self.addCleanup(view.stopService)
        return view

    @defer.inlineCallbacks
    def seen(self, view, test):
        """Within a second of the change: the notification, then a read in a thread."""
        deadline = time.monotonic() + 1.0
        while not test(view.current()):
            self.assertLess(time.monotonic(), deadline, "the change did not reach the view")
            yield task.deferLater(reactor, 0.01, lambda: None)

    def test_a_field_this_relay_does_not_know_is_kept(self):
        """A newer node's field in an entry (e.g. a limit it adds) survives a change this
        node makes to another entry."""
        self.successResultOf(self.store.addKey("old", Access.READ_ONLY))
        with self.db.transaction() as conn:
            conn.execute("UPDATE api_keys SET doc = doc || '{\"later\": \"kept\"}'")
        self.successResultOf(self.store.addKey("new", Access.READ_WRITE))
        self.successResultOf(self.store.deleteKey("new"))
        with self.db.transaction() as conn:
            doc = conn.execute("SELECT doc FROM api_keys WHERE name = 'old'").fetchone()[0]
        self.assertEqual(doc["later"], "kept")
        self.assertEqual(doc["access"], "read-only")

    @defer.inlineCallbacks
    def test_an_account_limit_reaches_the_other_nodes(self):
        """The access file's fields, whatever they are, are the rows' (here an admin's
        and a key's account)."""
        view = self.view()
        secret = yield self.store.addKey("acme-deploy", Access.READ_WRITE, "acme")
        yield self.store.setAdmin("acme-ops", hash_password("pass-word-1"), True, "acme")
        yield self.seen(view, lambda data: "acme-ops" in data.admins)
        self.assertEqual(view.current().key_for(secret).account, "acme")
        self.assertEqual(view.current().admins["acme-ops"].account, "acme")
        # A new password keeps the limit, and changes the sessions' fingerprint.
        before = view.current().admins["acme-ops"].fingerprint
        yield self.store.setAdmin("acme-ops", hash_password("pass-word-2"), False)
        yield self.seen(view, lambda data: data.admins["acme-ops"].fingerprint != before)
        self.assertEqual(view.current().admins["acme-ops"].account, "acme")
        self.assertEqual([k.account for k in (yield self.store.listKeys())], ["acme"])

    def test_a_refused_change_writes_nothing(self):
        self.successResultOf(self.store.addKey("deploy", Access.READ_ONLY))
        self.failureResultOf(self.store.addKey("bad name", Access.READ_ONLY))
        self.assertEqual([k.name for k in self.successResultOf(self.store.listKeys())],
                         ["deploy"])  # fmt: skip


class DatabaseAwayTests(unittest.TestCase):
    """A private server, stopped and started again."""

    def setUp(self):
        self.server = pg_server.PostgresServer()
        self.server.start()
        self.addCleanup(self.server.stop)
        self.dsn = self.server.create_database()

    def pool(self) -> Database:
        db = Database(self.dsn, timeout=1)
        db.open()
        self.addCleanup(db.close)
        return db

    @defer.inlineCallbacks
    def test_the_panel_keeps_its_keys_and_changes_fail_in_one_line(self):
        store = PgAccessStore(self.pool(), at_once)
        secret = yield store.addKey("deploy", Access.READ_ONLY)
        view = PgAccessView(self.pool(), reactor)
        view.startService()
        self.addCleanup(view.stopService)
        self.server.halt()  # down (its data kept)

        failure = yield self.assertFailure(store.addKey("other", Access.READ_ONLY), OSError)
        self.assertTrue(str(failure).startswith(
            "[cluster] postgres: PostgreSQL cannot be reached now ("), failure)
        self.assertEqual(view.current().key_for(secret).name, "deploy")
        tmp = tempfile.mkdtemp(prefix="mailrelay-pg-")
        self.addCleanup(shutil.rmtree, tmp, True)
        config = os.path.join(tmp, "mailrelay.ini")
        with open(config, "w") as f:
            f.write(f"[server]\ndata_dir = {tmp}/data\n\n[cluster]\npostgres = {self.dsn}\n")
        done = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", config,
                               "apikey", "list"], capture_output=True, text=True, env=env(),
                              timeout=60)  # fmt: skip
        self.assertEqual(done.returncode, 1, done.stderr)
        # (before it, the pool's own warnings of each attempt to connect)
        self.assertTrue(done.stderr.splitlines()[-1].startswith(
            "mailrelay-admin: [cluster] postgres: PostgreSQL cannot be reached now ("),
            done.stderr)  # fmt: skip

        # Back: a change made then reaches the view (its listener reconnected).
        self.server.start_again()
        for _ in range(50):  # the pool's connection from before the stop fails once
            try:
                yield store.addKey("after", Access.READ_ONLY)
                break
            except OSError:
                yield task.deferLater(reactor, 0.1, lambda: None)
        deadline = time.monotonic() + 10
        while "after" not in view.current().api_keys:
            self.assertLess(time.monotonic(), deadline, "the view did not read the change")
            yield task.deferLater(reactor, 0.05, lambda: None)
