"""The LDAP directory against a real slapd loaded with etc/ldap/ (see tests/ldap_server.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import replace

import ldap3
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from mailrelay.auth.lifecycle import EXPIRED, NOT_ALLOWED, refusal
from mailrelay.directory.changes import parse_expiry
from mailrelay.directory.ldap_client import Entry
from mailrelay.directory.ldap_mapping import (
    account_from_entry,
    attribute_names,
    user_from_entry,
)
from mailrelay.directory.ldap_passwords import UnsupportedScheme, verify, verify_any
from mailrelay.directory.ldapdir import LdapConfigError, LdapDirectory
from mailrelay.interfaces import DirectoryUnavailable, IDirectory
from mailrelay.model import Kind, Status
from tests.ldap_server import (
    BASE_DN,
    EXAMPLE_PASSWORDS,
    SERVICE_DN,
    SLAPD,
    USERS_DN,
    Slapd,
)

TTL = 60.0
SLAPPASSWD = "/usr/sbin/slappasswd"


def slappasswd(password: str, scheme: str) -> str:
    """A userPassword value made by OpenLDAP's own tool."""
    if not os.path.exists(SLAPPASSWD):
        raise AssertionError("needs OpenLDAP's slappasswd (apt install slapd)")
    if scheme == "{CRYPT}":
        args = ["-c", "$6$%.16s"]
    elif scheme == "{ARGON2}":
        args = ["-o", "module-load=argon2", "-h", scheme]
    else:
        args = ["-o", "module-load=pw-sha2", "-h", scheme]
    done = subprocess.run(
        [SLAPPASSWD, "-s", password, *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


class SlapdTestCase(unittest.TestCase):
    """Each test gets its own slapd with the example directory (about 0.1 s to start), so
    tests may change, stop or freeze it freely."""

    tls = False

    def setUp(self) -> None:
        if not os.path.exists(SLAPD):
            raise AssertionError("needs OpenLDAP's slapd (apt install slapd ldap-utils)")
        self.clock = Clock()
        tmp = tempfile.mkdtemp(prefix="mailrelay-ldap-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        self.slapd = Slapd(tmp, tls=self.tls)
        self.addCleanup(self.slapd.stop)
        self.slapd.start()

    def directory(self, **overrides) -> LdapDirectory:
        settings = self.slapd.settings()
        settings.update(clock=self.clock, cache_ttl=TTL)
        settings.update(overrides)
        uris = settings.pop("uris")
        base_dn = settings.pop("base_dn")
        directory = LdapDirectory(uris, base_dn, **settings)
        self.addCleanup(directory.close)
        return directory

    def refused_uri(self) -> str:
        """An ldap:// URI nothing answers on: its port stays bound, never listening, for
        the whole test, so no other test's server can take it."""
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        return f"ldap://127.0.0.1:{holder.getsockname()[1]}"

    def add_user(self, uid: str, userPassword: str, **attributes) -> str:
        """An extra SMTP user."""
        dn = f"uid={uid},{USERS_DN}"
        admin = self.slapd.admin()
        admin.add(
            dn,
            ["account", "simpleSecurityObject", "mailrelayUser", "extensibleObject"],
            {"uid": uid, "userPassword": userPassword, **attributes},
        )
        admin.unbind()
        return dn

    def modify(self, dn: str, **attributes) -> None:
        admin = self.slapd.admin()
        admin.modify(dn, {k: [(ldap3.MODIFY_REPLACE, v)] for k, v in attributes.items()})
        admin.unbind()


class LoginTests(SlapdTestCase):
    def test_provides_idirectory(self) -> None:
        directory = self.directory()
        self.assertTrue(IDirectory.providedBy(directory))
        self.assertFalse(directory.writable)

    @defer.inlineCallbacks
    def test_domain_level_login(self):
        user = yield self.directory().authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        self.assertEqual(user.username, "doe.test")
        self.assertIs(user.kind, Kind.DOMAIN)
        self.assertEqual(user.account, "default")
        self.assertEqual(user.note, "Office mail clients of doe.test")
        self.assertTrue(user.effective_scope().allows("anyone@doe.test"))
        self.assertFalse(user.effective_scope().allows("anyone@lists.doe.test"))

    @defer.inlineCallbacks
    def test_user_level_login_any_case(self):
        directory = self.directory()
        for login in ("john@doe.test", "John@DOE.test"):
            user = yield directory.authenticate(login, EXAMPLE_PASSWORDS["john@doe.test"])
            self.assertEqual(user.username, "john@doe.test")
            self.assertIs(user.kind, Kind.ADDRESS)
            self.assertEqual((user.priority, user.max_connections), (2, 5))
            self.assertTrue(user.effective_scope().allows("john@doe.test"))
            self.assertFalse(user.effective_scope().allows("jane@doe.test"))

    @defer.inlineCallbacks
    def test_named_login_with_explicit_scope(self):
        user = yield self.directory().authenticate("webmail", EXAMPLE_PASSWORDS["webmail"])
        self.assertIs(user.kind, Kind.NAMED)
        self.assertEqual(user.scope.domains, {"lists.doe.test"})
        self.assertEqual(user.scope.addresses, {"info@doe.test", "billing@doe.test"})
        self.assertEqual((user.rate_limit, user.priority, user.max_connections), (500, 4, None))
        self.assertTrue(user.archive)
        self.assertEqual(user.audit_bcc, ("audit@doe.test",))
        self.assertEqual(user.bounce_notify, "postmaster@doe.test")
        self.assertEqual(user.status, Status.ALLOWED)
        self.assertGreater(user.updated, 1.6e9)  # from modifyTimestamp

    @defer.inlineCallbacks
    def test_sandboxed_user_of_another_account(self):
        directory = self.directory()
        user = yield directory.authenticate("newsletter", EXAMPLE_PASSWORDS["newsletter"])
        self.assertEqual((user.account, user.status), ("shop", Status.SANDBOXED))
        self.assertTrue(user.unsubscribe_footer and user.open_tracking and user.click_tracking)
        account = yield directory.getAccount(user.account)
        self.assertEqual(account.domains, {"shop.test"})
        self.assertTrue(user.effective_scope(account).allows("news@shop.test"))

    @defer.inlineCallbacks
    def test_login_by_mail_is_the_uid_user(self):
        self.add_user("jane", slappasswd("jane-secret", "{SSHA}"), mail="jane@doe.test")
        directory = self.directory()
        user = yield directory.authenticate("jane@doe.test", "jane-secret")
        self.assertEqual(user.username, "jane")
        self.assertEqual((yield directory.getUser("JANE@doe.test")).username, "jane")

    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_user_fail_alike(self):
        directory = self.directory()
        failures = []
        for login, password in [
            ("doe.test", "wrong"),
            ("doe.test", EXAMPLE_PASSWORDS["john@doe.test"]),  # someone else's
            ("nobody.test", "wrong"),
            ("nobody@doe.test", EXAMPLE_PASSWORDS["doe.test"]),
            ("doe.test", ""),  # an empty password would be an anonymous bind
            ("", EXAMPLE_PASSWORDS["doe.test"]),
        ]:
            e = yield self.assertFailure(directory.authenticate(login, password), UnauthorizedLogin)
            failures.append((type(e), e.args))
        self.assertEqual(len(set(failures)), 1, failures)

    @defer.inlineCallbacks
    def test_new_password_works_at_once(self):
        dn = self.add_user("rotating", slappasswd("old-secret", "{SSHA}"))
        directory = self.directory()
        yield self.assertFailure(
            directory.authenticate("rotating", "new-secret"), UnauthorizedLogin
        )
        self.modify(dn, userPassword=slappasswd("new-secret", "{SSHA}"))
        user = yield directory.authenticate("rotating", "new-secret")
        self.assertEqual(user.username, "rotating")

    @defer.inlineCallbacks
    def test_filter_injection(self):
        directory = self.directory()
        attempts = [
            "*",
            "doe*",
            "*.test",
            "doe.test)(uid=*",
            "doe.test)(|(uid=*)",
            "*)(|(uid=*",
            "webmail)(mailrelayStatus=allowed",
            "\\",
            "doe.test\\",
            "\\2a",
            "\x00",
            "doe.test\x00",
            "doe.test\x00)(uid=*",
            "(uid=doe.test)",
        ]
        for login in attempts:
            self.assertIsNone((yield directory.getUser(login)), repr(login))
            for password in set(EXAMPLE_PASSWORDS.values()):
                yield self.assertFailure(directory.authenticate(login, password), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_undecodable_login_and_password_refused(self):
        directory = self.directory()
        yield self.assertFailure(directory.authenticate("doe.test\udcff", "x"), UnauthorizedLogin)
        yield self.assertFailure(directory.authenticate("doe.test", "x\udcff"), UnauthorizedLogin)
        self.assertIsNone((yield directory.getUser("\udcff")))

    @defer.inlineCallbacks
    def test_ambiguous_login_refused(self):
        # "shared" is one entry's uid and another's mail: neither may log in with it.
        self.add_user("shared", slappasswd("one", "{SSHA}"))
        self.add_user("other", slappasswd("two", "{SSHA}"))
        self.modify(f"uid=other,{USERS_DN}", mail=["shared"])
        directory = self.directory()
        with capturedLogs() as events:
            yield self.assertFailure(directory.authenticate("shared", "one"), UnauthorizedLogin)
            self.assertIsNone((yield directory.getUser("shared")))
        self.assertTrue(any("matches several entries" in e["log_format"] for e in events))

    @defer.inlineCallbacks
    def test_bind_mode_with_argon2_hash(self):
        # slapd checks the hash itself (its argon2 module), the relay only binds.
        self.add_user("argon", slappasswd("argon-secret", "{ARGON2}"))
        user = yield self.directory().authenticate("argon", "argon-secret")
        self.assertEqual(user.username, "argon")


class CompareModeTests(SlapdTestCase):
    @defer.inlineCallbacks
    def test_example_ssha_users(self):
        directory = self.directory(password_mode="compare")
        for login, password in EXAMPLE_PASSWORDS.items():
            user = yield directory.authenticate(login, password)
            self.assertEqual(user.username, login)
            yield self.assertFailure(
                directory.authenticate(login, password + "x"), UnauthorizedLogin
            )

    @defer.inlineCallbacks
    def test_schemes_from_slappasswd(self):
        directory = self.directory(password_mode="compare")
        for scheme in ("{SSHA}", "{SHA}", "{SSHA512}", "{SHA256}", "{CRYPT}", "{ARGON2}"):
            uid = "hash-" + scheme.strip("{}").lower()
            self.add_user(uid, slappasswd(f"{uid}-secret", scheme))
            user = yield directory.authenticate(uid, f"{uid}-secret")
            self.assertEqual(user.username, uid)
            yield self.assertFailure(directory.authenticate(uid, "wrong"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_cleartext_and_unknown_schemes_refused_and_logged(self):
        self.add_user("cleartext", "cleartext-secret")
        self.add_user("md5", slappasswd("md5-secret", "{MD5}"))
        directory = self.directory(password_mode="compare")
        with capturedLogs() as events:
            yield self.assertFailure(
                directory.authenticate("cleartext", "cleartext-secret"), UnauthorizedLogin
            )
            yield self.assertFailure(directory.authenticate("md5", "md5-secret"), UnauthorizedLogin)
        schemes = [e.get("scheme") for e in events if "scheme" in e]
        self.assertEqual(schemes, ["cleartext", "{MD5}"])

    @defer.inlineCallbacks
    def test_unknown_user_refused(self):
        directory = self.directory(password_mode="compare")
        yield self.assertFailure(
            directory.authenticate("nobody", "mailrelay-unknown-user"), UnauthorizedLogin
        )


class CacheTests(SlapdTestCase):
    @defer.inlineCallbacks
    def test_scope_change_seen_after_ttl(self):
        dn = self.add_user(
            "changing", slappasswd("changing-secret", "{SSHA}"), mailrelaySenderDomain="a.test"
        )
        directory = self.directory()
        user = yield directory.authenticate("changing", "changing-secret")
        self.assertEqual(user.scope.domains, {"a.test"})
        self.assertEqual((yield directory.getUser("changing")).scope.domains, {"a.test"})

        self.modify(dn, mailrelaySenderDomain=["b.test"], mailrelayStatus=["blocked"])
        self.clock.advance(TTL - 1)
        user = yield directory.authenticate("changing", "changing-secret")
        self.assertEqual(user.scope.domains, {"a.test"})
        self.assertEqual((yield directory.getUser("changing")).scope.domains, {"a.test"})

        self.clock.advance(1)
        user = yield directory.authenticate("changing", "changing-secret")
        self.assertEqual((user.scope.domains, user.status), ({"b.test"}, Status.BLOCKED))
        self.assertEqual((yield directory.getUser("changing")).scope.domains, {"b.test"})

    @defer.inlineCallbacks
    def test_expiry_and_allowed_networks(self):
        self.add_user("limited", slappasswd("limited-secret", "{SSHA}"),
                      mailrelayExpires="20270201000000Z",
                      mailrelayAllowFrom=["203.0.113.0/24", "2001:DB8::/32", "10.0.0.1/8"])
        user = yield self.directory().authenticate("limited", "limited-secret")
        self.assertEqual(user.expires, parse_expiry("2027-01-31"))
        self.assertEqual(user.allow_from, ("2001:db8::/32", "203.0.113.0/24"))  # 10.0.0.1/8: bad

    @defer.inlineCallbacks
    def test_cached_login_needs_the_same_password(self):
        directory = self.directory()
        yield directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        yield self.assertFailure(directory.authenticate("doe.test", "wrong"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_zero_ttl_caches_nothing(self):
        dn = self.add_user("uncached", slappasswd("s", "{SSHA}"), mailrelaySenderDomain="a.test")
        directory = self.directory(cache_ttl=0)
        self.assertEqual((yield directory.authenticate("uncached", "s")).scope.domains, {"a.test"})
        self.modify(dn, mailrelaySenderDomain=["b.test"])
        self.assertEqual((yield directory.authenticate("uncached", "s")).scope.domains, {"b.test"})


class ListingTests(SlapdTestCase):
    @defer.inlineCallbacks
    def test_users_and_accounts(self):
        directory = self.directory()
        users = yield directory.listUsers()
        self.assertEqual(
            [u.username for u in users], ["doe.test", "john@doe.test", "newsletter", "webmail"]
        )
        self.assertEqual([u.username for u in (yield directory.listUsers("shop"))], ["newsletter"])
        accounts = yield directory.listAccounts()
        self.assertEqual([a.name for a in accounts], ["default", "shop"])
        default = yield directory.getAccount("default")
        self.assertEqual(default.domains, {"doe.test", "lists.doe.test"})
        self.assertEqual(default.notify, "postmaster@doe.test")
        self.assertIsNone((yield directory.getAccount("nope")))
        self.assertIsNone((yield directory.getAccount("*")))
        self.assertIsNone((yield directory.getUser("nobody")))

    @defer.inlineCallbacks
    def test_paged_listing(self):
        admin = self.slapd.admin()
        dns = [f"uid=bulk{i:03},{USERS_DN}" for i in range(600)]  # more than one page (500)
        for i, dn in enumerate(dns):
            admin.add(dn, ["account", "mailrelayUser"], {"uid": f"bulk{i:03}"})
        admin.unbind()
        users = yield self.directory().listUsers()
        self.assertEqual(len(users), 604)
        # An entry without the service's raised limit gets an error, not a short list.
        limited = self.directory(
            bind_dn=f"uid=webmail,{USERS_DN}", bind_password=EXAMPLE_PASSWORDS["webmail"]
        )
        e = yield self.assertFailure(limited.listUsers(), DirectoryUnavailable)
        self.assertIn("size limit", str(e))


class CheckTests(SlapdTestCase):
    @defer.inlineCallbacks
    def test_good_settings(self):
        yield self.directory(account_base="ou=accounts," + BASE_DN).check()

    @defer.inlineCallbacks
    def test_wrong_bind_password(self):
        e = yield self.assertFailure(self.directory(bind_password="wrong").check(), LdapConfigError)
        self.assertEqual(str(e), f"LDAP bind as {SERVICE_DN} failed: invalid credentials")

    @defer.inlineCallbacks
    def test_wrong_bind_dn(self):
        dn = "cn=nobody,ou=services," + BASE_DN
        e = yield self.assertFailure(self.directory(bind_dn=dn).check(), LdapConfigError)
        self.assertEqual(str(e), f"LDAP bind as {dn} failed: invalid credentials")

    @defer.inlineCallbacks
    def test_wrong_base(self):
        for base in ("ou=missing," + BASE_DN, "dc=elsewhere,dc=test"):
            e = yield self.assertFailure(self.directory(base_dn=base).check(), LdapConfigError)
            self.assertEqual(str(e), f"LDAP base {base} does not exist")
        base = "ou=missing," + BASE_DN
        e = yield self.assertFailure(self.directory(account_base=base).check(), LdapConfigError)
        self.assertEqual(str(e), f"LDAP base {base} does not exist")

    @defer.inlineCallbacks
    def test_wrong_bind_at_runtime_is_a_temporary_failure(self):
        directory = self.directory(bind_password="wrong")
        yield self.assertFailure(directory.authenticate("doe.test", "x"), DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_unreachable(self):
        uri = self.refused_uri()
        e = yield self.assertFailure(self.directory(uris=[uri]).check(), DirectoryUnavailable)
        self.assertIn(f"LDAP server unreachable: {uri}: ", str(e))
        self.assertNotIsInstance(e, LdapConfigError)

    @defer.inlineCallbacks
    def test_second_uri_used_when_first_is_down(self):
        down = self.refused_uri()
        directory = self.directory(uris=[down, self.slapd.uri])
        yield directory.check()
        user = yield directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        self.assertEqual(user.username, "doe.test")

    @defer.inlineCallbacks
    def test_calls_are_counted_and_timed_for_metrics(self):
        """Each call: its time, and whether the directory answered (a wrong password is an
        answer; an unreachable server is an error)."""
        from prometheus_client import generate_latest

        from mailrelay.metrics.prom import PrometheusMetrics

        metrics = PrometheusMetrics()
        up, down = self.directory(), self.directory(uris=[self.refused_uri()])
        up.metrics = down.metrics = metrics
        yield up.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        yield self.assertFailure(up.authenticate("doe.test", "wrong"), UnauthorizedLogin)
        yield self.assertFailure(down.authenticate("doe.test", "x"), DirectoryUnavailable)
        text = generate_latest(metrics.registry).decode()
        self.assertIn('mailrelay_directory_requests_total{result="ok"} 2.0', text)
        self.assertIn('mailrelay_directory_requests_total{result="error"} 1.0', text)
        self.assertIn("mailrelay_directory_request_seconds_count 3.0", text)

    @defer.inlineCallbacks
    def test_start_tls_refused_by_a_server_without_tls(self):
        e = yield self.assertFailure(self.directory(start_tls=True).check(), DirectoryUnavailable)
        self.assertIn("LDAP server unreachable", str(e))

    def test_bad_settings_raise_at_construction(self) -> None:
        for overrides, text in [
            ({"user_filter": "(uid=x)"}, "does not contain {username}"),
            ({"user_filter": "(|(uid={username})"}, "not a valid LDAP filter"),
            ({"user_list_filter": "objectClass=x"}, "not a valid LDAP filter"),
            ({"password_mode": "plain"}, "bind or compare"),
            ({"attributes": {"senderDomain": "x"}}, "unknown LDAP attribute key"),
            ({"attributes": {"status": "a b"}}, "not an LDAP attribute name"),
            ({"uris": ["http://x"]}, "not an ldap:// or ldaps:// URI"),
            ({"bind_password": ""}, "bind_password is empty"),
            ({"base_dn": ""}, "base_dn is empty"),
            ({"pool_size": 0}, "pool_size"),
        ]:
            with self.assertRaises(ValueError) as raised:
                self.directory(**overrides)
            self.assertIn(text, str(raised.exception))

    @defer.inlineCallbacks
    def test_from_the_configuration_file(self):
        from mailrelay.config import load_config

        path = os.path.join(self.slapd.directory, "mailrelay.ini")
        with open(path, "w") as f:
            f.write("[directory]\nbackend = ldap\n")
            f.write(self.slapd.config_text(password_mode="compare", cache_ttl="5s", timeout="2s"))
        directory = LdapDirectory.from_config(load_config(path).ldap, clock=self.clock)
        self.addCleanup(directory.close)
        yield directory.check()
        user = yield directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        self.assertEqual(user.username, "doe.test")

    @defer.inlineCallbacks
    def test_configured_attribute_names(self):
        self.add_user("renamed", slappasswd("s", "{SSHA}"), description="abc@doe.test")
        directory = self.directory(attributes={"sender_addresses": "description"})
        user = yield directory.authenticate("renamed", "s")
        self.assertEqual(user.scope.addresses, {"abc@doe.test"})


class OutageTests(SlapdTestCase):
    """slapd stopped or frozen mid-run: temporary failures, then recovery on its own."""

    @defer.inlineCallbacks
    def test_stopped_then_restarted(self):
        directory = self.directory()
        password = EXAMPLE_PASSWORDS["john@doe.test"]
        yield directory.authenticate("john@doe.test", password)
        self.slapd.stop()
        # Within the TTL a verified login is still answered from the cache.
        yield directory.authenticate("john@doe.test", password)
        self.clock.advance(TTL)
        with capturedLogs() as events:
            for _ in range(3):
                yield self.assertFailure(
                    directory.authenticate("john@doe.test", password), DirectoryUnavailable
                )
                yield self.assertFailure(
                    directory.authenticate("doe.test", "x"), DirectoryUnavailable
                )
                yield self.assertFailure(directory.getUser("webmail"), DirectoryUnavailable)
                yield self.assertFailure(directory.listUsers(), DirectoryUnavailable)
            self.slapd.start()
            user = yield directory.authenticate("john@doe.test", password)
            yield self.assertFailure(directory.authenticate("doe.test", "x"), UnauthorizedLogin)
        self.assertEqual(user.username, "john@doe.test")
        texts = [e["log_format"] for e in events]
        self.assertEqual(texts.count("LDAP directory unavailable: {reason}"), 1)
        self.assertEqual(texts.count("LDAP directory answers again"), 1)

    @defer.inlineCallbacks
    def test_restart_with_pooled_connections(self):
        # Connections opened before the restart are dead; the next call must not fail.
        directory = self.directory(password_mode="compare", cache_ttl=0)
        yield directory.authenticate("webmail", EXAMPLE_PASSWORDS["webmail"])
        self.slapd.stop()
        self.slapd.start()
        user = yield directory.authenticate("webmail", EXAMPLE_PASSWORDS["webmail"])
        self.assertEqual(user.username, "webmail")

    @defer.inlineCallbacks
    def test_frozen_server_times_out(self):
        directory = self.directory(timeout=1, cache_ttl=0)
        yield directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        self.slapd.pause()
        try:
            yield self.assertFailure(
                directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"]),
                DirectoryUnavailable,
            )
        finally:
            self.slapd.resume()
        user = yield directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        self.assertEqual(user.username, "doe.test")


class TlsTests(SlapdTestCase):
    tls = True

    @defer.inlineCallbacks
    def test_start_tls(self):
        directory = self.directory(start_tls=True)
        yield directory.check()
        user = yield directory.authenticate("doe.test", EXAMPLE_PASSWORDS["doe.test"])
        self.assertEqual(user.username, "doe.test")

    @defer.inlineCallbacks
    def test_ldaps(self):
        directory = self.directory(uris=[self.slapd.ldaps_uri])
        yield directory.check()
        user = yield directory.authenticate("john@doe.test", EXAMPLE_PASSWORDS["john@doe.test"])
        self.assertEqual(user.username, "john@doe.test")

    @defer.inlineCallbacks
    def test_unknown_ca_refused(self):
        other_ca = "/etc/ssl/certs/ca-certificates.crt"
        for overrides in (
            {"start_tls": True, "ca_file": other_ca},
            {"uris": [self.slapd.ldaps_uri], "ca_file": other_ca},
        ):
            directory = self.directory(**overrides)
            e = yield self.assertFailure(directory.check(), DirectoryUnavailable)
            self.assertIn("certificate verify failed", str(e))
            yield self.assertFailure(directory.authenticate("doe.test", "x"), DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_host_name_checked(self):
        uri = self.slapd.ldaps_uri.replace("127.0.0.1", "localhost")
        e = yield self.assertFailure(self.directory(uris=[uri]).check(), DirectoryUnavailable)
        self.assertIn("does not match the host name", str(e))


class MappingTests(unittest.TestCase):
    """Values an admin may get wrong in LDAP, mapped without a server."""

    def entry(self, **attributes) -> Entry:
        return Entry(
            "uid=x," + USERS_DN,
            {k.lower(): [v.encode() for v in vs] for k, vs in attributes.items()},
        )

    def test_bad_expiry_and_networks_refuse_logins(self) -> None:
        with capturedLogs() as events:
            user = user_from_entry(self.entry(uid=["x"], mailrelayExpires=["next year"],
                                              mailrelayAllowFrom=["nowhere"]), attribute_names())
        self.assertEqual(refusal(user, "203.0.113.1", now=0.0), EXPIRED)
        self.assertEqual(refusal(replace(user, expires=None), "203.0.113.1"), NOT_ALLOWED)
        self.assertEqual(len(events), 3)  # each bad value, and the empty list it leaves

    def test_bad_values_fall_back_safely(self) -> None:
        names = attribute_names()
        with capturedLogs() as events:
            user = user_from_entry(
                self.entry(
                    uid=["Sales.Example.TEST"],
                    mailrelayStatus=["maybe"],
                    mailrelayPriority=["9"],
                    mailrelayRateLimit=["lots"],
                    mailrelaySenderDomain=["good.test;also.test", "bad domain", "x@y.test"],
                    mailrelaySenderAddress=["ok@good.test", "not an address"],
                    mailrelayArchive=["yes"],
                    mailrelayBounceNotify=["somewhere"],
                    modifyTimestamp=["garbage"],
                ),
                names,
            )
        self.assertEqual(user.username, "sales.example.test")
        self.assertEqual(user.status, Status.BLOCKED)
        self.assertEqual((user.priority, user.rate_limit), (3, None))
        self.assertEqual(user.scope.domains, {"good.test", "also.test"})
        self.assertEqual(user.scope.addresses, {"ok@good.test"})
        self.assertFalse(user.archive)
        self.assertEqual((user.bounce_notify, user.updated), ("sender", 0.0))
        self.assertEqual(len(events), 8)

    def test_an_accounts_bounce_domain_must_lie_under_its_domains(self) -> None:
        names = attribute_names()
        account = account_from_entry(self.entry(cn=["acme"], mailrelayAccountDomain=["acme.test"],
                                                mailrelayBounceDomain=["Bounces.Acme.TEST"]),
                                     names)  # fmt: skip
        self.assertEqual(account.bounce_domain, "bounces.acme.test")
        with capturedLogs() as events:
            account = account_from_entry(self.entry(
                cn=["acme"], mailrelayAccountDomain=["acme.test"],
                mailrelayBounceDomain=["bounces.other.test"]), names)  # fmt: skip
        self.assertIsNone(account.bounce_domain)
        self.assertEqual(len(events), 1)

    def test_quotas_of_users_and_accounts(self) -> None:
        names = attribute_names()
        user = user_from_entry(self.entry(uid=["app"], mailrelayQuotaDay=["500"],
                                          mailrelayQuotaMonth=["0"]), names)
        self.assertEqual((user.quota_day, user.quota_month), (500, 0))
        with capturedLogs() as events:
            user = user_from_entry(self.entry(uid=["app"], mailrelayQuotaDay=["-1"]), names)
        self.assertEqual((user.quota_day, user.quota_month, len(events)), (None, None, 1))
        account = account_from_entry(self.entry(cn=["acme"], mailrelayQuotaMonth=["9000"]),
                                     names)
        self.assertEqual((account.quota_day, account.quota_month), (None, 9000))

    def test_quota_action_refuses_unless_it_says_hold(self) -> None:
        names = attribute_names()
        held = user_from_entry(self.entry(uid=["app"], mailrelayQuotaAction=["HOLD"]), names)
        self.assertEqual(held.quota_action, "hold")
        self.assertEqual(user_from_entry(self.entry(uid=["app"]), names).quota_action, "refuse")
        with capturedLogs() as events:
            user = user_from_entry(self.entry(uid=["app"], mailrelayQuotaAction=["keep"]), names)
        self.assertEqual((user.quota_action, len(events)), ("refuse", 1))

    def test_entry_without_username_cannot_log_in(self) -> None:
        with capturedLogs():
            self.assertIsNone(user_from_entry(self.entry(mail=["a@b.test"]), attribute_names()))

    def test_the_typed_value_of_several_wins(self) -> None:
        entry = self.entry(uid=["first", "Second.Test"])
        self.assertEqual(
            user_from_entry(entry, attribute_names(), "second.test").username, "second.test"
        )
        self.assertEqual(user_from_entry(entry, attribute_names(), "mail@x.test").username, "first")


class PasswordTests(unittest.TestCase):
    def test_malformed_values_never_match(self) -> None:
        for stored in (b"{SSHA}", b"{SSHA}!!!", b"{SHA}" + b"A" * 28, b"{ARGON2}x", b"{CRYPT}"):
            self.assertFalse(verify("", stored), stored)
            self.assertFalse(verify("x", stored), stored)

    def test_unsupported_only_when_nothing_matched(self) -> None:
        ssha = slappasswd("s", "{SSHA}").encode()
        self.assertTrue(verify_any("s", [b"{MD5}xyz", ssha]))
        with self.assertRaises(UnsupportedScheme):
            verify_any("s", [b"{MD5}xyz", slappasswd("t", "{SSHA}").encode()])
