"""What the bounce listener reports (mailrelay/events.py): a DSN that comes back later to a
VERP return path as message.bounced or message.deferred (source ``dsn``), an ARF
complaint as message.complained; reports sent with smtplib to the real listener over
loopback, with the real return-path store, suppression list and spool."""

from __future__ import annotations

import os
import smtplib
import time

from bounce_samples import arf_complaint, postfix_dsn
from event_list import EventList
from harness import TempPaths
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailrelay.bounces.feed import BounceFeed
from mailrelay.bounces.listener import BounceFactory
from mailrelay.bounces.store import ReturnPathStore
from mailrelay.bounces.verp import Verp
from mailrelay.features.hooks import MessageFeatures
from mailrelay.features.stats import StatsRecorder, StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.model import Envelope
from mailrelay.spool.spool import Spool

RECIPIENTS = ["gone@example.net", "slow@example.net", "angry@example.net"]


def send_reports(port: int, reports: list[tuple[str, bytes]]) -> list[int]:
    """Each (VERP address, report) in a transaction of its own; the end-of-data codes."""
    codes = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.example.net", timeout=20) as c:
        c.ehlo()
        for verp, data in reports:
            c.mail("")
            c.rcpt(verp)
            codes.append(c.data(data)[0])
    return codes


class BounceEventTests(TempPaths, unittest.TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.spool = Spool(os.path.join(directory, "spool"), reactor=reactor, min_free_bytes=0)
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.paths = ReturnPathStore(os.path.join(directory, "bounces.sqlite"))
        self.suppressions = SuppressionStore(os.path.join(directory, "suppressions.sqlite"))
        stats = StatsStore(os.path.join(directory, "stats.sqlite"))
        for store in (self.paths, self.suppressions, stats):
            self.addCleanup(store.close)
        features = MessageFeatures(reactor, self.suppressions, StatsRecorder(stats, reactor))
        self.events = EventList()
        feed = BounceFeed(reactor, features, self.spool, self.paths, "relay.test",
                          "postmaster@relay.test", events=self.events)
        self.verp = Verp(bytes(range(32)))
        port = reactor.listenTCP(0, BounceFactory(self.verp, feed, "relay.test"),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    @defer.inlineCallbacks
    def test_bounces_delays_and_complaints_are_reported(self):
        envelope = Envelope(id="3019aa5c0e2f1a2b3c", sender="news@doe.test",
                            recipients=RECIPIENTS, user="news@doe.test", account="acme",
                            client_ip="127.0.0.1", helo="client", tls=True,
                            received_at=time.time(), return_path="bounces.doe.test")
        self.paths.record(envelope)
        gone, slow, angry = (self.verp.address(envelope, r) for r in RECIPIENTS)
        codes = yield deferToThread(send_reports, self.port, [
            (gone, postfix_dsn(gone, RECIPIENTS[0])),
            (slow, postfix_dsn(slow, RECIPIENTS[1], "4.2.2", "delayed")),
            (angry, arf_complaint(angry, RECIPIENTS[2])),
        ])
        self.assertEqual(codes, [250, 250, 250])
        about = {"queue_id": envelope.id, "sender": "news@doe.test"}
        remote = {"remote": "store.example.net", "source": "dsn"}
        self.assertEqual(self.events, [
            ("message.bounced", "acme", "news@doe.test", {
                **about, **remote, "recipient": RECIPIENTS[0], "bounce": "hard",
                "remote_reply": "550 5.1.1 <gone@example.net>: Recipient address rejected: "
                                "User unknown in virtual mailbox table",
                "reply": {"code": 550, "status": "5.1.1", "text": "<gone@example.net>: "
                          "Recipient address rejected: User unknown in virtual mailbox "
                          "table"}}),
            ("message.deferred", "acme", "news@doe.test", {
                **about, **remote, "recipient": RECIPIENTS[1],
                "remote_reply": "450 4.2.2 <slow@example.net>: Recipient address rejected: "
                                "User unknown in virtual mailbox table",
                "reply": {"code": 450, "status": "4.2.2", "text": "<slow@example.net>: "
                          "Recipient address rejected: User unknown in virtual mailbox "
                          "table"}}),
            ("message.complained", "acme", "news@doe.test", {
                **about, "recipient": RECIPIENTS[2], "feedback_type": "abuse"}),
        ])
        # The hard bounce and the complaint put their recipients on the list first.
        self.assertEqual(sorted((e.address, e.reason) for e in self.suppressions.list("acme")),
                         [("angry@example.net", "complaint"),
                          ("gone@example.net", "hard-bounce")])
