"""Users and accounts in PostgreSQL, against a real server: the file store's changes and
refusals, word for word; two stores changing at once without losing a change; and each
node's in-memory directory following the notifications (and reloading everything when
told nothing precise)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
import time

import pg_server
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.admin import cli
from mailrelay.auth.passwords import hash_password
from mailrelay.config import load_config
from mailrelay.directory import shared_users
from mailrelay.directory.changes import user_changes
from mailrelay.directory.filedir import DirectoryFileError, UserStore, read_file
from mailrelay.interfaces import DirectoryUnavailable, IDirectory, IUserStore
from mailrelay.manage.stores import FileUserStore, NothingToChange, at_once, threaded
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.postgres.db import Database
from mailrelay.postgres.logins import PgLoginStore
from mailrelay.postgres.secrets import SharedSecrets
from mailrelay.postgres.users import PgDirectory, PgUsers, PgUserStore, import_data
from mailrelay.scope import ScopeError
from mailrelay.signing import load_or_create_key

HASH = hash_password("pass-word-1")


def _user(name: str, **settings) -> SmtpUser:
    settings.setdefault("account", "acme")
    return SmtpUser(name, **user_changes(settings, SmtpUser(name)))


def _db(dsn: str) -> Database:
    db = Database(dsn)
    db.open()
    return db


def _result(d: defer.Deferred):
    """The result of an at_once Deferred (fired already), or its exception raised."""
    out: list = []
    d.addBoth(out.append)
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@defer.inlineCallbacks
def until(predicate, timeout: float):
    """Wait, the reactor running, until ``predicate()`` (or its Deferred) is true."""
    deadline = time.monotonic() + timeout
    while True:
        found = yield defer.maybeDeferred(predicate)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        yield task.deferLater(reactor, 0.01, lambda: None)


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.db = _db(pg_server.shared_server().create_database())
        self.addCleanup(self.db.close)
        self.users = PgUsers(self.db)
        self.store = PgUserStore(self.users, at_once)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        self.file = FileUserStore(os.path.join(tmp, "users.json"), at_once)
        for store in (self.store, self.file):
            _result(store.addAccount(Account("acme", frozenset({"acme.example"}))))

    def test_is_an_IUserStore(self) -> None:
        self.assertTrue(verifyObject(IUserStore, self.store))

    def test_changes_are_kept_and_read_back(self) -> None:
        added = _result(self.store.addUser(_user("news@acme.example", note="n"), HASH))
        self.assertGreater(added.updated, 0)
        before, after = _result(self.store.updateUser(
            "NEWS@acme.example", lambda u: user_changes({"status": "blocked"}, u)))
        self.assertEqual((before.status, after.status), (Status.ALLOWED, Status.BLOCKED))
        other = hash_password("another-pass")
        _result(self.store.setPassword("news@acme.example", other))
        self.assertEqual(_result(self.store.passwordHash("news@acme.example")), other)
        again = PgUserStore(PgUsers(self.db), at_once)  # a fresh reader: what is stored
        user = _result(again.getUser("news@acme.example"))
        self.assertEqual((user.note, user.status), ("n", Status.BLOCKED))
        self.assertEqual([a.name for a in _result(again.listAccounts())], ["acme", "default"])
        self.assertEqual([u.username for u in _result(again.listUsers("acme"))],
                         ["news@acme.example"])
        _result(self.store.updateAccount("acme", lambda a: {"notify": "ops@acme.example"}))
        self.assertEqual(_result(again.getAccount("acme")).notify, "ops@acme.example")
        _result(self.store.deleteUser("news@acme.example"))
        self.assertIsNone(_result(again.getUser("news@acme.example")))
        _result(self.store.deleteAccount("acme"))
        self.assertEqual([a.name for a in _result(again.listAccounts())], ["default"])

    def test_refusals_are_the_file_stores_word_for_word_and_change_nothing(self) -> None:
        def bad_scope(current):
            return user_changes({"domains": "not a domain!"}, current)

        attempts = [
            lambda s: s.addUser(_user("acme.example"), HASH),
            lambda s: s.addUser(_user("ACME.example"), HASH),  # taken, in another case
            lambda s: s.addUser(_user("x@other.example"), HASH),  # outside the account
            lambda s: s.addUser(_user("nobody.example", account="nowhere"), HASH),
            lambda s: s.updateUser("nobody.example", lambda u: {"note": "x"}),
            lambda s: s.updateUser("acme.example", lambda u: {}),
            lambda s: s.updateUser("acme.example", bad_scope),
            lambda s: s.updateUser("acme.example", lambda u: {"priority": 9}),
            lambda s: s.deleteAccount("default"),
            lambda s: s.deleteAccount("acme"),  # still has a user
            lambda s: s.addAccount(Account("acme")),
            lambda s: s.addAccount(Account("bad name!")),
            lambda s: s.updateAccount("acme", lambda a: {"domains": frozenset()}),
        ]
        results = {}
        for name, store in (("pg", self.store), ("file", self.file)):
            outcomes = []
            for attempt in attempts:
                try:
                    outcomes.append(("ok", type(_result(attempt(store))).__name__))
                except (DirectoryFileError, ScopeError, NothingToChange) as e:
                    outcomes.append((type(e).__name__, str(e)))
            results[name] = outcomes
        self.assertEqual(results["pg"], results["file"])
        self.assertEqual(results["pg"][0], ("ok", "SmtpUser"))
        self.assertTrue(all(kind != "ok" for kind, _ in results["pg"][1:]), results["pg"])
        self.assertEqual([u.username for u in _result(self.store.listUsers())], ["acme.example"])

    def test_two_stores_changing_at_once_lose_nothing(self) -> None:
        _result(self.store.addUser(_user("acme.example"), HASH))
        errors: list[Exception] = []

        def node(tag: str) -> None:
            db = _db(self.db.dsn)
            try:
                store = PgUserStore(PgUsers(db), at_once)
                for i in range(10):
                    _result(store.addUser(_user(f"{tag}{i}@acme.example"), HASH))
                    # A read-modify-write of one shared user: the lock makes each one see
                    # the other's notes.
                    _result(store.updateUser("acme.example", lambda u, i=i: {
                        "note": (u.note + f" {tag}{i}").strip()}))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                db.close()

        nodes = [threading.Thread(target=node, args=(tag,)) for tag in "ab"]
        for t in nodes:
            t.start()
        for t in nodes:
            t.join(60)
        self.assertEqual(errors, [])
        users = _result(self.store.listUsers())
        self.assertEqual(len(users), 21)
        notes = _result(self.store.getUser("acme.example")).note.split()
        self.assertEqual(sorted(notes), sorted(f"{t}{i}" for t in "ab" for i in range(10)))

    def test_import_adds_what_is_missing_once_and_keeps_what_is_there(self) -> None:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "users.json")
        with UserStore(path).change() as s:
            s.add_account(Account("acme", frozenset({"acme.example"}), note="from the file"))
            s.add_account(Account("beta", frozenset({"beta.example"})))
            s.add_user(_user("beta.example", account="beta"), HASH)
            s.add_user(_user("acme.example", note="from the file"), HASH)
        _result(self.store.addUser(_user("acme.example", note="in the database"), HASH))
        data = read_file(path)[0]
        counts = import_data(self.users, data)
        self.assertEqual(counts, {"accounts": 1, "users": 1, "accounts_kept": 1,
                                  "users_kept": 1})
        self.assertEqual(import_data(self.users, data),
                         {"accounts": 0, "users": 0, "accounts_kept": 2, "users_kept": 2})
        self.assertEqual(_result(self.store.getUser("acme.example")).note, "in the database")
        self.assertEqual(_result(self.store.getAccount("acme")).note, "")
        beta = _result(self.store.getUser("beta.example"))
        self.assertEqual((beta.account, beta.updated), ("beta", data.users["beta.example"].updated))
        self.assertEqual(_result(self.store.passwordHash("beta.example")), HASH)


class DirectoryTests(unittest.TestCase):
    """A node's PgDirectory, running on the reactor, while another node's store changes
    the database."""

    def setUp(self) -> None:
        dsn = pg_server.shared_server().create_database()
        self.db = _db(dsn)
        self.addCleanup(self.db.close)
        self.other = _db(dsn)  # "node A": a pool of its own
        self.addCleanup(self.other.close)
        self.writer = PgUserStore(PgUsers(self.other), at_once)
        _result(self.writer.addAccount(Account("acme", frozenset({"acme.example"}))))
        _result(self.writer.addUser(_user("acme.example"), HASH))
        self.directory = PgDirectory(PgUsers(self.db), reactor, poll=3600, hashing_threads=1)
        self.directory.startService()
        self.addCleanup(self.directory.stopService)

    def wait_listening(self) -> defer.Deferred:
        return until(self.directory.listener.listening.is_set, 10)

    def until(self, predicate, timeout: float) -> defer.Deferred:
        return until(predicate, timeout)

    def test_is_an_IDirectory(self) -> None:
        self.assertTrue(verifyObject(IDirectory, self.directory))

    @defer.inlineCallbacks
    def test_the_cache_follows_each_change_within_a_second(self):
        yield self.wait_listening()
        user = yield self.directory.authenticate("acme.example", "pass-word-1")
        self.assertEqual(user.username, "acme.example")

        def seen(check):
            return lambda: self.directory.getUser("acme.example").addCallback(check)

        _result(self.writer.updateUser("acme.example", lambda u: {"status": Status.BLOCKED}))
        yield self.until(seen(lambda u: u.status is Status.BLOCKED), 1.0)
        _result(self.writer.setPassword("acme.example", hash_password("new-pass-2")))
        yield self.until(lambda: self.directory.authenticate("acme.example", "new-pass-2")
                         .addErrback(lambda f: f.trap(UnauthorizedLogin) and None), 1.0)
        _result(self.writer.addUser(_user("new@acme.example"), HASH))
        yield self.until(seen(lambda u: True), 0)  # still there
        yield self.until(lambda: self.directory.getUser("new@acme.example"), 1.0)
        _result(self.writer.updateAccount("acme", lambda a: {"note": "changed"}))
        yield self.until(lambda: self.directory.getAccount("acme").addCallback(
            lambda a: a.note == "changed"), 1.0)
        _result(self.writer.deleteUser("new@acme.example"))
        yield self.until(lambda: self.directory.getUser("new@acme.example").addCallback(
            lambda u: u is None), 1.0)

    @defer.inlineCallbacks
    def test_a_change_made_through_the_nodes_own_store_is_seen_when_it_returns(self):
        store = self.directory.user_store(threaded(reactor))
        yield store.updateUser("acme.example", lambda u: {"note": "at once"})
        user = yield self.directory.getUser("acme.example")
        self.assertEqual(user.note, "at once")

    @defer.inlineCallbacks
    def test_an_empty_or_missing_payload_reloads_everything(self):
        yield self.wait_listening()
        # Changes written behind the store's back: no notification names them.
        with self.other.transaction() as conn:
            conn.execute("UPDATE mailrelay_users SET doc = jsonb_set(doc, '{note}', "
                         "'\"quietly\"')")
        yield self.directory._received("mailrelay_users", None)  # the listener was away
        user = yield self.directory.getUser("acme.example")
        self.assertEqual(user.note, "quietly")
        with self.other.transaction() as conn:
            conn.execute("DELETE FROM mailrelay_users")
            conn.execute("SELECT pg_notify('mailrelay_users', '')")
        yield self.until(lambda: self.directory.getUser("acme.example").addCallback(
            lambda u: u is None), 1.0)

    @defer.inlineCallbacks
    def test_the_poll_catches_a_change_no_notification_announced(self):
        with self.other.transaction() as conn:
            conn.execute("UPDATE mailrelay_users SET doc = jsonb_set(doc, '{note}', "
                         "'\"polled\"')")
            conn.execute("UPDATE mailrelay_users_state SET generation = generation + 1")
        yield self.directory._check()
        user = yield self.directory.getUser("acme.example")
        self.assertEqual(user.note, "polled")


class SecretTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dsn = pg_server.shared_server().create_database()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_nodes_starting_together_get_one_key_and_a_later_file_does_not_change_it(self):
        keys: list[bytes] = []

        def node(i: int) -> None:
            db = _db(self.dsn)
            try:
                keys.append(SharedSecrets(db).key("bounces", os.path.join(self.tmp, f"n{i}")))
            finally:
                db.close()

        nodes = [threading.Thread(target=node, args=(i,)) for i in range(4)]
        for t in nodes:
            t.start()
        for t in nodes:
            t.join(30)
        self.assertEqual(len(keys), 4)
        self.assertEqual(len(set(keys)), 1)
        self.assertEqual(len(keys[0]), 32)
        other = os.path.join(self.tmp, "other.key")
        load_or_create_key(other)
        db = _db(self.dsn)
        self.addCleanup(db.close)
        self.assertEqual(SharedSecrets(db).key("bounces", other), keys[0])
        self.assertNotEqual(SharedSecrets(db).key("tracking"), keys[0])

    def test_the_first_node_brings_the_key_of_its_file(self):
        path = os.path.join(self.tmp, "panel.key")
        local = load_or_create_key(path)
        db = _db(self.dsn)
        self.addCleanup(db.close)
        self.assertEqual(SharedSecrets(db).key("admin", path), local)
        self.assertEqual(SharedSecrets(db).key("admin", ""), local)


class LoginTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dsn = pg_server.shared_server().create_database()
        self.a, self.b = _db(self.dsn), _db(self.dsn)
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)

    def test_each_users_latest_login_from_any_node(self):
        node_a, node_b = PgLoginStore(self.a), PgLoginStore(self.b)
        node_a.add({"x.example": (100.0, "192.0.2.1"), "y.example": (50.0, "192.0.2.1")})
        node_b.add({"x.example": (90.0, "192.0.2.2"), "y.example": (60.0, "192.0.2.2")})
        self.assertEqual(node_a.all(), {"x.example": (100.0, "192.0.2.1"),
                                        "y.example": (60.0, "192.0.2.2")})
        self.assertEqual(node_b.get("y.example"), (60.0, "192.0.2.2"))
        self.assertIsNone(node_b.get("z.example"))

    def test_one_node_a_round_claims_a_job(self):
        node_a, node_b = PgLoginStore(self.a), PgLoginStore(self.b)
        self.assertTrue(node_a.claim("dormancy", 1000.0, 60.0))
        self.assertFalse(node_b.claim("dormancy", 1000.5, 60.0))
        self.assertFalse(node_a.claim("dormancy", 1030.0, 60.0))
        self.assertTrue(node_b.claim("dormancy", 1059.0, 60.0))  # a little early counts


class ImportCommandTests(unittest.TestCase):
    def test_import_users_reports_what_it_added_and_adds_nothing_twice(self):
        dsn = pg_server.shared_server().create_database()
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "users.json")
        with UserStore(path).change() as s:
            s.add_account(Account("acme", frozenset({"acme.example"})))
            s.add_user(_user("acme.example"), HASH)
            s.add_user(_user("news@acme.example"), HASH)
        ini = os.path.join(tmp, "mailrelay.ini")
        with open(ini, "w") as f:
            f.write(f"[server]\ndata_dir = {tmp}/data\n\n[directory]\nfile = {path}\n\n"
                    f"[cluster]\npostgres = {dsn}\n")

        def run(*args: str) -> tuple[int, str]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cli.main(["-c", ini, *args])
            return code, out.getvalue()

        self.assertEqual(run("cluster", "import-users"),
                         (0, f"imported 1 account(s) and 2 user(s) from {path}\n"))
        self.assertEqual(run("cluster", "import-users", path), (0, (
            f"imported 0 account(s) and 0 user(s) from {path}\nalready in the database, "
            "left as they are there: 1 account(s), 2 user(s)\n")))
        code, listed = run("user", "list")
        self.assertEqual(code, 0)
        self.assertIn("news@acme.example", listed)
        db = _db(dsn)
        self.addCleanup(db.close)
        self.assertEqual(_result(PgUserStore(PgUsers(db)).passwordHash("acme.example")), HASH)


class DatabaseAwayTests(unittest.TestCase):
    """PostgreSQL stops: the users in memory keep serving logins, a change fails saying
    why; it comes back: the directory catches up with what changed meanwhile."""

    @defer.inlineCallbacks
    def test_logins_go_on_changes_fail_and_the_directory_catches_up(self):
        server, db = pg_server.private(self)
        store = PgUserStore(PgUsers(db), at_once)
        _result(store.addAccount(Account("acme", frozenset({"acme.example"}))))
        _result(store.addUser(_user("acme.example"), HASH))
        directory = PgDirectory(PgUsers(db), reactor, poll=3600, hashing_threads=1)
        directory.listener.retry = 0.2
        directory.startService()
        self.addCleanup(directory.stopService)
        yield until(directory.listener.listening.is_set, 10)

        server.halt()  # fast shutdown
        yield until(lambda: not directory.listener.listening.is_set(), 10)
        user = yield directory.authenticate("acme.example", "pass-word-1")
        self.assertEqual(user.username, "acme.example")
        with self.assertRaises(DirectoryUnavailable) as caught:
            _result(directory.user_store(at_once).updateUser("acme.example",
                                                             lambda u: {"note": "x"}))
        self.assertIn("PostgreSQL", str(caught.exception))

        server.start_again()
        # Made as the listener reconnects: the reload after its return, or the change's
        # notification if it is back already, brings it. The pool reconnects in its own
        # time (its back-off after the failed attempts): the change is tried until then.
        new_hash = hash_password("after-the-outage")
        yield until(lambda: store.setPassword("acme.example", new_hash).addErrback(
            lambda f: f.trap(DirectoryUnavailable) and None), 20)
        yield until(lambda: directory.authenticate(
            "acme.example", "after-the-outage").addErrback(
                lambda f: f.trap(UnauthorizedLogin) and None), 20)


class SelectionTests(unittest.TestCase):
    def config(self, directory: str):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        ini = os.path.join(tmp, "mailrelay.ini")
        with open(ini, "w") as f:
            f.write(f"[server]\ndata_dir = {tmp}/data\n\n[directory]\n{directory}\n\n"
                    "[ldap]\nbase_dn = dc=example,dc=com\n\n"
                    f"[cluster]\npostgres = {pg_server.shared_server().create_database()}\n")
        return load_config(ini)

    def test_the_database_holds_the_users_unless_ldap_does(self):
        self.assertIsInstance(shared_users(self.config("backend = file")), PgUsers)
        self.assertIsNone(shared_users(self.config("backend = ldap")))
