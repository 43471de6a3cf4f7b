"""The shared counters' connection to Redis (mailrelay/cluster/connection.py) against a
real redis-server (tests/redis_server.py): every kind of reply, one too big for one read,
many calls pipelined in one write and matched in order, an error reply in their midst;
a Redis that stops answering (SIGSTOP) fails the calls in flight after the timeout and
is used again once it answers."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.cluster.connection import RedisError, connect
from tests.redis_server import NOT_INSTALLED, RedisServer, installed


class Connection(unittest.TestCase):
    def setUp(self) -> None:
        if not installed():
            raise AssertionError(NOT_INSTALLED)
        tmp = tempfile.TemporaryDirectory(prefix="mailrelay-redis-")
        self.addCleanup(tmp.cleanup)
        self.server = RedisServer(Path(tmp.name))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.client = connect(self.server.url, reactor, timeout=0.5)
        self.addCleanup(self.client.disconnect)

    @defer.inlineCallbacks
    def test_every_kind_of_reply_and_one_bigger_than_a_read(self):
        c = self.client
        self.assertEqual((yield c.call("PING")), "PONG")
        script = "return {1, 'two', {3, false, {}}, ''}"
        self.assertEqual((yield c.call("EVAL", script, 0)), [1, "two", [3, None, []], ""])
        self.assertIsNone((yield c.call("GET", "nothing")))
        big = yield c.call("EVAL", "return string.rep('é', ARGV[1])", 0, 300_000)
        self.assertEqual(big, "é" * 300_000)
        self.assertEqual((yield c.call("SET", "k", "ünï\r\ncode")), "OK")
        self.assertEqual((yield c.call("GET", "k")), "ünï\r\ncode")

    @defer.inlineCallbacks
    def test_calls_of_one_turn_are_pipelined_and_answered_in_order(self):
        calls = [self.client.call("INCR", "n") for _ in range(500)]
        calls.insert(250, self.client.call("EVAL", "return redis.error_reply('NOPE x')", 0))
        results = yield defer.DeferredList(calls, consumeErrors=True)
        errors = [r.value for ok, r in results if not ok]
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0], RedisError)
        self.assertEqual(str(errors[0]), "NOPE x")
        self.assertEqual([r for ok, r in results if ok], list(range(1, 501)))
        # One connection, and it stays usable after the error reply.
        self.assertEqual((yield self.client.call("GET", "n")), "500")
        self.assertEqual(self.server.command("INFO", "clients").count("connected_clients:2"), 1)

    @defer.inlineCallbacks
    def test_a_redis_that_stops_answering_times_out_and_is_used_again(self):
        self.assertEqual((yield self.client.call("INCR", "n")), 1)
        pid = self.server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            started = reactor.seconds()
            yield self.assertFailure(self.client.call("INCR", "n"), defer.CancelledError)
            self.assertLess(reactor.seconds() - started, 5)
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(50):  # bounded: 5 s; a new connection within RETRY
            try:
                answer = yield self.client.call("INCR", "n")
                break
            except (defer.CancelledError, defer.TimeoutError, ConnectionError):
                yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("Redis was not used again")
        # Counted after the ones that timed out, which may have run after all.
        self.assertGreaterEqual(answer, 2)
