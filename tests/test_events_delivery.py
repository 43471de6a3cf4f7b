"""What delivery reports (mailrelay/events.py): per recipient of a user's message, each
attempt's outcome (message.delivered, deferred, bounced hard or soft, expired) with the
next hop's reply, and the recipients left out as suppressed; the relay's own DSNs report
nothing. The real queue runner, spool and SMTP sink on loopback, as
tests/test_delivery_manager.py runs them."""

from __future__ import annotations

import os

from event_list import EventList
from test_delivery_manager import Base
from twisted.internet import defer, reactor

from mailrelay.features.hooks import MessageFeatures
from mailrelay.features.stats import StatsRecorder, StatsStore
from mailrelay.features.suppressions import Reason, SuppressionStore

SUBMITTED = {"sender": "s@a.test", "auth_method": "password", "client_ip": "127.0.0.1"}
# Twisted's server (tests/smtp_sink.py) gives no enhanced status at the end of DATA.
DELIVERED = {"remote_reply": "250 Delivery in progress",
             "reply": {"code": 250, "status": "2.0.0", "text": "Delivery in progress"}}


class DeliveryEventTests(Base):
    def features(self) -> MessageFeatures:
        directory = self.mktemp()
        os.makedirs(directory)
        self.suppressions = SuppressionStore(os.path.join(directory, "suppressions.sqlite"))
        stats = StatsStore(os.path.join(directory, "stats.sqlite"))
        self.addCleanup(self.suppressions.close)
        self.addCleanup(stats.close)
        return MessageFeatures(reactor, self.suppressions, StatsRecorder(stats, reactor))

    def without_remote(self, events: EventList, kind: str) -> list:
        """The events of ``kind`` as (recipient, data), the remote checked and left out."""
        out = []
        for account, user, data in events.of(kind):
            self.assertEqual((account, user), ("default", "a.test"))
            self.assertEqual(data.pop("remote"), "127.0.0.1")
            out.append((data.pop("recipient"), data))
        return out

    @defer.inlineCallbacks
    def test_each_outcome_with_the_next_hops_reply(self):
        self.sink.rules.update({"later@b.test": (451, "4.2.0 greylisted"),
                                "gone@b.test": (550, "5.1.1 no such user here"),
                                "full@b.test": (552, "5.2.2 mailbox full")})
        events = EventList()
        manager = self.manager(retry_first=60, events=events)
        queue_id = yield self.submit(["ok@b.test", "later@b.test", "gone@b.test",
                                      "full@b.test"], auth_method="password")
        yield self.deliver(manager, queue_id)
        self.sink.rules["later@b.test"] = None
        self.advance(60)
        yield manager.idle()
        self.assertEqual(len(self.sink.messages), 3)  # ok, the bounce, later
        first = {**SUBMITTED, "queue_id": queue_id, "attempt": 1, "tls": False,
                 "source": "delivery"}
        self.assertEqual(self.without_remote(events, "message.delivered"), [
            ("ok@b.test", {**first, **DELIVERED}),
            ("later@b.test", {**first, "attempt": 2, **DELIVERED}),
        ])
        self.assertEqual(self.without_remote(events, "message.deferred"), [
            ("later@b.test", {**first, "remote_reply": "451 4.2.0 greylisted", "reply": {
                "code": 451, "status": "4.2.0", "text": "greylisted"}}),
        ])
        self.assertEqual(self.without_remote(events, "message.bounced"), [
            ("gone@b.test", {**first, "bounce": "hard", "expired": False,
                             "remote_reply": "550 5.1.1 no such user here", "reply": {
                                 "code": 550, "status": "5.1.1",
                                 "text": "no such user here"}}),
            ("full@b.test", {**first, "bounce": "soft", "expired": False,
                             "remote_reply": "552 5.2.2 mailbox full", "reply": {
                                 "code": 552, "status": "5.2.2", "text": "mailbox full"}}),
        ])
        self.assertEqual(len(events), 5)  # the bounce (no user: the relay's) reports nothing

    @defer.inlineCallbacks
    def test_expiry_is_a_soft_bounce(self):
        self.sink.rules["slow@b.test"] = (451, "4.4.5 try later")
        events = EventList()
        lifetime = 5 * 86400
        queue_id = yield self.submit(["slow@b.test"],
                                     received_at=self.clock.seconds() - lifetime + 10)
        manager = self.manager(lifetime=lifetime, events=events)
        yield self.deliver(manager, queue_id)
        self.advance(10)
        yield manager.idle()
        # The attempt that meets the expiry reports the bounce alone, with the last reply.
        [deferred, expired] = events
        self.assertEqual((deferred[0], deferred[3]["attempt"]), ("message.deferred", 1))
        kind, account, user, data = expired
        self.assertEqual((kind, account, user), ("message.bounced", "default", "a.test"))
        self.assertEqual((data["bounce"], data["expired"], data["attempt"]), ("soft", True, 2))
        self.assertEqual(data["reply"]["status"], "4.4.7")
        self.assertIn("last error: 451 4.4.5 try later", data["reply"]["text"])

    @defer.inlineCallbacks
    def test_a_suppressed_recipient_is_reported_not_sent(self):
        events = EventList()
        features = self.features()
        self.suppressions.add("Unsub@b.test", "default", "a.test", Reason.UNSUBSCRIBE)
        manager = self.manager(events=events, features=features)
        queue_id = yield self.submit(["unsub@b.test", "ok@b.test"])
        yield self.deliver(manager, queue_id)
        self.assertEqual([m.recipients for m in self.sink.messages], [["ok@b.test"]])
        self.assertEqual([(k, data["recipient"]) for k, _, _, data in events],
                         [("message.delivered", "ok@b.test"),
                          ("message.suppressed", "unsub@b.test")])
        self.assertEqual(events.of("message.suppressed")[0][2],
                         {"queue_id": queue_id, "sender": "s@a.test",
                          "client_ip": "127.0.0.1", "recipient": "unsub@b.test"})
