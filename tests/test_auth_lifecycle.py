"""A user's credential lifecycle: expiry, allow-list of networks, last logins."""

from __future__ import annotations

import os

import pytest
from event_list import EventList
from test_auth import PASSWORD, temp_users_file
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailrelay.auth.avatar import ISubmitter
from mailrelay.auth.checkers import make_portal
from mailrelay.auth.credentials import ClientAddress, ClientUsernamePassword
from mailrelay.auth.ipauth import IpAuthError, IpAuthTable
from mailrelay.auth.lifecycle import (
    EXPIRED,
    NOT_ALLOWED,
    LoginRecorder,
    LoginStore,
    parse_networks,
    refusal,
)
from mailrelay.auth.passwords import hash_password
from mailrelay.directory.changes import parse_expiry, user_changes
from mailrelay.directory.filedir import DirectoryFileError, FileDirectory, UserStore
from mailrelay.events import rfc3339
from mailrelay.model import SmtpUser, Status


def test_parse_networks_normalizes_and_refuses_host_bits():
    assert parse_networks("203.0.113.0/24; 2001:DB8::/32,127.0.0.2") == (
        "127.0.0.2/32", "2001:db8::/32", "203.0.113.0/24")
    assert parse_networks("") == ()
    with pytest.raises(IpAuthError, match="did you mean 203.0.113.0/24"):
        parse_networks("203.0.113.7/24")


def test_refusal():
    user = SmtpUser("doe.com", expires=1000.0, allow_from=("127.0.0.2/32", "2001:db8::/32"))
    assert refusal(user, "127.0.0.2", now=999.0) is None
    assert refusal(user, "::ffff:127.0.0.2", now=999.0) is None  # a dual-stack socket
    assert refusal(user, "2001:db8::1", now=999.0) is None
    assert refusal(user, "127.0.0.3", now=999.0) == NOT_ALLOWED
    assert refusal(user, "/run/socket", now=999.0) == NOT_ALLOWED
    assert refusal(user, "127.0.0.2", now=1000.0) == EXPIRED
    assert refusal(SmtpUser("doe.com"), "192.0.2.1") is None


def test_expiry_dates_and_times():
    assert parse_expiry("2027-01-31") == parse_expiry("2027-02-01T00:00Z")
    assert parse_expiry("2027-01-31T18:00+01:00") == parse_expiry("2027-01-31T17:00")
    assert parse_expiry("") is None and parse_expiry(None) is None
    with pytest.raises(DirectoryFileError, match="not a date"):
        parse_expiry("next year")
    with pytest.raises(DirectoryFileError, match="allow_from"):
        user_changes({"allow_from": "nonsense"}, SmtpUser("doe.com"))


def test_the_users_file_keeps_both(tmp_path):
    store = UserStore(str(tmp_path / "users.json"))
    with store.change():
        store.update_account("default", domains=frozenset({"doe.com"}))
        store.add_user(SmtpUser("doe.com", expires=5.0, allow_from=("10.0.0.0/8",)),
                       hash_password(PASSWORD))
    again = UserStore(str(tmp_path / "users.json"))
    again.load()
    assert again.user("doe.com").expires == 5.0
    assert again.user("doe.com").allow_from == ("10.0.0.0/8",)


def test_the_login_store_keeps_the_latest(tmp_path):
    store = LoginStore(str(tmp_path / "logins.sqlite"))
    store.add({"doe.com": (20.0, "127.0.0.2")})
    store.add({"doe.com": (10.0, "127.0.0.3"), "x": (5.0, "::1")})  # an older batch
    assert store.all() == {"doe.com": (20.0, "127.0.0.2"), "x": (5.0, "::1")}
    assert store.get("nobody") is None
    store.close()


def directory_and_logins(case, path: str, clock) -> tuple[FileDirectory, LoginRecorder]:
    """The file directory at ``path`` and a login recorder beside it, closed after ``case``."""
    directory = FileDirectory(path, reactor=reactor, clock=clock)
    case.addCleanup(directory.hashing.stop)
    logins = LoginRecorder(LoginStore(os.path.join(os.path.dirname(path), "logins.sqlite")),
                           reactor, clock=clock)
    case.addCleanup(logins.store.close)
    return directory, logins


class PortalTests(TestCase):
    def setUp(self) -> None:
        self.path = temp_users_file(self)
        store = UserStore(self.path)
        with store.change():
            store.update_account("default", domains=frozenset({"doe.com", "b.org"}))
            store.add_user(SmtpUser("doe.com", allow_from=("127.0.0.2/32",)),
                           hash_password(PASSWORD))
            store.add_user(SmtpUser("b.org", expires=1.0), hash_password(PASSWORD))
        self.clock = Clock()
        self.directory, self.logins = directory_and_logins(self, self.path, self.clock)
        self.portal = make_portal(self.directory, cache_ttl=60, clock=self.clock,
                                  ip_auth=IpAuthTable.parse("127.0.0.9 = b.org"),
                                  logins=self.logins)

    def login(self, username, client_ip):
        return self.portal.login(ClientUsernamePassword(username, PASSWORD, client_ip, True),
                                 None, ISubmitter)

    @defer.inlineCallbacks
    def test_allowed_network_logs_in_and_is_recorded(self):
        self.clock.advance(100)
        _, avatar, _ = yield self.login("doe.com", "127.0.0.2")
        assert avatar.user.username == "doe.com"
        yield self.logins.flush()
        assert self.logins.store.get("doe.com") == (100.0, "127.0.0.2")

    @defer.inlineCallbacks
    def test_other_network_refused_even_from_the_login_cache(self):
        yield self.login("doe.com", "127.0.0.2")  # now cached
        with pytest.raises(UnauthorizedLogin, match=NOT_ALLOWED):
            yield self.login("doe.com", "127.0.0.3")
        yield self.logins.flush()
        assert self.logins.store.get("doe.com")[1] == "127.0.0.2"

    @defer.inlineCallbacks
    def test_expired_refused_by_password_and_by_ip(self):
        with pytest.raises(UnauthorizedLogin, match=EXPIRED):
            yield self.login("b.org", "127.0.0.2")
        with pytest.raises(UnauthorizedLogin, match=EXPIRED):
            yield self.portal.login(ClientAddress("127.0.0.9"), None, ISubmitter)


class DormancyTests(TestCase):
    """The dormancy job over a real users file and login store; time from a Clock."""

    def setUp(self) -> None:
        self.path = temp_users_file(self)
        store = UserStore(self.path)
        with store.change():
            store.update_account("default", domains=frozenset({"doe.com", "b.org"}),
                                 notify="ops@doe.com")
            store.add_user(SmtpUser("doe.com"), hash_password(PASSWORD))
            store.add_user(SmtpUser("b.org"), hash_password(PASSWORD))
        self.stamp = store.user("doe.com").updated
        self.clock = Clock()
        self.clock.advance(self.stamp)
        self.directory, self.logins = directory_and_logins(self, self.path, self.clock)
        self.sent: list = []
        self.events = EventList()
        self.job = self.make_job(self.directory)

    def make_job(self, directory):
        from mailrelay.manage.dormancy import DormancyJob

        return DormancyJob(directory, self.path, self.logins, 100.0,
                           lambda *message: self.sent.append(message), "postmaster@relay.test",
                           "relay.test", reactor, clock=self.clock, events=self.events)

    @defer.inlineCallbacks
    def test_only_the_user_without_a_recent_login_is_disabled_once(self):
        self.clock.advance(60)
        self.logins.record("doe.com", "127.0.0.2")  # b.org never logs in
        self.clock.advance(50)
        yield self.job.check()
        self.clock.advance(1)  # the directory looks at the file again
        users = {u.username: u.status for u in (yield self.directory.listUsers())}
        assert users == {"b.org": Status.BLOCKED, "doe.com": Status.ALLOWED}
        assert len(self.sent) == 1
        sender, recipients, message = self.sent[0]
        assert (sender, recipients) == ("", ["ops@doe.com"])
        assert b"SMTP login b.org disabled" in message and b"last login: never" in message
        yield self.job.check()
        assert len(self.sent) == 1

    @defer.inlineCallbacks
    def test_each_user_disabled_is_reported_once(self):
        self.clock.advance(10)
        self.logins.record("doe.com", "127.0.0.2")  # and b.org never logs in
        self.clock.advance(150)
        yield self.job.check()
        yield self.job.check()
        assert self.events == [
            ("credential.disabled", "default", "b.org",
             {"reason": "dormant", "last_login": None, "last_login_ip": None}),
            ("credential.disabled", "default", "doe.com",
             {"reason": "dormant", "last_login": rfc3339(self.stamp + 10),
              "last_login_ip": "127.0.0.2"}),
        ]

    @defer.inlineCallbacks
    def test_a_read_only_directory_is_only_told_about(self):
        from twisted.logger import capturedLogs

        from mailrelay.manage.stores import DirectoryUsers

        class ReadOnlyDirectory:  # the file directory as LDAP would be: not writable
            writable = False

            def __getattr__(_, name):
                return getattr(self.directory, name)

        job = self.make_job(ReadOnlyDirectory())
        assert isinstance(job._store, DirectoryUsers)
        self.clock.advance(200)
        with capturedLogs() as events:
            yield job.check()
            yield job.check()
        told = [e for e in events if "is dormant" in e.get("log_format", "")]
        assert len(told) == 2  # one per user, not one per look
        assert self.events == []  # nobody disabled
        assert self.sent == []
        assert all(u.status is Status.ALLOWED for u in (yield self.directory.listUsers()))
