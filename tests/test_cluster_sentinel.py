"""The shared counters through Redis Sentinel (``[cluster] redis = sentinel://...``)
against real servers on loopback (tests/redis_server.py): a primary, its replica and a
sentinel watching them. The counters work on the primary the sentinel names; when the
primary is killed and the sentinel promotes the replica, the node refuses with 451 4.3.0
meanwhile (never a wrong "allowed") and counts on the new primary within a bounded
wait, the limit holding exactly for what was replicated; a manual failover (the old
primary demoted, not dead) is followed too, and so is Sentinel's +switch-master by an
idle node; an address that answers ROLE as a replica is never used; a replica's
-READONLY drops the connection instead of failing as a script error; with no sentinel
answering, Redis is down. Bad sentinel URLs are refused by the config."""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.logger import capturedLogs
from twisted.trial import unittest

from mailrelay.cluster.connection import connect
from mailrelay.cluster.redis_counters import RedisCounters, RedisRateLimiter
from mailrelay.reply import Reply
from tests.harness import free_port
from tests.redis_server import NOT_INSTALLED, Sentinel, failover_set, installed, stop_all

MASTER = "relay"
PASSWORD = "redis-secret"  # the primary's and the replica's
SENTINEL_PASSWORD = "sentinel-secret"


class ThroughSentinel(unittest.TestCase):
    def setUp(self) -> None:
        if not installed():
            raise AssertionError(NOT_INSTALLED)
        tmp = tempfile.TemporaryDirectory(prefix="mailrelay-sentinel-")
        self.addCleanup(tmp.cleanup)
        self.primary, self.replica, self.sentinel = failover_set(
            Path(tmp.name), MASTER, PASSWORD, SENTINEL_PASSWORD)
        self.addCleanup(stop_all, (self.sentinel, self.replica, self.primary))
        # A dead sentinel first: the next one is asked.
        self.url = (f"sentinel://:{PASSWORD}@127.0.0.1:{free_port()},"
                    f"127.0.0.1:{self.sentinel.port}/{MASTER}")

    def node(self, url: str = "", sentinel_password: str = SENTINEL_PASSWORD) -> RedisCounters:
        client = connect(url or self.url, reactor, timeout=0.5,
                         sentinel_password=sentinel_password)
        self.addCleanup(client.disconnect)
        return RedisCounters(client, reactor, prefix="s:", timeout=0.5, down="refuse")

    @defer.inlineCallbacks
    def send(self, rates: RedisRateLimiter) -> defer.Deferred:
        """One message's unit, committed: None, or the Reply that refused it."""
        try:
            reservation = yield rates.transaction("doe")
        except Reply as reply:
            return reply
        yield reservation.commit()
        return None

    @defer.inlineCallbacks
    def replicated(self, key: str = "s:rate:doe:hour") -> defer.Deferred:
        """Until the replica's copy of ``key`` is the primary's (bounded: 10 s)."""
        for _ in range(100):
            if self.replica.command("HGETALL", key) == self.primary.command("HGETALL", key):
                return
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"{key} not replicated")

    @defer.inlineCallbacks
    def sends(self, rates: RedisRateLimiter, n: int) -> defer.Deferred:
        answers = []
        for _ in range(n):
            answers.append((yield self.send(rates)))
        return answers

    @defer.inlineCallbacks
    def test_the_counters_work_on_the_primary_the_sentinel_names(self):
        rates = RedisRateLimiter(self.node(), per_hour=3)
        answers = yield self.sends(rates, 4)
        self.assertEqual(answers[:3], [None] * 3)
        self.assertEqual((answers[3].code, answers[3].status), (451, "4.7.1"))
        self.assertIn("s:rate:doe:hour", self.primary.command("KEYS", "*"))

    @defer.inlineCallbacks
    def test_the_counters_move_to_the_promoted_replica_when_the_primary_dies(self):
        counters = self.node()
        rates = RedisRateLimiter(counters, per_hour=10)
        self.assertEqual((yield self.sends(rates, 6)), [None] * 6)
        # What the old primary had not passed on to its replica is lost with it: here
        # everything was, as the replica's copy says.
        yield self.replicated()
        with capturedLogs() as events:
            self.primary.kill()
            answers = []
            for _ in range(300):  # bounded: about 30 s
                answer = yield self.send(rates)
                answers.append(answer)
                if answer is None:
                    break
                yield task.deferLater(reactor, 0.1, lambda: None)
            else:
                self.fail(f"no primary after the failover: {counters.client.failure}")
        self.assertEqual(self.sentinel.primary_port(), self.replica.port)
        refusals = {(a.code, a.status) for a in answers[:-1]}
        self.assertEqual(refusals, {(451, "4.3.0")})  # while no primary: never "allowed"
        logged = [e["log_format"] for e in events]
        self.assertEqual(sum("unreachable" in line for line in logged), 1)
        self.assertEqual(sum("answers again" in line for line in logged), 1)
        # 6 before, 1 just now: 3 more, then the limit.
        answers = yield self.sends(rates, 4)
        self.assertEqual(answers[:3], [None] * 3)
        self.assertEqual((answers[3].code, answers[3].status), (451, "4.7.1"))
        self.assertEqual(self.replica.command("ROLE").split()[0], "master")

    @defer.inlineCallbacks
    def test_a_demoted_primary_is_left_for_the_one_the_sentinel_names(self):
        rates = RedisRateLimiter(self.node(), per_hour=5)
        self.assertIsNone((yield self.send(rates)))
        yield self.replicated()  # a unit the replica never had would be lost
        self.assertEqual(self.sentinel.command("SENTINEL", "failover", MASTER), "OK")
        for _ in range(300):  # bounded: about 30 s
            if (self.sentinel.primary_port() == self.replica.port
                    and self.primary.command("ROLE").split()[:1] == ["slave"]):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the sentinel did not move the primary")
        for _ in range(300):
            answer = yield self.send(rates)
            if answer is None:
                break
            self.assertEqual((answer.code, answer.status), (451, "4.3.0"))
            yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the counters did not follow the new primary")
        # Both units on the new primary: 3 more, then the limit.
        answers = yield self.sends(rates, 4)
        self.assertEqual(answers[:3], [None] * 3)
        self.assertEqual(answers[3].status, "4.7.1")

    @defer.inlineCallbacks
    def test_the_switch_of_primary_moves_an_idle_node_at_once(self):
        # The old primary hangs (SIGSTOP): the node's connection to it stays up, idle,
        # until Sentinel announces the new primary.
        rates = RedisRateLimiter(self.node(), per_hour=5)
        self.assertIsNone((yield self.send(rates)))
        yield self.replicated()
        client = rates.counters.client
        os.kill(self.primary.process.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, self.primary.process.pid, signal.SIGCONT)
        for _ in range(300):  # bounded: about 30 s
            connection = client.connection
            if connection is not None and connection.transport.getPeer().port == \
                    self.replica.port:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the node stayed with the old primary")
        self.assertEqual(self.sentinel.primary_port(), self.replica.port)
        self.assertIsNone((yield self.send(rates)))  # the first call after: on the new one

    @defer.inlineCallbacks
    def test_no_sentinel_answering_is_redis_down(self):
        rates = RedisRateLimiter(self.node(f"sentinel://127.0.0.1:{free_port()}/{MASTER}"),
                                 per_hour=5)
        answer = yield self.send(rates)
        self.assertEqual((answer.code, answer.status), (451, "4.3.0"))
        self.assertIn("Sentinel: 127.0.0.1:", rates.counters.client.failure)
        # A sentinel that does not know the name, or refuses the password, names none.
        for url, password in ((self.url.replace(MASTER, "other"), SENTINEL_PASSWORD),
                              (self.url, "wrong")):
            counters = self.node(url, password)
            answer = yield self.send(RedisRateLimiter(counters, per_hour=5))
            self.assertEqual(answer.status, "4.3.0")
            self.assertIn("Sentinel:", counters.client.failure)

    @defer.inlineCallbacks
    def test_an_address_that_is_a_replica_is_never_used(self):
        # A sentinel whose "master" is the replica: as a stale answer from Sentinel.
        stale = Sentinel(self.sentinel.dir.parent / "stale", free_port(), "stale",
                         ("127.0.0.1", self.replica.port), auth=PASSWORD)
        stale.start()
        self.addCleanup(stale.stop)
        counters = self.node(f"sentinel://:{PASSWORD}@127.0.0.1:{stale.port}/stale", "")
        answer = yield self.send(RedisRateLimiter(counters, per_hour=5))
        self.assertEqual((answer.code, answer.status), (451, "4.3.0"))
        # Not even for a read: a replica's counts may be behind the primary's.
        yield self.assertFailure(counters.client.call("PING"), defer.TimeoutError,
                                 defer.CancelledError)
        self.assertIn(f"127.0.0.1:{self.replica.port} is a slave, not the primary",
                      counters.client.failure)

    @defer.inlineCallbacks
    def test_a_replicas_readonly_reply_is_redis_down_not_a_script_error(self):
        client = connect(f"redis://:{PASSWORD}@127.0.0.1:{self.replica.port}", reactor,
                         timeout=0.5)
        self.addCleanup(client.disconnect)
        counters = RedisCounters(client, reactor, prefix="s:", timeout=0.5, down="refuse")
        with capturedLogs() as events:
            answer = yield self.send(RedisRateLimiter(counters, per_hour=5))
        self.assertEqual((answer.code, answer.status), (451, "4.3.0"))
        self.assertIn("Redis: READONLY", [e.get("reason", "") for e in events][-1])


def test_the_config_refuses_a_sentinel_url_it_cannot_use(tmp_path):
    from mailrelay.config import ConfigError, load_config

    path = tmp_path / "mailrelay.ini"
    for value, why in (("sentinel://10.0.0.5:26379,10.0.0.6:26379", "master's name is missing"),
                       ("sentinel://10.0.0.5:26379/", "master's name is missing"),
                       ("sentinel://:26379/relay", "a sentinel without a host"),
                       ("sentinel://10.0.0.5:26379,/relay", "a sentinel without a host"),
                       ("sentinel://10.0.0.5:port/relay", "'port' is not a port"),
                       ("sentinel://10.0.0.5:70000/relay", "'70000' is not a port"),
                       ("sentinel://10.0.0.5/relay/zero", "'zero' is not a database number"),
                       ("sentinels://10.0.0.5:26379/relay", "without TLS only"),
                       ("rediss+sentinel://10.0.0.5/relay", "without TLS only")):
        path.write_text(f"[cluster]\nredis = {value}\n")
        with pytest.raises(ConfigError, match=re.escape("[cluster] redis")) as refused:
            load_config(str(path))
        assert why in str(refused.value)
    path.write_text("[cluster]\nredis = sentinel://:pw@10.0.0.5,[fd00::6]:26380/relay/2\n"
                    "redis_sentinel_password = other\n")
    config = load_config(str(path))
    assert config.cluster.redis_sentinel_password == "other"
    from mailrelay.config import redis_url_parts

    assert redis_url_parts(config.cluster.redis) == {
        "sentinels": [("10.0.0.5", 26379), ("fd00::6", 26380)], "master": "relay",
        "password": "pw", "dbid": 2}
