"""The relay stops under open sessions (smtp/goodbye.py): the real session over loopback,
the real spool. An idle session gets 421 4.3.2 at once; a message whose data is coming
may end within the grace (250, kept, then 421); one that does not gets the 421 at the
grace's end and nothing of it is kept; a commit under way at the grace's end is answered
250 before the 421 (a 421 alone would have the client send a kept message again)."""

from __future__ import annotations

from test_smtp_support import LineClient, LoopbackCase, message, plain
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mailrelay.smtp.goodbye import SessionDrain

GOODBYE = (421, ["4.3.2 relay.test Service shutting down, try again later"])


def logged_in(port: int) -> LineClient:
    c = LineClient(port)
    c.cmd("EHLO client.test")
    assert c.cmd(b"AUTH PLAIN " + plain("doe.test"))[0] == 235
    return c


def in_data(port: int) -> LineClient:
    """A session in the middle of a message's data."""
    c = logged_in(port)
    c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(message("a@doe.test"))  # no end of data yet
    return c


class GoodbyeTests(LoopbackCase):
    def drain(self, grace: float) -> SessionDrain:
        drain = SessionDrain(self.factories, grace, reactor)
        drain.startService()
        return drain

    @defer.inlineCallbacks
    def test_an_idle_session_gets_421_and_is_closed(self):
        port = self.listen("none", plaintext_auth=True)
        c = yield deferToThread(logged_in, port)
        yield self.drain(10).stopService()  # fires once the session is gone
        self.assertEqual((yield deferToThread(c.reply)), GOODBYE)
        self.assertTrue((yield deferToThread(c.eof)))
        c.close()

    @defer.inlineCallbacks
    def test_a_message_ended_within_the_grace_is_kept_then_421(self):
        port = self.listen("none", plaintext_auth=True)
        c = yield deferToThread(in_data, port)
        stopped = self.drain(10).stopService()
        self.assertFalse(stopped.called)  # the message's end is awaited

        def end():
            c.send(b".\r\n")
            return c.reply(), c.reply()

        accepted, goodbye = yield deferToThread(end)
        self.assertEqual(accepted[0], 250, accepted)
        self.assertEqual(goodbye, GOODBYE)
        yield stopped
        self.assertTrue((yield deferToThread(c.eof)))
        c.close()
        queue_id = accepted[1][0].rsplit(" ", 1)[1]
        self.assertIn(b"\r\n\r\nhello\r\n", self.body(queue_id))
        self.assertEqual(self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_a_message_not_ended_at_the_grace_end_gets_421_and_is_discarded(self):
        port = self.listen("none", plaintext_auth=True)
        c = yield deferToThread(in_data, port)
        yield self.drain(0.3).stopService()
        self.assertEqual((yield deferToThread(c.reply)), GOODBYE)
        self.assertTrue((yield deferToThread(c.eof)))
        c.close()
        yield self.sessions_ended()
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("queue"), [])

    @defer.inlineCallbacks
    def test_a_commit_under_way_at_the_grace_end_is_answered_250_before_the_421(self):
        create = self.spool.create

        def slow_disk(envelope):  # the spool's commit, after a slow fsync's time
            incoming = create(envelope)
            commit = incoming.commit
            incoming.commit = lambda: deferLater(reactor, 0.5, commit)
            return incoming

        self.spool.create = slow_disk
        port = self.listen("none", plaintext_auth=True)
        c = yield deferToThread(in_data, port)
        c.send(b".\r\n")
        session = self.factories[0].sessions[0]
        for _ in range(500):
            if session._committing:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(session._committing)
        yield self.drain(0.1).stopService()  # fires once the commit is answered
        accepted, goodbye = yield deferToThread(lambda: (c.reply(), c.reply()))
        self.assertEqual(accepted[0], 250, accepted)
        self.assertEqual(goodbye, GOODBYE)
        c.close()
        self.assertEqual(len(self.files("queue")), 1)

    @defer.inlineCallbacks
    def test_a_stop_without_sessions_is_at_once(self):
        self.listen("none", plaintext_auth=True)
        stopped = self.drain(10).stopService()
        self.assertTrue(stopped.called)
        yield stopped
