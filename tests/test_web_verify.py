"""Sender verification: the rule the session applies, the confirmation mail queued through
the real spool and its link followed over HTTP, and a domain's TXT record served by a
loopback twisted.names server."""

from __future__ import annotations

import email
import re
import shutil
import tempfile

from panel import Panel
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.model import SmtpUser
from mailrelay.scope import Scope
from mailrelay.verification import (
    VerificationError,
    VerificationTokens,
    entries_to_verify,
    is_verified,
)
from mailrelay.web.domaincheck import DomainChecker

KEY = b"k" * 32


def named(name, domains="", addresses="", unverified=(), account="default"):
    return SmtpUser(name, account=account, scope=Scope.parse(domains, addresses),
                    unverified=frozenset(unverified))  # fmt: skip


class RuleTests(unittest.TestCase):
    def test_nothing_waiting_is_verified(self):
        self.assertTrue(is_verified(named("app", "a.test"), "x@a.test"))

    def test_waiting_domain_and_address(self):
        user = named("app", "a.test;b.test", "x@c.test;y@a.test", {"a.test", "x@c.test"})
        self.assertFalse(is_verified(user, "anyone@a.test"))
        self.assertFalse(is_verified(user, "X@C.test"))
        self.assertTrue(is_verified(user, "z@b.test"))
        # y@a.test is listed itself and not waiting: it is verified though its domain waits.
        self.assertTrue(is_verified(user, "y@a.test"))

    def test_domain_and_address_users(self):
        self.assertFalse(is_verified(SmtpUser("d.test", unverified=frozenset({"d.test"})),
                                     "a@d.test"))  # fmt: skip
        self.assertFalse(is_verified(SmtpUser("a@d.test", unverified=frozenset({"a@d.test"})),
                                     "a@d.test"))  # fmt: skip

    def test_entries_to_verify(self):
        before = named("app", "a.test")
        after = named("app", "a.test;b.test", "x@c.test;y@v.test")
        other = named("other", "v.test", "w@z.test", {"w@z.test"})
        stranger = named("stranger", "c.test", account="acme")
        waiting = entries_to_verify(before, after, [other, stranger])
        # a.test was there before; y@v.test is at a domain the account has verified.
        self.assertEqual(waiting, {"b.test", "x@c.test"})
        self.assertEqual(entries_to_verify(None, named("z@z.test"), [other]), {"z@z.test"})

    def test_tokens(self):
        tokens = VerificationTokens(KEY)
        token = tokens.link_token("app", "x@a.test", 1000)
        claim = tokens.check_link(token, 999)
        self.assertEqual((claim.username, claim.address), ("app", "x@a.test"))
        with self.assertRaises(VerificationError):
            tokens.check_link(token, 1001)
        with self.assertRaises(VerificationError):
            VerificationTokens(b"o" * 32).check_link(token, 999)
        payload, tag = token.split(".")
        for forged in (payload + "x." + tag, payload + "." + tag[:-2] + "AA", "a.b.c", ""):
            with self.assertRaises(VerificationError):
                tokens.check_link(forged, 999)
        self.assertEqual(tokens.txt_value("default", "A.test"), tokens.txt_value("default",
                                                                                 "a.test"))
        self.assertNotEqual(tokens.txt_value("default", "a.test"), tokens.txt_value("acme",
                                                                                    "a.test"))
        self.assertTrue(tokens.txt_value("default", "a.test").startswith(
            "mailrelay-verification="))  # fmt: skip


class FlowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mailrelay-verify-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.panel = yield Panel.start(self.tmp)
        self.addCleanup(self.panel.stop)

    @defer.inlineCallbacks
    def user(self, name):
        self.panel.directory.refresh()
        return (yield self.panel.directory.getUser(name))

    @defer.inlineCallbacks
    def test_address_confirmed_by_the_mailed_link(self):
        code, _, created = yield self.panel.call("POST", "/api/v1/users", {
            "username": "mailer", "addresses": "sales@other.test"})  # fmt: skip
        self.assertEqual(code, 201)
        self.assertEqual(created["user"]["unverified"], ["sales@other.test"])
        [sent] = created["verification"]
        user = yield self.user("mailer")
        self.assertFalse(is_verified(user, "sales@other.test"))

        # The confirmation is an ordinary queued message from the null sender.
        envelope = self.panel.spool.envelope(sent["queue_id"])
        self.assertEqual((envelope.sender, envelope.recipients, envelope.account),
                         ("", ["sales@other.test"], "default"))  # fmt: skip
        with self.panel.spool.open_body(sent["queue_id"]) as f:
            message = email.message_from_bytes(f.read())
        self.assertEqual(message["To"], "<sales@other.test>")
        self.assertEqual(message["Auto-Submitted"], "auto-generated")
        url = re.search(r"http://\S+/verify/\S+", message.get_payload()).group(0)
        path = url[len(self.panel.url):]

        # Following the link shows a button; only the POST confirms (scanners follow GETs).
        code, headers, page = yield self.panel.request("GET", path)
        self.assertEqual(code, 200)
        self.assertIn(b"sales@other.test", page)
        self.assertFalse(is_verified((yield self.user("mailer")), "sales@other.test"))
        code, _, page = yield self.panel.request("POST", path, b"")
        self.assertEqual(code, 200)
        self.assertIn(b"is confirmed", page)
        user = yield self.user("mailer")
        self.assertTrue(is_verified(user, "sales@other.test"))
        self.assertEqual(user.unverified, frozenset())
        code, _, page = yield self.panel.request("POST", path, b"")
        self.assertIn(b"nothing left to confirm", page)

        # A tampered link confirms nothing.
        code, _, _ = yield self.panel.request("POST", path[:-3] + "AAA", b"")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_link_sent_again(self):
        code, _, created = yield self.panel.call("POST", "/api/v1/users", {
            "username": "m2", "addresses": "a@other.test"})  # fmt: skip
        code, _, result = yield self.panel.call(
            "POST", "/api/v1/users/m2/senders/a@other.test/verify")  # fmt: skip
        self.assertEqual((code, result["verified"], result["method"]), (200, False, "link"))
        self.assertNotEqual(result["queue_id"], created["verification"][0]["queue_id"])
        self.assertEqual(len(self.panel.spool.queued()), 2)

    @defer.inlineCallbacks
    def test_domain_confirmed_by_its_txt_record(self):
        code, _, created = yield self.panel.call("POST", "/api/v1/users", {
            "username": "new.test"})  # fmt: skip
        [needed] = created["verification"]
        record = needed["record"]
        self.assertEqual((record["name"], record["type"]), ("new.test", "TXT"))
        verify = "/api/v1/users/new.test/senders/new.test/verify"
        code, _, result = yield self.panel.call("POST", verify)  # NXDOMAIN: not yet
        self.assertEqual((code, result["verified"]), (200, False))
        self.panel.dns.zone["new.test"] = ["TXT v=spf1 -all", "TXT mailrelay-verification=no"]
        code, _, result = yield self.panel.call("POST", verify)
        self.assertEqual((code, result["verified"]), (200, False))
        self.panel.dns.zone["new.test"].append("TXT " + record["value"])
        code, _, result = yield self.panel.call("POST", verify)
        self.assertEqual((code, result["verified"]), (200, True))
        self.assertTrue(is_verified((yield self.user("new.test")), "any@new.test"))
        # Another user of the account with an address there needs no confirmation now.
        code, _, created = yield self.panel.call("POST", "/api/v1/users", {
            "username": "bob@new.test"})  # fmt: skip
        self.assertEqual((created["user"]["unverified"], created["verification"]), ([], []))

    @defer.inlineCallbacks
    def test_dns_failure_is_503_and_changes_nothing(self):
        yield self.panel.call("POST", "/api/v1/users", {"username": "new.test"})
        self.panel.dns.zone["new.test"] = ["SERVFAIL"]
        code, _, body = yield self.panel.call(
            "POST", "/api/v1/users/new.test/senders/new.test/verify")  # fmt: skip
        self.assertEqual(code, 503, body)
        self.assertEqual((yield self.user("new.test")).unverified, {"new.test"})

    @defer.inlineCallbacks
    def test_periodic_check_verifies_published_domains(self):
        yield self.panel.call("POST", "/api/v1/users", {"username": "new.test"})
        checker = DomainChecker(self.panel.services, 600, Clock())
        self.assertEqual((yield defer.ensureDeferred(checker.check())), 0)
        value = self.panel.verifier.tokens.txt_value("default", "new.test")
        self.panel.dns.zone["new.test"] = ["TXT " + value]
        self.assertEqual((yield defer.ensureDeferred(checker.check())), 1)
        self.assertEqual((yield self.user("new.test")).unverified, frozenset())

    @defer.inlineCallbacks
    def test_scope_change_through_the_panel_and_admin(self):
        from mailrelay.directory.filedir import UserStore

        yield self.panel.call("PATCH", "/api/v1/users/webapp", {"domains": "shop.test;new.test"})
        self.assertEqual((yield self.user("webapp")).unverified, {"new.test"})
        # mailrelay-admin taking new.test out and putting it back: verified implicitly.
        store = UserStore(self.panel.config.directory.file)
        with store.change():
            store.update_user("webapp", scope=Scope.parse("shop.test"))
        with store.change():
            store.update_user("webapp", scope=Scope.parse("shop.test;new.test"))
        self.assertEqual((yield self.user("webapp")).unverified, frozenset())
