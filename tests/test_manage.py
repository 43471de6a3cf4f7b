"""The management layer (mailrelay.manage) on its own, through the real user file, the real
SQLite stores and a real FileDirectory in a temporary directory: what mailrelay-admin and
the panel both rely on."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.auth.passwords import hash_password, verify_password
from mailrelay.directory.changes import user_changes
from mailrelay.directory.filedir import EntryConflict, FileDirectory, UnknownEntry, UserStore
from mailrelay.features.stats import StatsStore
from mailrelay.features.suppressions import Reason, SuppressionStore
from mailrelay.interfaces import IAccessStore, ISuppressionLists, IUserStore, ReadOnly
from mailrelay.manage.access import Access, AccessError, AccessFile, FileAccessStore
from mailrelay.manage.stores import (
    DirectoryUsers,
    FileUserStore,
    NothingToChange,
    at_once,
    threaded,
    user_store,
)
from mailrelay.manage.suppressions import SuppressionLists, suppression_json
from mailrelay.manage.users import (
    UserManager,
    account_json,
    forget_in_files,
    forget_user,
    retired_name,
    user_json,
)
from mailrelay.model import Account, SmtpUser
from mailrelay.scope import ScopeError

WHEN = 1_790_000_000.0  # the clock of these tests


def _settings(user: str, **settings) -> SmtpUser:
    """A new user of account acme (by default)."""
    settings.setdefault("account", "acme")
    return SmtpUser(user, **user_changes(settings, SmtpUser(user)))


def _seed(path: str) -> None:
    """Account acme, which may send from acme.example."""
    with UserStore(path).change() as s:
        s.add_account(Account("acme", frozenset({"acme.example"})))


def _text(path: str) -> str:
    return Path(path).read_text()


class FileStoreTests(unittest.TestCase):
    """The daemon's way: blocking work in the reactor's threads, reads through its
    FileDirectory, which sees every change at once."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "users.json")
        _seed(self.path)
        self.directory = FileDirectory(self.path, reactor=reactor, check_interval=3600)
        self.suppressions = SuppressionStore(os.path.join(self.dir, "supp.sqlite"))
        self.stats = StatsStore(os.path.join(self.dir, "stats.sqlite"))
        self.addCleanup(self.suppressions.close)
        self.addCleanup(self.stats.close)
        call = threaded(reactor)
        self.store = user_store(self.directory, self.path, call)

        def forget(username: str, when: float):
            return forget_user(self.suppressions, self.stats, username, when)

        self.users = UserManager(self.store, call, forget,
                                 SimpleNamespace(seconds=lambda: WHEN))  # fmt: skip

    def test_is_an_IUserStore(self):
        self.assertIsInstance(self.store, FileUserStore)
        self.assertTrue(verifyObject(IUserStore, self.store))

    @defer.inlineCallbacks
    def test_add_stores_a_hash_and_the_directory_sees_it_at_once(self):
        user = yield defer.ensureDeferred(
            self.users.add(_settings("news@acme.example", note="newsletter"), "s3cret-pass"))
        self.assertEqual(user.username, "news@acme.example")
        seen = yield self.directory.getUser("NEWS@acme.example")
        self.assertEqual(seen.note, "newsletter")
        stored = UserStore(self.path)
        stored.load()
        self.assertTrue(verify_password(stored.password_hash(user.username), "s3cret-pass"))
        self.assertNotIn("s3cret-pass", _text(self.path))
        self.assertEqual((yield self.store.passwordHash(user.username)),
                         stored.password_hash(user.username))  # fmt: skip
        authenticated = yield self.directory.authenticate("news@acme.example", "s3cret-pass")
        self.assertEqual(authenticated.username, user.username)

    @defer.inlineCallbacks
    def test_verify_marks_new_senders_waiting_except_those_the_account_verified(self):
        self.users.verify = True
        first = yield defer.ensureDeferred(self.users.add(_settings("acme.example"), "pass-word-1"))
        self.assertEqual(first.unverified, frozenset({"acme.example"}))
        yield defer.ensureDeferred(self.users.confirm("acme.example", "acme.example"))
        # An address at the domain the account confirmed needs no confirmation of its own.
        second = yield defer.ensureDeferred(
            self.users.add(_settings("bob@acme.example"), "pass-word-2"))
        self.assertEqual(second.unverified, frozenset())
        before, after = yield defer.ensureDeferred(self.users.update(
            "bob@acme.example", lambda u: {"note": "changed"}))
        self.assertEqual((before.note, after.note), ("", "changed"))

    @defer.inlineCallbacks
    def test_refusals_change_nothing(self):
        yield defer.ensureDeferred(self.users.add(_settings("acme.example"), "pass-word-1"))
        before = _text(self.path)
        yield self.assertFailure(defer.ensureDeferred(
            self.users.add(_settings("ACME.example"), "pass-word-2")), EntryConflict)
        yield self.assertFailure(defer.ensureDeferred(
            self.users.update("nobody.example", lambda u: {"note": "x"})), UnknownEntry)
        yield self.assertFailure(defer.ensureDeferred(
            self.users.update("acme.example", lambda u: {})), NothingToChange)

        def bad(current):
            return user_changes({"domains": "not a domain!"}, current)

        yield self.assertFailure(defer.ensureDeferred(self.users.update("acme.example", bad)),
                                 ScopeError)  # fmt: skip
        yield self.assertFailure(defer.ensureDeferred(self.users.delete_account("default")),
                                 EntryConflict)  # fmt: skip
        self.assertEqual(_text(self.path), before)

    @defer.inlineCallbacks
    def test_delete_then_forget_removes_suppressions_and_retires_statistics(self):
        yield defer.ensureDeferred(self.users.add(_settings("acme.example"), "pass-word-1"))
        self.suppressions.add("bob@example.net", "acme", "acme.example", Reason.MANUAL)
        self.stats.add({("acme", "acme.example", 1, "accepted"): 3})
        deleted = yield defer.ensureDeferred(self.users.delete("acme.example"))
        self.assertIsNone((yield self.directory.getUser("acme.example")))
        forgotten = yield defer.ensureDeferred(self.users.forget(deleted.username))
        label = retired_name("acme.example", WHEN)
        self.assertEqual((forgotten.suppressions, forgotten.stats, forgotten.label),
                         (1, 1, label))  # fmt: skip
        self.assertEqual(forgotten.said(), "1 suppressed address(es) removed, statistics kept "
                         f"as user {label!r}")  # fmt: skip
        self.assertEqual(self.suppressions.of_user("acme.example"), [])
        self.assertEqual(self.stats.query("acme", label)["accepted"], 3)

    @defer.inlineCallbacks
    def test_accounts_with_their_users_and_their_documents(self):
        yield defer.ensureDeferred(self.users.add_account(
            Account("beta", frozenset({"beta.example"}), None, "the beta one")))
        yield defer.ensureDeferred(self.users.add(
            _settings("beta.example", account="beta"), "pass-word-1"))
        account = yield defer.ensureDeferred(self.users.update_account(
            "beta", lambda current: {"domains": current.domains | {"beta.test"}}))
        self.assertEqual(account.domains, frozenset({"beta.example", "beta.test"}))
        listed = yield defer.ensureDeferred(self.users.accounts())
        self.assertEqual([(a.name, [u.username for u in users]) for a, users in listed],
                         [("acme", []), ("beta", ["beta.example"]), ("default", [])])  # fmt: skip
        self.assertEqual(account_json(*listed[1]), {
            "name": "beta", "domains": "beta.example;beta.test", "notify": None,
            "note": "the beta one", "bounce_domain": None, "quota_day": None,
            "quota_month": None, "users": ["beta.example"]})  # fmt: skip
        user, found = yield defer.ensureDeferred(self.users.get("beta.example"))
        doc = user_json(user, found)
        self.assertEqual((doc["username"], doc["kind"], doc["account"]),
                         ("beta.example", "domain", "beta"))  # fmt: skip
        yield self.assertFailure(defer.ensureDeferred(self.users.update_account(
            "beta", lambda current: {"domains": frozenset({"beta.test"})})), EntryConflict)
        yield self.assertFailure(defer.ensureDeferred(self.users.delete_account("beta")),
                                 EntryConflict)  # fmt: skip


class ReadOnlyTests(unittest.TestCase):
    """A directory that is not writable (LDAP) is read through the same interface; every
    change fails with ReadOnly and writes nothing."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        path = os.path.join(self.dir, "users.json")
        _seed(path)
        with UserStore(path).change() as s:
            s.add_user(SmtpUser("acme.example", account="acme"), hash_password("pass-word-0"))
        self.before = _text(path)
        self.path = path
        directory = FileDirectory(path, reactor=reactor)
        directory.writable = False  # as LdapDirectory says of itself
        self.store = user_store(directory, path, threaded(reactor))
        self.users = UserManager(self.store, threaded(reactor), forget_user, reactor)

    def test_is_an_IUserStore(self):
        self.assertIsInstance(self.store, DirectoryUsers)
        self.assertTrue(verifyObject(IUserStore, self.store))

    @defer.inlineCallbacks
    def test_reads_and_refuses_every_change(self):
        user, account = yield defer.ensureDeferred(self.users.get("acme.example"))
        self.assertEqual((user.username, account.name), ("acme.example", "acme"))
        self.assertIsNone((yield self.store.passwordHash("acme.example")))
        self.assertFalse(self.users.writable)
        self.assertRaises(ReadOnly, self.users.check_writable)
        for change in (
            lambda: self.users.add(SmtpUser("x.acme.example"), "pass-word-1"),
            lambda: self.users.set_password("acme.example", "pass-word-1"),
            lambda: self.users.update("acme.example", lambda u: {"note": "x"}),
            lambda: self.users.delete("acme.example"),
            lambda: self.users.confirm("acme.example", "acme.example"),
            lambda: self.users.add_account(Account("acme")),
            lambda: self.users.update_account("default", lambda a: {"note": "x"}),
            lambda: self.users.delete_account("default"),
        ):
            failure = yield self.assertFailure(defer.ensureDeferred(change()), ReadOnly)
            self.assertEqual(str(failure), "users and accounts are managed in the LDAP "
                             "directory; change them there")  # fmt: skip
        self.assertEqual(_text(self.path), self.before)


class AtOnceTests(unittest.SynchronousTestCase):
    """mailrelay-admin's way: the store works in the calling thread, so every Deferred
    has fired when it is returned and no reactor needs to run; files that do not exist
    yet stay so."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "users.json")
        self.files = [os.path.join(self.dir, n) for n in ("supp.sqlite", "stats.sqlite")]
        self.users = UserManager(FileUserStore(self.path, at_once), at_once,
                                 forget_in_files(*self.files),
                                 SimpleNamespace(seconds=lambda: WHEN))  # fmt: skip

    def test_answers_at_once(self):
        _seed(self.path)
        user = self.successResultOf(defer.ensureDeferred(
            self.users.add(_settings("acme.example"), "pass-word-1")))
        self.assertEqual(user.username, "acme.example")
        users, accounts = self.successResultOf(defer.ensureDeferred(self.users.users()))
        self.assertEqual(([u.username for u in users], list(accounts)),
                         (["acme.example"], ["acme", "default"]))  # fmt: skip
        self.failureResultOf(self.users.store.listUsers("nope"), UnknownEntry)
        forgotten = self.successResultOf(defer.ensureDeferred(self.users.forget("acme.example")))
        self.assertEqual((forgotten.suppressions, forgotten.stats), (0, 0))
        self.assertEqual([os.path.exists(f) for f in self.files], [False, False])

    def test_a_missing_user_file_holds_only_the_default_account(self):
        self.assertIsNone(self.successResultOf(self.users.store.getUser("acme.example")))
        self.assertEqual([a.name for a in self.successResultOf(
            self.users.store.listAccounts())], ["default"])  # fmt: skip
        self.assertFalse(os.path.exists(self.path))


class SuppressionListsTests(unittest.TestCase):
    """The suppression lists through ISuppressionLists, the SQLite store in a thread."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.store = SuppressionStore(os.path.join(self.dir, "supp.sqlite"))
        self.addCleanup(self.store.close)
        self.lists = SuppressionLists(self.store, threaded(reactor))

    @defer.inlineCallbacks
    def test_the_three_levels(self):
        self.assertTrue(verifyObject(ISuppressionLists, self.lists))
        self.assertTrue((yield self.lists.add("Bob@Example.net", "acme", "acme.example",
                                              Reason.MANUAL)))  # fmt: skip
        self.assertFalse((yield self.lists.add("bob@example.net", "acme", "acme.example",
                                               Reason.UNSUBSCRIBE)))  # fmt: skip
        yield self.lists.add("all@example.net", "acme", None, Reason.HARD_BOUNCE)
        yield self.lists.add("spam@example.net", None, None, Reason.MANUAL)
        mine = yield self.lists.list("acme", "acme.example")
        self.assertEqual([suppression_json(e) | {"created": 0} for e in mine], [
            {"address": "bob@example.net", "account": "acme", "user": "acme.example",
             "reason": "manual", "created": 0}])  # fmt: skip
        self.assertEqual([e.address for e in (yield self.lists.all())],
                         ["spam@example.net", "all@example.net", "bob@example.net"])  # fmt: skip
        self.assertEqual([e.address for e in (yield self.lists.ofUser("acme.example"))],
                         ["bob@example.net"])  # fmt: skip
        self.assertTrue((yield self.lists.remove("bob@example.net", "acme", "acme.example")))
        self.assertFalse((yield self.lists.remove("bob@example.net", "acme", "acme.example")))
        self.assertEqual((yield self.lists.list("acme", "acme.example")), [])


class AccessStoreCases:
    """What every IAccessStore does (the access file here, PostgreSQL in
    test_postgres_access.py): ``store`` changed through it, ``stored()`` all it keeps as
    text, ``view()`` the daemon's cached view and ``seen(view, test)`` a Deferred that
    fires once the view passes ``test`` (a change made elsewhere reaching it)."""

    store: object

    @defer.inlineCallbacks
    def test_keys_and_admins(self):
        self.assertTrue(verifyObject(IAccessStore, self.store))
        secret = yield self.store.addKey("deploy", Access.READ_WRITE)
        self.assertNotIn(secret, self.stored())
        daemon = self.view()
        self.assertEqual(daemon.current().key_for(secret).name, "deploy")
        yield self.assertFailure(self.store.addKey("deploy", Access.READ_ONLY), AccessError)
        password_hash = hash_password("pass-word-1")
        yield self.store.setAdmin("alice", password_hash, True)
        self.assertNotIn("pass-word-1", self.stored())
        yield self.assertFailure(self.store.setAdmin("bob", hash_password("x"), False),
                                 AccessError)  # fmt: skip
        self.assertEqual([k.name for k in (yield self.store.listKeys())], ["deploy"])
        self.assertEqual([a.name for a in (yield self.store.listAdmins())], ["alice"])
        yield self.seen(daemon, lambda data: "alice" in data.admins)
        self.assertEqual(daemon.current().admins["alice"].password_hash, password_hash)
        yield self.store.deleteKey("deploy")
        yield self.assertFailure(self.store.deleteAdmin("bob"), AccessError)
        yield self.seen(daemon, lambda data: data.key_for(secret) is None)
        yield self.store.deleteAdmin("alice")
        yield self.seen(daemon, lambda data: not data.admins)


class AccessStoreTests(AccessStoreCases, unittest.TestCase):
    """API keys and admin logins through IAccessStore over the access file; the daemon's
    AccessFile sees each change."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "admin.json")
        self.store = FileAccessStore(self.path, at_once)
        self.clock = Clock()

    def stored(self) -> str:
        self.assertEqual(oct(os.stat(self.path).st_mode & 0o777), "0o600")
        return _text(self.path)

    def view(self) -> AccessFile:
        return AccessFile(self.path, self.clock)

    def seen(self, view, test) -> defer.Deferred:
        self.clock.advance(1)  # re-read at most once a second
        self.assertTrue(test(view.current()))
        return defer.succeed(None)
