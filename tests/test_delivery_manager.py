"""The queue runner with a real spool, real SMTP sinks and a real DNS server on loopback.

Network I/O runs on the reactor; the manager's scheduling (retries, expiry, the control
directory) runs on a task.Clock the tests advance.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import threading
import time

import certs
from dns_server import DNSServer
from harness import TempPaths
from smtp_sink import SMTPSink
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.delivery import manager as manager_module
from mailrelay.delivery.client import SMALL_BODY
from mailrelay.delivery.manager import DeliveryManager
from mailrelay.delivery.router import Hop, MXRouter, SmarthostRouter, make_resolver
from mailrelay.features.hooks import MessageFeatures
from mailrelay.features.links import Links
from mailrelay.features.personalize import Personalizer
from mailrelay.features.stats import StatsRecorder, StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.features.tokens import TokenSigner
from mailrelay.model import Envelope
from mailrelay.spool.spool import Spool
from mailrelay.spool.state import RecipientStatus

BODY = (b"Received: from client (127.0.0.1) by relay.test\r\n"
        b"From: Sender <s@a.test>\r\nTo: r@b.test\r\nSubject: hello there\r\n"
        b"Message-ID: <1@a.test>\r\n\r\nFirst line\r\n.dot line\r\n\r\nlast\r\n")


class CountingSpool(Spool):
    """The real spool, recording which envelopes it reads (the messages loaded) and which
    bodies are opened on the reactor."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.read: list[str] = []  # appended from the manager's loader threads
        self.opened_on_reactor: list[str] = []

    def envelope(self, queue_id):
        self.read.append(queue_id)
        return super().envelope(queue_id)

    def open_body(self, queue_id):
        if threading.current_thread() is threading.main_thread():
            self.opened_on_reactor.append(queue_id)
        return super().open_body(queue_id)


class Base(TempPaths, unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.directory = os.path.join(self.mktemp(), "spool")
        self.spool = self.open_spool()
        self.sink = SMTPSink()
        self.sink.listen()
        self.addCleanup(self.sink.stop)

    def open_spool(self) -> CountingSpool:
        spool = CountingSpool(self.directory, reactor=reactor)
        spool.open()
        self.addCleanup(spool.close)
        return spool

    def manager(self, router=None, spool=None, **kw) -> DeliveryManager:
        router = router or SmarthostRouter(Hop("127.0.0.1", self.sink.port, tls="none"))
        kw.setdefault("retry_first", 60.0)
        manager = DeliveryManager(spool or self.spool, router, reactor, clock=self.clock,
                                  hostname="relay.test", connect_timeout=5,
                                  command_timeout=10, **kw)
        self.addCleanup(manager.stop)
        return manager

    def submit(self, recipients=("r@b.test",), sender="s@a.test", body=BODY, priority=3,
               received_at=None, **kw) -> defer.Deferred:
        envelope = Envelope(id="", sender=sender, recipients=list(recipients), user="a.test",
                            account="default", client_ip="127.0.0.1", helo="client",
                            tls=True, received_at=received_at or self.clock.seconds(),
                            priority=priority, **kw)
        incoming = self.spool.create(envelope)
        incoming.write(body)
        return incoming.commit()

    @defer.inlineCallbacks
    def submit_many(self, count: int, prefix: str = "r"):
        ids = []
        for i in range(count):  # one after another: ids in submission order
            ids.append((yield self.submit([f"{prefix}{i}@b.test"])))
        return ids

    @defer.inlineCallbacks
    def deliver(self, manager: DeliveryManager, *queue_ids: str):
        """Start (or feed) the manager and wait until it has nothing left to do now."""
        if not manager._running:
            yield manager.start()
        for queue_id in queue_ids:
            manager.enqueue(queue_id)
        yield manager.idle()

    def advance(self, seconds: float):
        self.clock.advance(seconds)


def dsn_parts(data: bytes):
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    assert message.get_content_type() == "multipart/report", message.get_content_type()
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = message.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    per_message, *per_recipient = status.get_payload()
    return message, per_message, per_recipient, headers.get_payload()


class DeliveryTests(Base):
    @defer.inlineCallbacks
    def test_mx_delivery_headers_and_bytes_intact(self):
        dns = DNSServer({"b.test": ["MX 10 mx1.b.test", "MX 20 mx2.b.test"],
                         "mx1.b.test": ["A 127.0.0.2"],  # nothing listens there
                         "mx2.b.test": ["A 127.0.0.1"]})
        self.addCleanup(dns.stop)
        router = MXRouter(make_resolver([dns.listen()]), port=self.sink.port, allow_local=True)
        logged = []
        manager = self.manager(router, on_result=lambda *a: logged.append(a))
        queue_id = yield self.submit(["r@b.test", "q@b.test"])
        yield self.deliver(manager, queue_id)
        [message] = self.sink.messages
        self.assertEqual(message.data, BODY)
        self.assertEqual((message.sender, message.recipients), ("s@a.test",
                                                                ["r@b.test", "q@b.test"]))
        self.assertEqual(self.spool.queued(), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "state")), [])
        self.assertEqual([(q, r.recipient, r.remote, status) for q, _, r, status in logged],
                         [(queue_id, "r@b.test", "mx2.b.test[127.0.0.1]", "sent"),
                          (queue_id, "q@b.test", "mx2.b.test[127.0.0.1]", "sent")])

    @defer.inlineCallbacks
    def test_small_bodies_read_ahead_large_ones_streamed(self):
        """A body up to SMALL_BODY is read with its envelope, never opened on the reactor;
        a larger one streams from the file; both arrive intact, pipelined or not."""
        big = BODY + (b"z" * 998 + b"\r\n.\r\n") * 70
        self.assertGreater(len(big), SMALL_BODY)
        for pipelining in (False, True):
            self.sink.pipelining = pipelining
            small_id = yield self.submit(["r@b.test"])
            big_id = yield self.submit(["r@b.test", "q@b.test"], body=big)
            manager = self.manager()
            yield self.deliver(manager, small_id, big_id)
            yield manager.stop()
            self.assertEqual(sorted(m.data for m in self.sink.messages), sorted([BODY, big]))
            self.assertEqual(self.spool.opened_on_reactor, [big_id])
            self.assertEqual(manager.loader.preloaded, 0)
            self.sink.messages, self.spool.opened_on_reactor = [], []

    @defer.inlineCallbacks
    def test_read_ahead_is_bounded(self):
        self.patch(manager_module, "BODY_BUDGET", 1)  # room for one body at a time
        ids = yield self.submit_many(2)
        manager = self.manager()
        yield self.deliver(manager)
        self.assertEqual([m.data for m in self.sink.messages], [BODY, BODY])
        self.assertEqual(self.spool.opened_on_reactor, ids[1:])
        self.assertEqual(manager.loader.preloaded, 0)

    @defer.inlineCallbacks
    def test_many_messages_over_one_connection(self):
        yield self.submit_many(15)
        yield self.deliver(self.manager())
        self.assertEqual(len(self.sink.messages), 15)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_connections_per_host_are_bounded(self):
        yield self.submit_many(120)
        yield self.deliver(self.manager(max_per_host=3, max_messages_per_connection=10))
        self.assertEqual(len(self.sink.messages), 120)
        self.assertLessEqual(self.sink.most_connections, 3)
        self.assertGreaterEqual(self.sink.connections, 12)  # 10 messages per connection

    @defer.inlineCallbacks
    def test_4xx_then_recovery_on_retry(self):
        self.sink.rules["r@b.test"] = (451, "4.2.0 greylisted")
        manager = self.manager(retry_first=60)
        queue_id = yield self.submit(["r@b.test", "ok@b.test"])
        yield self.deliver(manager, queue_id)
        state = self.spool.read_state(queue_id)
        self.assertEqual(state.attempts, 1)
        self.assertEqual(state.recipients["r@b.test"].status, RecipientStatus.PENDING)
        self.assertEqual(state.recipients["ok@b.test"].status, RecipientStatus.SENT)
        self.assertEqual(state.last_error, "451 4.2.0 greylisted")
        delay = state.next_attempt - self.clock.seconds()
        self.assertTrue(54 <= delay <= 60, delay)
        self.sink.rules["r@b.test"] = None
        self.advance(30)  # not due yet
        yield manager.idle()
        self.assertEqual(len(self.sink.messages), 1)
        self.advance(30)
        yield manager.idle()
        self.assertEqual([m.recipients for m in self.sink.messages],
                         [["ok@b.test"], ["r@b.test"]])
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_backoff_doubles_up_to_the_cap(self):
        self.sink.default = (451, "4.3.2 busy")
        manager = self.manager(retry_first=60, retry_max=200)
        queue_id = yield self.submit()
        yield self.deliver(manager, queue_id)
        delays = []
        for _ in range(4):
            state = self.spool.read_state(queue_id)
            delays.append(state.next_attempt - self.clock.seconds())
            self.advance(delays[-1])
            yield manager.idle()
        self.assertEqual(self.spool.read_state(queue_id).attempts, 5)
        for delay, expected in zip(delays, [60, 120, 200, 200], strict=True):
            self.assertTrue(0.9 * expected <= delay <= expected, (delay, expected))

    @defer.inlineCallbacks
    def test_5xx_produces_a_dsn_for_the_sender(self):
        self.sink.rules["gone@b.test"] = (550, "5.1.1 no such user here")
        queue_id = yield self.submit(["gone@b.test", "ok@b.test"])
        yield self.deliver(self.manager(), queue_id)
        original, bounce = self.sink.messages
        self.assertEqual(original.recipients, ["ok@b.test"])
        self.assertEqual((bounce.sender, bounce.recipients), ("", ["s@a.test"]))
        message, per_message, [rcpt], headers = dsn_parts(bounce.data)
        self.assertEqual(message["To"], "<s@a.test>")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(per_message["Reporting-MTA"], "dns; relay.test")
        self.assertIsNotNone(per_message["Arrival-Date"])
        self.assertEqual(rcpt["Final-Recipient"], "rfc822; gone@b.test")
        self.assertEqual(rcpt["Action"], "failed")
        self.assertEqual(rcpt["Status"], "5.1.1")
        self.assertEqual(rcpt["Remote-MTA"], "dns; 127.0.0.1")
        self.assertEqual(rcpt["Diagnostic-Code"], "smtp; 550 5.1.1 no such user here")
        self.assertIn("Subject: hello there", headers)
        self.assertNotIn("First line", headers)
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_dsn_goes_to_bounce_to(self):
        self.sink.rules["gone@b.test"] = (554, "no")
        queue_id = yield self.submit(["gone@b.test"], bounce_to="notices@a.test")
        yield self.deliver(self.manager(), queue_id)
        [bounce] = self.sink.messages
        self.assertEqual(bounce.recipients, ["notices@a.test"])
        self.assertEqual(dsn_parts(bounce.data)[2][0]["Status"], "5.0.0")

    @defer.inlineCallbacks
    def test_notify_success_follows_bounce_to_and_its_off_switch(self):
        """The sink offers no DSN: NOTIFY=SUCCESS gets a "relayed" notice, sent where the
        user's bounce notifications go, and none when they are off."""
        asked = {"ok@b.test": {"notify": "SUCCESS"}}
        to_notices = yield self.submit(["ok@b.test"], bounce_to="notices@a.test", dsn=asked)
        nowhere = yield self.submit(["ok@b.test"], bounce_to="", dsn=asked)
        yield self.deliver(self.manager(), to_notices, nowhere)
        notices = [m for m in self.sink.messages if m.sender == ""]
        self.assertEqual([m.recipients for m in notices], [["notices@a.test"]])
        [rcpt] = dsn_parts(notices[0].data)[2]
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("relayed", "2.0.0"))
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_a_hop_offering_dsn_gets_the_request_and_sends_the_notice_itself(self):
        self.sink.dsn = True
        queue_id = yield self.submit(["ok@b.test"], ret="HDRS", envid="e+1",
                                     dsn={"ok@b.test": {"notify": "SUCCESS"}})
        yield self.deliver(self.manager(), queue_id)
        [message] = self.sink.messages
        self.assertEqual((message.mail_params, message.rcpt_params),
                         ("RET=HDRS ENVID=e+2B1", {"ok@b.test": "NOTIFY=SUCCESS"}))

    @defer.inlineCallbacks
    def test_bounce_of_a_null_sender_is_dropped(self):
        self.sink.rules["gone@b.test"] = (550, "5.1.1 unknown")
        queue_id = yield self.submit(["gone@b.test"], sender="")
        yield self.deliver(self.manager(), queue_id)
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_a_failing_dsn_is_dropped_not_looped(self):
        self.sink.default = (550, "5.1.1 nobody here")
        queue_id = yield self.submit(["gone@b.test"])
        yield self.deliver(self.manager(), queue_id)
        # the original bounced, its DSN bounced too and was dropped
        self.assertEqual(self.sink.transactions, 2)
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_bounce_kept_until_it_can_be_queued(self):
        self.sink.rules["gone@b.test"] = (550, "5.1.1 unknown")
        queue_id = yield self.submit(["gone@b.test"])
        self.spool.min_free_bytes = 2**62  # the disk is "full": no new message, no DSN
        manager = self.manager(retry_first=60)
        yield self.deliver(manager, queue_id)
        state = self.spool.read_state(queue_id)
        self.assertEqual(state.recipients["gone@b.test"].status, RecipientStatus.PENDING)
        self.assertAlmostEqual(state.next_attempt, self.clock.seconds() + 60, places=3)
        self.spool.min_free_bytes = 0
        self.advance(60)
        yield manager.idle()
        [bounce] = self.sink.messages
        self.assertEqual(bounce.recipients, ["s@a.test"])
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_lifetime_expiry_bounces(self):
        self.sink.rules["slow@b.test"] = (451, "4.4.5 try later")
        lifetime = 5 * 86400
        queue_id = yield self.submit(["slow@b.test"],
                                     received_at=self.clock.seconds() - lifetime + 10)
        manager = self.manager(lifetime=lifetime)
        yield self.deliver(manager, queue_id)
        state = self.spool.read_state(queue_id)
        self.assertAlmostEqual(state.next_attempt, self.clock.seconds() + 10, places=3)
        self.assertEqual(self.sink.messages, [])
        self.advance(10)
        yield manager.idle()
        [bounce] = self.sink.messages
        _, _, [rcpt], _ = dsn_parts(bounce.data)
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("failed", "4.4.7"))
        self.assertIn("4.4.5 try later", rcpt["Diagnostic-Code"])
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_delay_warning_sent_once(self):
        self.sink.rules["slow@b.test"] = (451, "4.4.5 try later")
        queue_id = yield self.submit(["slow@b.test"], received_at=self.clock.seconds() - 200)
        manager = self.manager(delay_warning=100)
        yield self.deliver(manager, queue_id)
        [warning] = self.sink.messages
        message, _, [rcpt], _ = dsn_parts(warning.data)
        self.assertEqual(rcpt["Action"], "delayed")
        self.assertIsNotNone(rcpt["Will-Retry-Until"])
        self.assertIn("Delayed", message["Subject"])
        self.advance(60)
        yield manager.idle()
        self.assertEqual(self.spool.read_state(queue_id).attempts, 2)
        self.assertEqual(len(self.sink.messages), 1)

    @defer.inlineCallbacks
    def test_unroutable_domain_bounces(self):
        dns = DNSServer({"a.test": ["A 127.0.0.1"], "null.test": ["MX 0 ."]})
        self.addCleanup(dns.stop)
        router = MXRouter(make_resolver([dns.listen()]), port=self.sink.port, allow_local=True)
        queue_id = yield self.submit(["x@nowhere.test", "y@null.test"])
        yield self.deliver(self.manager(router), queue_id)
        [bounce] = self.sink.messages
        _, _, rcpts, _ = dsn_parts(bounce.data)
        self.assertEqual({r["Final-Recipient"]: r["Status"] for r in rcpts},
                         {"rfc822; x@nowhere.test": "5.1.2", "rfc822; y@null.test": "5.1.10"})

    @defer.inlineCallbacks
    def test_dead_destination_defers_everything_waiting(self):
        port = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        closed = port.getHost().port
        yield port.stopListening()
        ids = yield self.submit_many(5)
        manager = self.manager(SmarthostRouter(Hop("127.0.0.1", closed, tls="none")))
        yield self.deliver(manager)
        for queue_id in ids:
            state = self.spool.read_state(queue_id)
            self.assertEqual(state.attempts, 1)
            self.assertIn("connection refused", state.last_error)
        self.assertEqual(sorted(self.spool.queued()), sorted(ids))


class SmarthostTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.ca = certs.TestCA(self.mktemp())
        cert, key = self.ca.issue("localhost")
        self.tls_sink = SMTPSink(tls_cert=str(cert), tls_key=str(key), auth={"relay": "pw"},
                                 require_auth=True)
        self.tls_sink.listen()
        self.addCleanup(self.tls_sink.stop)

    def smarthost(self, port: int) -> SmarthostRouter:
        return SmarthostRouter(Hop("localhost", port, tls="required", verify=True,
                                   username="relay", password="pw",
                                   ca_file=str(self.ca.cert_path)))

    @defer.inlineCallbacks
    def test_starttls_auth_and_a_smuggling_body_in_one_transaction(self):
        head = b".\r\nSubject: dots\r\n\r\n"
        body = (head + b"x" * (2**14 - len(head) - 2) + b"\r\n.\r\nMAIL FROM:<ceo@victim.test>"
                b"\r\nRCPT TO:<x@victim.test>\r\nDATA\r\nSMUGGLED\r\n.\r\n..\r\n")
        queue_id = yield self.submit(body=body)
        yield self.deliver(self.manager(self.smarthost(self.tls_sink.port)), queue_id)
        [message] = self.tls_sink.messages
        self.assertEqual((message.data, message.tls, message.user), (body, True, "relay"))
        self.assertEqual(self.tls_sink.transactions, 1)

    @defer.inlineCallbacks
    def test_tls_required_without_starttls_is_deferred(self):
        queue_id = yield self.submit()
        yield self.deliver(self.manager(self.smarthost(self.sink.port)), queue_id)
        state = self.spool.read_state(queue_id)
        self.assertEqual(state.recipients["r@b.test"].status, RecipientStatus.PENDING)
        self.assertIn("STARTTLS", state.last_error)
        self.assertEqual(self.sink.transactions, 0)


class QueueTests(Base):
    @defer.inlineCallbacks
    def test_priority_one_before_a_backlog(self):
        backlog = yield self.submit_many(40, "bulk")
        self.advance(1)
        urgent = yield self.submit(["urgent@b.test"], priority=1)
        self.assertGreater(urgent[1:], backlog[-1][1:])  # the newest message
        yield self.deliver(self.manager(max_concurrency=1, prefetch=10))
        order = [m.recipients[0] for m in self.sink.messages]
        self.assertEqual(order[0], "urgent@b.test")
        self.assertEqual(order[1:], [f"bulk{i}@b.test" for i in range(40)])

    @defer.inlineCallbacks
    def test_priority_holds_when_the_first_read_is_the_slowest(self):
        """Messages are read in parallel trips; a later trip coming back first does not
        overtake the urgent message in the first."""
        backlog = yield self.submit_many(manager_module.LOAD_BATCH + 8, "bulk")
        urgent = yield self.submit(["urgent@b.test"], priority=1)
        envelope = self.spool.envelope

        def slow(queue_id):
            if queue_id == urgent:
                time.sleep(0.2)  # in the loader thread: its trip comes back last
            return envelope(queue_id)

        self.spool.envelope = slow
        yield self.deliver(self.manager(max_concurrency=1))
        order = [m.recipients[0] for m in self.sink.messages]
        self.assertEqual(order, ["urgent@b.test"] + [f"bulk{i}@b.test"
                                                     for i in range(len(backlog))])

    @defer.inlineCallbacks
    def test_restart_resumes_without_resending(self):
        self.sink.rules["later@b.test"] = (451, "4.2.0 later")
        queue_id = yield self.submit(["ok@b.test", "later@b.test"])
        first = self.manager()
        yield self.deliver(first, queue_id)
        yield first.stop()
        self.sink.rules["later@b.test"] = None
        self.advance(3600)
        yield self.deliver(self.manager(spool=self.open_spool()))
        self.assertEqual([m.recipients for m in self.sink.messages],
                         [["ok@b.test"], ["later@b.test"]])
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_queued_message_delivered_once_after_restart(self):
        yield self.submit()  # committed while no delivery ran (a crash, or enabled = no)
        yield self.deliver(self.manager(spool=self.open_spool()))
        yield self.deliver(self.manager(spool=self.open_spool()))
        self.assertEqual(len(self.sink.messages), 1)

    @defer.inlineCallbacks
    def test_a_message_gone_before_its_load_spares_the_rest(self):
        ids = yield self.submit_many(manager_module.LOAD_BATCH + 8)  # two trips to a thread
        manager = self.manager()
        yield manager.start()  # listed and taken; read in the next reactor turn
        os.unlink(os.path.join(self.directory, "queue", ids[5]))  # removed by hand
        yield manager.idle()
        self.assertEqual(len(self.sink.messages), len(ids) - 1)
        self.assertNotIn(ids[5], self.spool.read[len(ids):])  # not tried again
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_sandboxed_never_delivered(self):
        queue_id = yield self.submit(sandboxed=True)
        manager = self.manager()
        yield self.deliver(manager, queue_id)
        manager.flush()
        self.assertFalse((yield manager.retry(queue_id)))
        yield manager.idle()
        self.assertEqual(self.sink.transactions, 0)
        self.assertEqual(self.spool.held(), [queue_id])

    @defer.inlineCallbacks
    def test_a_retry_during_an_attempt_is_not_lost(self):
        """A retry that comes while the message is being delivered (its result in, its
        state not yet saved) brings one more attempt at once, not at the next backoff."""
        self.sink.default = (451, "4.2.0 later")
        queue_id = yield self.submit(["r@b.test"])
        answers = []

        def on_result(*_):
            if not answers:  # the admin fixes the next hop, then asks for a retry
                self.sink.default = None
                answers.append(manager.retry(queue_id))

        manager = self.manager(retry_first=3600, on_result=on_result)
        yield self.deliver(manager)
        self.assertTrue((yield answers[0]))
        self.assertEqual([m.recipients for m in self.sink.messages], [["r@b.test"]])
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_retry_and_flush(self):
        self.sink.default = (451, "4.2.0 later")
        one = yield self.submit(["one@b.test"])
        two = yield self.submit(["two@b.test"])
        manager = self.manager(retry_first=3600)
        yield self.deliver(manager)
        self.sink.default = None
        self.assertTrue((yield manager.retry(one)))
        yield manager.idle()
        self.assertEqual([m.recipients for m in self.sink.messages], [["one@b.test"]])
        self.assertEqual(self.spool.queued(), [two])
        self.assertEqual((yield manager.flush()), 1)
        yield manager.idle()
        self.assertEqual(len(self.sink.messages), 2)
        self.assertFalse((yield manager.retry(one)))  # delivered: no longer queued

    @defer.inlineCallbacks
    def test_twenty_thousand_queued_start_in_bounded_work(self):
        queue = os.path.join(self.directory, "queue")
        ids = []
        base = int(self.clock.seconds() * 1000)
        for i in range(20000):
            queue_id = f"3{base + i:011x}{i:06x}"
            envelope = Envelope(id=queue_id, sender="s@a.test", recipients=[f"r{i}@b.test"],
                                user="a.test", account="default", client_ip=None, helo=None,
                                tls=False, received_at=self.clock.seconds())
            with open(os.path.join(queue, queue_id), "wb") as f:
                f.write(json.dumps(envelope.to_json()).encode() + b"\n")
            ids.append(queue_id)
        manager = self.manager(prefetch=10)
        yield manager.start()
        self.assertEqual(manager.counts["ready"], 20000 - 10)  # only 10 taken to be sent
        yield manager.stop()
        # what was read is what was taken: those 10, and one more per message delivered
        self.assertEqual(len(self.spool.read), 20000 - manager.counts["ready"])
        self.assertLessEqual(len(self.spool.read), 10 + len(self.sink.messages))
        self.assertLessEqual(len(self.sink.messages), 10)
        self.assertEqual(len(self.spool.queued()), 20000 - len(self.sink.messages))


class DeleteTests(Base):
    @defer.inlineCallbacks
    def test_delete_a_deferred_message(self):
        self.sink.default = (451, "4.2.0 later")
        queue_id = yield self.submit()
        manager = self.manager()
        yield self.deliver(manager, queue_id)
        place = yield manager.delete(queue_id)
        self.assertEqual(place, "queue")
        self.assertEqual(self.spool.queued(), [])
        self.assertIsNone(self.spool.read_state(queue_id))
        self.sink.default = None
        manager.flush()
        yield manager.idle()
        self.assertEqual(self.sink.messages, [])
        yield self.assertFailure(manager.delete(queue_id), KeyError)


    @defer.inlineCallbacks
    def test_a_message_deleted_while_it_waits_is_not_sent(self):
        """Even when its body was read ahead before the delete came (from the panel or
        mailrelay-admin, over the control socket)."""
        ids = yield self.submit_many(3)
        deleted = []

        def on_result(queue_id, envelope, result, status):
            if not deleted:  # ids[1] is loaded and waits for the connection
                deleted.append(manager.delete(ids[1]))

        manager = self.manager(max_per_host=1, on_result=on_result)
        yield self.deliver(manager)
        self.assertEqual((yield deleted[0]), "queue")
        self.assertEqual([m.recipients for m in self.sink.messages],
                         [["r0@b.test"], ["r2@b.test"]])
        self.assertEqual(self.spool.queued(), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "state")), [])


class SlowSpool(CountingSpool):
    """The real spool on a slow disk: each durable change is reported ``delay`` seconds
    after it is done. ``durable`` holds the recipients a crash would find delivered."""

    delay = 0.05

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.durable: set[str] = set()
        self.saves = 0

    def _late(self, d: defer.Deferred, recipients) -> defer.Deferred:
        def done(result):
            self.durable.update(recipients)
            return result

        return d.addCallback(lambda result: task.deferLater(reactor, self.delay, done, result))

    def save_state(self, queue_id, state):
        self.saves += 1
        return self._late(super().save_state(queue_id, state), state.sent())

    def remove(self, queue_id):
        recipients = self.envelope(queue_id).recipients  # before the file goes
        return self._late(super().remove(queue_id), recipients)


class DurabilityTests(Base):
    """A connection sends its next MAIL only once the last message's outcome is on disk,
    so a crash finds at most the message in progress delivered but not recorded."""

    def setUp(self) -> None:
        super().setUp()
        self.violations: list[str] = []
        rule_for = self.sink.rule_for

        def check(recipient):  # at every RCPT: all the sink has so far is recorded
            received = {r for m in self.sink.messages for r in m.recipients}
            self.violations += sorted(received - self.spool.durable)
            return rule_for(recipient)

        self.sink.rule_for = check

    def open_spool(self) -> SlowSpool:
        spool = SlowSpool(self.directory, reactor=reactor)
        spool.open()
        self.addCleanup(spool.close)
        return spool

    def features(self) -> MessageFeatures:
        directory = self.mktemp()
        os.makedirs(directory)
        suppressions = SuppressionStore(os.path.join(directory, "suppressions.sqlite"))
        stats = StatsStore(os.path.join(directory, "stats.sqlite"))
        self.addCleanup(suppressions.close)
        self.addCleanup(stats.close)
        links = Links(TokenSigner(b"k" * 32), "https://track.example")
        return MessageFeatures(reactor, suppressions, StatsRecorder(stats, reactor),
                               Personalizer(links))

    @defer.inlineCallbacks
    def test_next_mail_waits_for_the_removal(self):
        yield self.submit_many(5)
        yield self.deliver(self.manager(max_per_host=1))
        self.assertEqual(len(self.sink.messages), 5)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(self.violations, [])
        self.assertEqual(self.spool.queued(), [])
        self.assertEqual(self.spool.saves, 0)  # a delivered message is only removed

    @defer.inlineCallbacks
    def test_next_mail_waits_for_the_saved_state(self):
        self.sink.rules["later@b.test"] = (451, "4.2.0 later")
        for i in range(3):
            yield self.submit([f"r{i}@b.test", "later@b.test"])
        yield self.deliver(self.manager(max_per_host=1))
        self.assertEqual(len(self.sink.messages), 3)
        self.assertEqual(self.violations, [])
        self.assertEqual(len(self.spool.queued()), 3)

    @defer.inlineCallbacks
    def test_copies_of_one_message_on_one_connection(self):
        """Per-recipient copies are jobs of the same message queued behind each other:
        each copy's recipient is saved as sent before the next MAIL, without waiting for
        the copies still queued (which would never come)."""
        queue_id = yield self.submit(["a@b.test", "b@b.test", "c@b.test"],
                                     personalize=["footer"])
        yield self.deliver(self.manager(max_per_host=1, features=self.features()), queue_id)
        self.assertEqual(sorted(m.recipients[0] for m in self.sink.messages),
                         ["a@b.test", "b@b.test", "c@b.test"])
        self.assertTrue(all(b"unsubscribe" in m.data.lower() for m in self.sink.messages))
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(self.violations, [])
        self.assertEqual(self.spool.saves, 2)  # the first two copies; the last removes it
        self.assertEqual(self.spool.queued(), [])

    @defer.inlineCallbacks
    def test_copies_deferred_and_sent_are_recorded(self):
        self.sink.rules["b@b.test"] = (451, "4.2.0 later")
        queue_id = yield self.submit(["a@b.test", "b@b.test", "c@b.test"],
                                     personalize=["footer"])
        yield self.deliver(self.manager(max_per_host=1, features=self.features()), queue_id)
        self.assertEqual(self.violations, [])
        state = self.spool.read_state(queue_id)
        self.assertEqual({r: str(s.status) for r, s in state.recipients.items()},
                         {"a@b.test": "sent", "b@b.test": "pending", "c@b.test": "sent"})
        self.assertEqual(state.attempts, 1)


class PipelinedDurabilityTests(DurabilityTests):
    """The same, to a server that offers PIPELINING."""

    def setUp(self) -> None:
        super().setUp()
        self.sink.pipelining = True


class Silent(protocol.Protocol):
    """Accepts the connection and never says a word."""

    def connectionMade(self):
        self.factory.connected.callback(None)


class StopTests(Base):
    @defer.inlineCallbacks
    def test_stop_drops_a_stuck_connection_after_the_grace_time(self):
        factory = protocol.ServerFactory.forProtocol(Silent)
        factory.connected = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        queue_id = yield self.submit()
        manager = self.manager(SmarthostRouter(Hop("127.0.0.1", port.getHost().port,
                                                   tls="none")), stop_timeout=5)
        yield manager.start()
        yield factory.connected
        for _ in range(200):  # until our side of the connection is up too
            if manager.courier._live:
                break
            yield task.deferLater(reactor, 0.01)
        stopped = manager.stop()
        self.assertFalse(stopped.called)
        self.advance(5)
        yield stopped
        self.assertEqual(self.spool.queued(), [queue_id])
        self.assertIsNone(self.spool.read_state(queue_id))  # nothing was tried


class ConnectionCacheTests(Base):
    """A connection with nothing left to send waits ``connection_cache_time`` for the next
    message to its destination instead of saying QUIT at once."""

    @defer.inlineCallbacks
    def send_one(self, manager: DeliveryManager, rcpt: str, total: int):
        manager.enqueue((yield self.submit([rcpt])))
        yield self.sink.wait_for(total)

    @defer.inlineCallbacks
    def test_messages_one_at_a_time_share_the_cached_connection(self):
        manager = self.manager(connection_cache_time=2.0)
        yield manager.start()
        yield self.send_one(manager, "a@b.test", 1)
        yield self.send_one(manager, "b@b.test", 2)
        self.assertEqual([m.connection for m in self.sink.messages], [1, 1])
        self.assertEqual(self.sink.open_connections, 1)
        self.advance(2.0)  # nothing came for that long: QUIT
        yield manager.idle()  # fires once no connection is open
        yield self.send_one(manager, "c@b.test", 3)
        self.assertEqual(self.sink.messages[2].connection, 2)

    @defer.inlineCallbacks
    def test_without_a_cache_time_each_message_has_its_connection(self):
        manager = self.manager()  # connection_cache_time = 0
        yield manager.start()
        yield self.send_one(manager, "a@b.test", 1)
        yield manager.idle()
        yield self.send_one(manager, "b@b.test", 2)
        self.assertEqual([m.connection for m in self.sink.messages], [1, 2])

    @defer.inlineCallbacks
    def test_stop_closes_a_cached_connection(self):
        manager = self.manager(connection_cache_time=3600.0)
        yield manager.start()
        yield self.send_one(manager, "a@b.test", 1)
        self.assertEqual(self.sink.open_connections, 1)
        yield manager.stop()  # fires without the hour passing
        self.assertEqual(manager.counts["connections"], 0)

    @defer.inlineCallbacks
    def test_a_cached_connection_the_server_closed_loses_no_message(self):
        manager = self.manager(connection_cache_time=3600.0)
        yield manager.start()
        yield self.send_one(manager, "a@b.test", 1)
        self.sink.drop_connections()
        yield self.until(lambda: not manager.counts["connections"])
        yield self.send_one(manager, "b@b.test", 2)
        self.assertEqual([m.connection for m in self.sink.messages], [1, 2])
        yield self.until(lambda: not self.spool.queued())  # delivered and removed

    @defer.inlineCallbacks
    def until(self, predicate):
        for _ in range(300):  # bounded: three seconds
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not reached")
