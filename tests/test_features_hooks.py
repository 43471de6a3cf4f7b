"""The calls the spool and delivery make: archive and counts at acceptance, suppressed
recipients filtered, per-recipient copies, results and hard bounces."""

from __future__ import annotations

import email
import io
import shutil
import sqlite3
import tempfile
from email.policy import default

import mime_samples as s
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.features.archive import Archive
from mailrelay.features.envelope import user_fields
from mailrelay.features.hooks import MessageFeatures
from mailrelay.features.links import Links
from mailrelay.features.personalize import Personalizer
from mailrelay.features.stats import Event, StatsRecorder, StatsStore
from mailrelay.features.suppressions import Reason, SuppressionStore
from mailrelay.features.tokens import TokenSigner
from mailrelay.model import Envelope, SmtpUser

USER = SmtpUser(
    "news@acme.example",
    account="acme",
    archive=True,
    unsubscribe_footer=True,
    open_tracking=True,
    click_tracking=True,
)
PLAIN_USER = SmtpUser("app", account="acme")


def envelope(user: SmtpUser = USER, recipients=("a@example.org", "b@example.org")) -> Envelope:
    return Envelope(
        "30193a2b4c5d6e7f8a9b",
        "news@acme.example",
        list(recipients),
        user.username,
        user.account,
        "192.0.2.1",
        "client",
        True,
        1_795_000_000.0,
        **{k: v for k, v in user_fields(user, list(recipients)).items() if k != "recipients"},
    )


def opener(data: bytes):
    return lambda: io.BytesIO(data)


class MessageFeaturesTests(unittest.TestCase):
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.suppressions = SuppressionStore(f"{directory}/suppressions.sqlite")
        self.stats_store = StatsStore(f"{directory}/stats.sqlite")
        self.addCleanup(self.suppressions.close)
        self.addCleanup(self.stats_store.close)
        self.stats = StatsRecorder(self.stats_store, reactor)
        self.archive = Archive(f"{directory}/archive")
        links = Links(TokenSigner(b"k" * 32), "https://track.example")
        self.features = MessageFeatures(
            reactor,
            self.suppressions,
            self.stats,
            Personalizer(links),
            self.archive,
            inline_size=1000,
        )

    @defer.inlineCallbacks
    def totals(self, user=USER):
        yield self.stats.flush()
        return self.stats_store.query("acme", user.username)

    @defer.inlineCallbacks
    def test_accepted_archives_and_counts(self):
        opened = []

        def open_body():
            opened.append(1)
            return io.BytesIO(s.plain())

        yield self.features.accepted(envelope(), USER, open_body)
        yield self.features.accepted(envelope(PLAIN_USER), PLAIN_USER, open_body)
        self.assertEqual(len(opened), 1)  # no archive, no file opened
        (entry,) = self.archive.list(USER.username)
        self.assertEqual(entry.subject, "Café news")
        self.assertEqual(self.archive.list("app"), [])  # archiving off for that user
        self.features.rejected(USER)
        totals = yield self.totals()
        self.assertEqual((totals["accepted"], totals["rejected"]), (1, 1))

    @defer.inlineCallbacks
    def test_archive_failure_is_logged_not_raised(self):
        def gone():
            raise KeyError("30193a2b4c5d6e7f8a9b")

        yield self.features.accepted(envelope(), USER, gone)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self.archive.list(USER.username), [])

    @defer.inlineCallbacks
    def test_suppressed_recipients_filtered(self):
        self.suppressions.add("B@example.org", "acme", USER.username, Reason.UNSUBSCRIBE)
        deliver, suppressed = yield self.features.filter_recipients(
            envelope(), ["a@example.org", "b@example.org"]
        )
        self.assertEqual((deliver, suppressed), (["a@example.org"], ["b@example.org"]))
        # Another account's user is not affected by acme's list.
        other = Envelope("q", "x@o.example", ["b@example.org"], "x", "other", None, None, False, 0)
        deliver, suppressed = yield self.features.filter_recipients(other, ["b@example.org"])
        self.assertEqual((deliver, suppressed), (["b@example.org"], []))
        totals = yield self.totals()
        self.assertEqual(totals["suppressed"], 1)

    @defer.inlineCallbacks
    def test_unreadable_list_is_an_error_not_a_pass(self):
        self.suppressions.close()
        with self.assertRaises(sqlite3.ProgrammingError):  # a closed database
            yield self.features.filter_recipients(envelope(), ["a@example.org"])

    @defer.inlineCallbacks
    def test_copies_per_recipient(self):
        self.assertTrue(self.features.needs_copies(envelope()))
        self.assertFalse(self.features.needs_copies(envelope(PLAIN_USER)))
        for data in (s.alternative(), s.mixed_with_attachments()):  # inline, then in a thread
            parsed = yield self.features.prepare(envelope(), opener(data))
            a = yield self.features.copy_for(parsed, envelope(), "a@example.org")
            b = yield self.features.copy_for(parsed, envelope(), "b@example.org")
            for copy, rcpt in ((a, "a@example.org"), (b, "b@example.org")):
                self.assertTrue(copy.changed)
                with copy.open() as f:
                    sent = f.read()
                self.assertEqual(len(sent), copy.size)
                msg = email.message_from_bytes(sent, policy=default)
                self.assertIn("/u/", msg["List-Unsubscribe"])
                plain = msg.get_body(("plain",)).get_content()
                self.assertIn(f"at {rcpt}, unsubscribe", plain)
                self.assertIn("/o/", msg.get_body(("html",)).get_content())
        signed = yield self.features.prepare(envelope(), opener(s.smime_signed()))
        copy = yield self.features.copy_for(signed, envelope(), "a@example.org")
        self.assertEqual((copy.to_bytes(), copy.changed), (s.smime_signed(), False))

    def test_no_copies_without_the_tracking_endpoint(self):
        off = MessageFeatures(reactor, self.suppressions, self.stats)
        self.assertFalse(off.needs_copies(envelope()))
        self.assertFalse(off.needs_copies(envelope()))  # warned once per user
        self.assertEqual(off._warned, {USER.username})

    @defer.inlineCallbacks
    def test_results_and_hard_bounces(self):
        env = envelope()
        yield self.features.result(env, "a@example.org", Event.DELIVERED)
        yield self.features.result(env, "b@example.org", Event.DEFERRED)
        yield self.features.result(env, "b@example.org", Event.BOUNCED, "5.1.1")
        yield self.features.result(env, "c@example.org", Event.BOUNCED, "5.7.1")  # policy
        totals = yield self.totals()
        self.assertEqual((totals["delivered"], totals["deferred"], totals["bounced"]), (1, 1, 2))
        (entry,) = self.suppressions.list("acme", USER.username)
        self.assertEqual((entry.address, entry.reason), ("b@example.org", Reason.HARD_BOUNCE))
