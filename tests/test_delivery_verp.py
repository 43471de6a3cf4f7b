"""VERP at delivery, through the real delivery manager and client to tests/smtp_sink.py: a
message of an account with a bounce domain leaves as one transaction per recipient, each
with its own return path, and the relay's own bounces keep the null sender."""

from __future__ import annotations

import os

import test_delivery_manager
from test_delivery_manager import Base
from twisted.internet import defer, reactor

from mailrelay.bounces.store import ReturnPaths, ReturnPathStore
from mailrelay.bounces.verp import Verp

VERP = Verp(bytes(range(32)))


class VerpDeliveryTests(Base):
    features = test_delivery_manager.DurabilityTests.features  # footer and tracking on

    def return_paths(self) -> ReturnPaths:
        directory = self.mktemp()
        os.makedirs(directory)
        self.store = ReturnPathStore(os.path.join(directory, "bounces.sqlite"))
        self.addCleanup(self.store.close)
        return ReturnPaths(VERP, self.store, reactor)

    @defer.inlineCallbacks
    def test_one_transaction_and_return_path_per_recipient(self):
        self.sink.rules["gone@b.test"] = (550, "5.1.1 no such user")
        rcpts = ["a@b.test", "gone@b.test", "c@b.test"]
        queue_id = yield self.submit(rcpts, return_path="bounces.a.test")
        yield self.deliver(self.manager(max_per_host=1, return_paths=self.return_paths()),
                           queue_id)
        sent = [m for m in self.sink.messages if m.sender]
        self.assertEqual(sorted(m.recipients[0] for m in sent), ["a@b.test", "c@b.test"])
        self.assertEqual(self.sink.connections, 1)  # three transactions, one connection
        for m in sent:
            self.assertEqual(len(m.recipients), 1)
            self.assertTrue(m.sender.endswith("@bounces.a.test"), m.sender)
            path = self.store.resolve(VERP.open(m.sender))
            self.assertEqual((path.queue_id, path.recipient, path.sender, path.user),
                             (queue_id, m.recipients[0], "s@a.test", "a.test"))
        self.assertNotEqual(sent[0].sender, sent[1].sender)
        # The refused recipient's bounce goes to the client's sender, from the null sender.
        [bounce] = [m for m in self.sink.messages if not m.sender]
        self.assertEqual(bounce.recipients, ["s@a.test"])
        self.assertIn(b"gone@b.test", bounce.data)

    @defer.inlineCallbacks
    def test_without_a_bounce_domain_the_recipients_share_one_transaction(self):
        queue_id = yield self.submit(["a@b.test", "c@b.test"])
        yield self.deliver(self.manager(return_paths=self.return_paths()), queue_id)
        [m] = self.sink.messages
        self.assertEqual((m.sender, sorted(m.recipients)), ("s@a.test", ["a@b.test", "c@b.test"]))

    @defer.inlineCallbacks
    def test_a_recipient_whose_client_asked_for_dsns_keeps_its_sender(self):
        """RFC 3461: the client asked to hear from the remote servers itself."""
        queue_id = yield self.submit(["a@b.test", "c@b.test"], return_path="bounces.a.test",
                                     dsn={"a@b.test": {"notify": "SUCCESS,FAILURE"}})
        yield self.deliver(self.manager(return_paths=self.return_paths()), queue_id)
        senders = {m.recipients[0]: m.sender for m in self.sink.messages}
        self.assertEqual(senders["a@b.test"], "s@a.test")
        self.assertTrue(senders["c@b.test"].endswith("@bounces.a.test"))
        self.sink.messages.clear()
        queue_id = yield self.submit(["a@b.test"], return_path="bounces.a.test", envid="x1")
        yield self.deliver(self.manager(return_paths=self.return_paths()), queue_id)
        self.assertEqual([m.sender for m in self.sink.messages], ["s@a.test"])

    @defer.inlineCallbacks
    def test_the_null_sender_is_never_rewritten(self):
        queue_id = yield self.submit(["a@b.test"], sender="", return_path="bounces.a.test")
        yield self.deliver(self.manager(return_paths=self.return_paths()), queue_id)
        [m] = self.sink.messages
        self.assertEqual(m.sender, "")

    @defer.inlineCallbacks
    def test_personal_copies_get_return_paths_too(self):
        queue_id = yield self.submit(["a@b.test", "c@b.test"], personalize=["footer"],
                                     return_path="bounces.a.test")
        yield self.deliver(self.manager(features=self.features(),
                                        return_paths=self.return_paths()), queue_id)
        self.assertEqual(len(self.sink.messages), 2)
        for m in self.sink.messages:
            self.assertIn(b"unsubscribe", m.data.lower())
            self.assertEqual(self.store.resolve(VERP.open(m.sender)).recipient,
                             m.recipients[0])
