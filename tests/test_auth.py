"""Passwords, the password checker with its login cache, and the realm, over a real user file.

The argon2 verifications run in the real reactor's thread pool (trial runs the reactor);
time for the cache and for file reloads comes from a Clock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.auth.avatar import ISubmitter, Submitter
from mailrelay.auth.checkers import PasswordChecker, make_portal
from mailrelay.auth.credentials import ClientAddress, ClientUsernamePassword, SenderAddress
from mailrelay.auth.hashing import HashingPool
from mailrelay.auth.ipauth import AddressAuth, IpAuthTable
from mailrelay.auth.passwords import (
    ALPHABET,
    DUMMY_HASH,
    GENERATED_LENGTH,
    LOGIN_FAILED,
    generate_password,
    hash_password,
    needs_rehash,
    verify_password,
)
from mailrelay.auth.realm import SubmissionRealm
from mailrelay.directory.filedir import FileDirectory, UserStore
from mailrelay.interfaces import DirectoryUnavailable, IDirectory
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.scope import Scope

PASSWORD = "correct horse battery"


def temp_users_file(case) -> str:
    """A users.json path in a directory removed after the test (trial's mktemp is relative
    to the working directory, which under pytest is the repository)."""
    directory = tempfile.mkdtemp(prefix="mailrelay-test-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "users.json")


class PasswordTests(SynchronousTestCase):
    def test_hash_and_verify(self) -> None:
        h = hash_password(PASSWORD)
        assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        assert h != hash_password(PASSWORD)  # salted
        assert verify_password(h, PASSWORD)
        assert not verify_password(h, PASSWORD + " ")
        assert not verify_password(h, "")
        assert not verify_password("not a hash", PASSWORD)
        assert verify_password(hash_password("pässwörd"), "pässwörd")
        assert not verify_password(h, b"\xff".decode("utf-8", "surrogateescape"))

    def test_needs_rehash(self) -> None:
        assert not needs_rehash(hash_password("x"))
        # The dummy hash verified for unknown users must cost what a real one costs.
        assert not needs_rehash(DUMMY_HASH)
        assert needs_rehash("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
        assert needs_rehash("garbage")

    def test_generated_passwords(self) -> None:
        passwords = {generate_password() for _ in range(50)}
        assert len(passwords) == 50
        for p in passwords:
            assert len(p) == GENERATED_LENGTH
            assert set(p) <= set(ALPHABET)
        assert not set("0O1lI") & set(ALPHABET)


class HashingPoolTests(TestCase):
    @defer.inlineCallbacks
    def test_at_most_threads_jobs_run_at_once(self):
        # Each argon2id verification holds 19 MiB: the pool bounds how many run together.
        pool = HashingPool(reactor, threads=2)
        self.addCleanup(pool.stop)
        lock, release = threading.Lock(), threading.Event()
        running, most = [0], [0]

        def job(i: int) -> tuple[int, str]:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(10)
            with lock:
                running[0] -= 1
            return i, threading.current_thread().name

        results = [pool.run(job, i) for i in range(6)]
        for _ in range(1000):  # bounded: until the first two have started
            if running[0] == 2:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        release.set()
        done = yield defer.gatherResults(results)
        assert [i for i, _ in done] == list(range(6))
        assert most[0] == 2
        assert {name for _, name in done} <= {"PoolThread-password-hashing-0",
                                              "PoolThread-password-hashing-1"}

    def test_one_thread_per_cpu_by_default(self):
        assert HashingPool(reactor).threads == len(os.sched_getaffinity(0))
        with self.assertRaises(ValueError):
            HashingPool(reactor, threads=0)

    @defer.inlineCallbacks
    def test_the_file_directory_verifies_in_its_hashing_pool(self):
        path = temp_users_file(self)
        with UserStore(path).change() as store:
            store.update_account("default", domains=frozenset({"doe.com"}))
            store.add_user(SmtpUser("doe.com"), hash_password(PASSWORD))
        directory = FileDirectory(path, reactor=reactor, hashing_threads=1)
        self.addCleanup(directory.hashing.stop)
        verified = verifications(directory)
        user = yield directory.authenticate("doe.com", PASSWORD)
        assert user.username == "doe.com"
        assert verified == ["PoolThread-password-hashing-0"]


def verifications(directory: FileDirectory) -> list[str]:
    """The names of the threads that run ``directory``'s password verifications from now
    on, one entry per verification, as they start."""
    seen: list[str] = []
    run = directory.hashing.run

    def recording(f, *args):
        def job(*a):
            seen.append(threading.current_thread().name)
            return f(*a)
        return run(job, *args)

    directory.hashing.run = recording
    return seen


def credentials(username: str, password: str) -> ClientUsernamePassword:
    return ClientUsernamePassword(username, password, "127.0.0.1", True)


@implementer(IDirectory)
class DownDirectory:
    """A directory whose server is down (what the LDAP directory reports then)."""

    writable = False
    stamps_every_change = False

    def authenticate(self, username, password):
        return defer.fail(DirectoryUnavailable("ldap://127.0.0.1:1: connection refused"))

    def getUser(self, username):
        return defer.fail(DirectoryUnavailable("ldap://127.0.0.1:1: connection refused"))


class CheckerTests(TestCase):
    def setUp(self) -> None:
        self.path = temp_users_file(self)
        self.store = UserStore(self.path)
        with self.store.change():
            self.store.update_account("default", domains=frozenset({"doe.com", "b.org"}))
            self.store.add_user(SmtpUser("doe.com"), hash_password(PASSWORD))
            self.store.add_user(SmtpUser("john@doe.com"), hash_password(PASSWORD))
            self.store.add_user(
                SmtpUser("App", scope=Scope.parse("b.org")), hash_password(PASSWORD)
            )
        self.clock = Clock()
        self.directory = FileDirectory(self.path, reactor=reactor, clock=self.clock)
        self.addCleanup(self.directory.hashing.stop)
        self.checker = PasswordChecker(self.directory, cache_ttl=60, clock=self.clock)
        self.verified = verifications(self.directory)

    def change_file(self, change) -> None:
        """Change the file the way mailrelay-admin does, and let the directory notice."""
        with self.store.change():
            change(self.store)
        self.clock.advance(1)

    @defer.inlineCallbacks
    def test_good_password_gives_the_canonical_username(self):
        assert (yield self.checker.requestAvatarId(credentials("DOE.com", PASSWORD))) == "doe.com"
        avatar_id = yield self.checker.requestAvatarId(credentials("John@Doe.COM", PASSWORD))
        assert avatar_id == "john@doe.com"
        assert (yield self.checker.requestAvatarId(credentials("App", PASSWORD))) == "App"

    @defer.inlineCallbacks
    def test_a_user_added_or_given_a_password_can_log_in_at_once(self):
        """A client that logs in right after mailrelay-admin user add / passwd is not
        refused until the next check of the file: a failure looks at the file again."""
        with self.store.change():
            self.store.add_user(SmtpUser("new@b.org"), hash_password(PASSWORD))
        # No time passes: without a second look the directory still has the old file.
        avatar_id = yield self.checker.requestAvatarId(credentials("new@b.org", PASSWORD))
        assert avatar_id == "new@b.org"
        with self.store.change():
            self.store.set_password("new@b.org", hash_password("a new password here"))
        avatar_id = yield self.checker.requestAvatarId(
            credentials("new@b.org", "a new password here"))
        assert avatar_id == "new@b.org"
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(credentials("new@b.org", "wrong"))

    @defer.inlineCallbacks
    def test_twisted_bytes_credentials_work_too(self):
        avatar_id = yield self.checker.requestAvatarId(
            UsernamePassword(b"doe.com", PASSWORD.encode())
        )
        assert avatar_id == "doe.com"
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(UsernamePassword(b"doe.com", b"\xff\xfe"))

    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_user_look_the_same(self):
        failures = []
        for username, password in [
            ("doe.com", "wrong"),
            ("nobody.org", PASSWORD),
            ("app", PASSWORD),  # named usernames are case-sensitive
            ("doe.com", ""),
        ]:
            try:
                yield self.checker.requestAvatarId(credentials(username, password))
            except UnauthorizedLogin as e:
                failures.append(str(e))
        assert failures == [LOGIN_FAILED] * 4
        # Unknown users were verified too (against the dummy hash): same cost, same time.
        assert len(self.verified) == 4

    @defer.inlineCallbacks
    def test_verification_runs_in_a_thread(self):
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert self.verified
        assert self.verified[-1] != threading.current_thread().name
        try:
            yield self.checker.requestAvatarId(credentials("nobody.org", PASSWORD))
        except UnauthorizedLogin:
            pass
        assert self.verified[-1] != threading.current_thread().name

    @defer.inlineCallbacks
    def test_a_cached_login_is_not_verified_again_until_the_ttl(self):
        for _ in range(5):
            assert (yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD)))
        assert len(self.verified) == 1
        # Another spelling of the same login hits the same entry.
        yield self.checker.requestAvatarId(credentials("DOE.COM", PASSWORD))
        assert len(self.verified) == 1
        self.clock.advance(59)
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert len(self.verified) == 1
        self.clock.advance(1)
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert len(self.verified) == 2

    @defer.inlineCallbacks
    def test_a_wrong_password_is_verified_and_does_not_evict_the_cached_login(self):
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(credentials("doe.com", "guess"))
        assert len(self.verified) == 2
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert len(self.verified) == 2

    @defer.inlineCallbacks
    def test_a_new_password_ends_the_cached_login(self):
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        self.change_file(lambda s: s.set_password("doe.com", hash_password("new password")))
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert (yield self.checker.requestAvatarId(credentials("doe.com", "new password")))
        assert len(self.verified) == 3

    @defer.inlineCallbacks
    def test_a_deleted_user_cannot_use_its_cached_login(self):
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        self.change_file(lambda s: s.delete_user("doe.com"))
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))

    @defer.inlineCallbacks
    def test_cache_off(self):
        checker = PasswordChecker(self.directory, cache_ttl=0, clock=self.clock)
        yield checker.requestAvatarId(credentials("doe.com", PASSWORD))
        yield checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert len(self.verified) == 2

    @defer.inlineCallbacks
    def test_the_cache_never_holds_the_password(self):
        yield self.checker.requestAvatarId(credentials("doe.com", PASSWORD))
        held = repr(self.checker._cache)
        assert "doe.com" in held
        assert PASSWORD not in held and PASSWORD.encode().hex() not in held

    @defer.inlineCallbacks
    def test_directory_unavailable_passes_through(self):
        checker = PasswordChecker(DownDirectory(), cache_ttl=60, clock=self.clock)
        with self.assertRaises(DirectoryUnavailable) as e:
            yield checker.requestAvatarId(credentials("doe.com", PASSWORD))
        assert "connection refused" in str(e.exception)


class RealmTests(TestCase):
    def setUp(self) -> None:
        self.path = temp_users_file(self)
        self.store = UserStore(self.path)
        with self.store.change():
            self.store.update_account("default", domains=frozenset({"doe.com", "b.org"}))
            self.store.add_account(Account("sales", frozenset({"sales.com"}), "ops@sales.com"))
            self.store.add_user(SmtpUser("doe.com"), hash_password(PASSWORD))
            self.store.add_user(
                SmtpUser("app", scope=Scope.parse("b.org", "x@doe.com")), hash_password(PASSWORD)
            )
            self.store.add_user(SmtpUser("x@sales.com", account="sales"), hash_password(PASSWORD))
        self.clock = Clock()
        self.directory = FileDirectory(self.path, reactor=reactor, clock=self.clock)
        self.addCleanup(self.directory.hashing.stop)
        self.portal = make_portal(self.directory, cache_ttl=60, clock=self.clock)

    @defer.inlineCallbacks
    def test_login_gives_a_submitter_with_the_scope_and_the_account(self):
        interface, avatar, logout = yield self.portal.login(
            credentials("app", PASSWORD), None, ISubmitter
        )
        assert interface is ISubmitter
        assert verifyObject(ISubmitter, avatar)
        assert isinstance(avatar, Submitter)
        assert avatar.user.username == "app"
        assert avatar.account.name == "default"
        assert avatar.method == "password"
        assert avatar.may_send_as("anyone@b.org")
        assert avatar.may_send_as("X@doe.com")
        assert not avatar.may_send_as("y@doe.com")
        logout()

    @defer.inlineCallbacks
    def test_accounts_are_separate(self):
        _, avatar, _ = yield self.portal.login(
            credentials("x@sales.com", PASSWORD), None, ISubmitter
        )
        assert avatar.account == Account("sales", frozenset({"sales.com"}), "ops@sales.com")
        assert avatar.may_send_as("x@sales.com")
        assert not avatar.may_send_as("x@doe.com")

    @defer.inlineCallbacks
    def test_wrong_password_through_the_portal(self):
        with self.assertRaises(UnauthorizedLogin):
            yield self.portal.login(credentials("app", "nope"), None, ISubmitter)

    @defer.inlineCallbacks
    def test_one_user_lookup_per_login(self):
        """The checker hands the realm the user the directory answered with: a fresh
        login looks the user up not at all beyond the password check, a cached one once."""
        lookups = []
        get_user = self.directory.getUser
        self.directory.getUser = lambda name: lookups.append(name) or get_user(name)
        checker = PasswordChecker(self.directory, 60, self.clock)
        realm = SubmissionRealm(self.directory)
        for expected in ([], ["doe.com"]):  # verified, then from the login cache
            avatar_id = yield checker.requestAvatarId(credentials("DOE.com", PASSWORD))
            _, avatar, _ = yield realm.requestAvatar(avatar_id, None, ISubmitter)
            assert avatar.user.username == "doe.com"
            assert lookups == expected
            lookups.clear()

    @defer.inlineCallbacks
    def test_only_the_submitter_interface(self):
        with self.assertRaises(NotImplementedError):
            yield SubmissionRealm(self.directory).requestAvatar("doe.com", None, IDirectory)

    def test_the_password_is_not_in_the_credentials_repr(self) -> None:
        shown = repr(credentials("doe.com", PASSWORD))
        assert "doe.com" in shown and "127.0.0.1" in shown
        assert PASSWORD not in shown and "password" not in shown


class LoginWithoutPasswordTests(TestCase):
    """IP and address authentication through the real portal, realm and user file."""

    def setUp(self) -> None:
        self.path = temp_users_file(self)
        self.store = UserStore(self.path)
        with self.store.change():
            self.store.update_account("default", domains=frozenset({"doe.com", "b.org"}),
                                      notify="admin@doe.com")
            self.store.add_user(
                SmtpUser("app", scope=Scope.parse("b.org"), rate_limit=10), hash_password(PASSWORD)
            )
            self.store.add_user(SmtpUser("doe.com", status=Status.BLOCKED), hash_password(PASSWORD))
            self.store.add_user(SmtpUser("ops@doe.com", status=Status.SANDBOXED),
                                hash_password(PASSWORD))
        self.clock = Clock()
        self.directory = FileDirectory(self.path, reactor=reactor, clock=self.clock)
        self.addCleanup(self.directory.hashing.stop)
        self.portal = make_portal(
            self.directory, cache_ttl=60, clock=self.clock,
            ip_auth=IpAuthTable.parse("127.0.0.2 = app; 2001:db8::/32 = DOE.com; "
                                      "127.0.0.0/24 = ghost"),
            address_auth=AddressAuth.parse("alerts@doe.com;OPS@doe.com;x@elsewhere.net"),
        )
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.logged if e.get("log_level") == LogLevel.warn]

    @defer.inlineCallbacks
    def test_a_mapped_network_logs_in_as_its_user(self):
        _, avatar, _ = yield self.portal.login(ClientAddress("127.0.0.2"), None, ISubmitter)
        assert (avatar.user.username, avatar.method, avatar.user.rate_limit) == ("app", "ip", 10)
        assert avatar.may_send_as("x@b.org") and not avatar.may_send_as("x@doe.com")
        assert avatar.account.notify == "admin@doe.com"
        _, avatar, _ = yield self.portal.login(ClientAddress("2001:db8:5::1"), None, ISubmitter)
        assert (avatar.user.username, avatar.method, avatar.blocked) == ("doe.com", "ip", True)
        _, avatar, _ = yield self.portal.login(ClientAddress("::ffff:127.0.0.2"), None,
                                               ISubmitter)
        assert avatar.user.username == "app"

    @defer.inlineCallbacks
    def test_an_unmapped_address_is_refused(self):
        for ip in ("127.0.1.2", "2001:db9::1", "not an address"):
            with self.assertRaises(UnauthorizedLogin):
                yield self.portal.login(ClientAddress(ip), None, ISubmitter)
        assert self.warnings() == []

    @defer.inlineCallbacks
    def test_a_mapped_user_that_does_not_exist_is_refused_with_a_warning(self):
        with self.assertRaises(UnauthorizedLogin):
            yield self.portal.login(ClientAddress("127.0.0.9"), None, ISubmitter)
        assert self.warnings() == [
            "ip_auth maps 127.0.0.9 to SMTP user ghost, which does not exist; refused"
        ]

    @defer.inlineCallbacks
    def test_without_tables_there_is_no_checker(self):
        portal = make_portal(self.directory, cache_ttl=60, clock=self.clock)
        with self.assertRaises(UnhandledCredentials):
            yield portal.login(ClientAddress("127.0.0.2"), None, ISubmitter)
        with self.assertRaises(UnhandledCredentials):
            yield portal.login(SenderAddress("alerts@doe.com", "127.0.0.1"), None, ISubmitter)

    @defer.inlineCallbacks
    def test_a_listed_sender_logs_in_as_itself(self):
        _, avatar, _ = yield self.portal.login(
            SenderAddress("Alerts@DOE.com", "192.0.2.1"), None, ISubmitter
        )
        assert avatar.method == "address"
        assert avatar.user == SmtpUser("alerts@doe.com")  # account default, default limits
        assert avatar.scope == Scope(addresses=frozenset({"alerts@doe.com"}))
        assert avatar.account.name == "default"

    @defer.inlineCallbacks
    def test_a_listed_sender_that_is_a_user_gets_that_users_settings(self):
        _, avatar, _ = yield self.portal.login(
            SenderAddress("ops@doe.com", "192.0.2.1"), None, ISubmitter
        )
        assert (avatar.method, avatar.sandboxed) == ("address", True)
        assert avatar.scope == Scope(addresses=frozenset({"ops@doe.com"}))

    @defer.inlineCallbacks
    def test_unlisted_senders_and_unauthorized_domains_are_refused(self):
        for sender in ("other@doe.com", "alerts@doe.com.evil.net", ""):
            with self.assertRaises(UnauthorizedLogin):
                yield self.portal.login(SenderAddress(sender, "192.0.2.1"), None, ISubmitter)
        assert self.warnings() == []
        with self.assertRaises(UnauthorizedLogin):
            yield self.portal.login(SenderAddress("x@elsewhere.net", "192.0.2.1"), None,
                                    ISubmitter)
        assert self.warnings() == [
            "address_auth lists x@elsewhere.net, but account default does not authorize its "
            "domain; refused"
        ]
