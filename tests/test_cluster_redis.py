"""The shared counters' scripts against a real redis-server (tests/redis_server.py), each
"node" a limiter of its own with its own connection to it: rate limits, connection leases
and failed logins hold across nodes exactly; keys expire; a dead node's leases lapse;
without Redis, the configured refusal or the node's share of each limit, and back."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import capturedLogs
from twisted.trial import unittest

from mailrelay.cluster.connection import connect
from mailrelay.cluster.redis_counters import (
    RedisConnectionLimits,
    RedisCounters,
    RedisLoginGuard,
    RedisQuotaCounter,
    RedisRateLimiter,
)
from mailrelay.model import Account, SmtpUser
from mailrelay.policy.quota import QuotaExceeded, period_end, period_id
from mailrelay.reply import Reply
from tests.redis_server import NOT_INSTALLED, RedisServer, installed

_prefixes = itertools.count(1)


class SharedCounters(unittest.TestCase):
    server: RedisServer

    @classmethod
    def setUpClass(cls) -> None:
        if not installed():
            raise AssertionError(NOT_INSTALLED)
        cls.tmp = tempfile.TemporaryDirectory(prefix="mailrelay-redis-")
        cls.server = RedisServer(Path(cls.tmp.name))
        cls.server.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls.tmp.cleanup()

    def setUp(self) -> None:
        if not self.server.ping():  # a test stopped it
            self.server.start()
        self.prefix = f"t{next(_prefixes)}:"

    def node(self, down: str = "refuse", nodes: int = 2, name: str = "") -> RedisCounters:
        """One node's connection to the shared Redis (closed after the test). Its timeout
        leaves room for a busy machine: these tests stop Redis, they never let it hang."""
        pool = connect(self.server.url, reactor, timeout=2)
        self.addCleanup(pool.disconnect)
        return RedisCounters(pool, reactor, prefix=self.prefix, timeout=2, down=down,
                             nodes=nodes, node_id=name or f"n{id(pool)}")

    def refusal(self, d: defer.Deferred) -> defer.Deferred:
        """Fires with the Reply ``d`` errbacked with (fails the test if it succeeded)."""
        return self.assertFailure(d, Reply)

    # ---- rate limits ----

    @defer.inlineCallbacks
    def test_a_limit_holds_exactly_across_nodes_however_the_calls_interleave(self):
        nodes = [RedisRateLimiter(self.node(), per_hour=100) for _ in range(3)]
        attempts = [nodes[i % 3].transaction("Doe@Example.Test") for i in range(300)]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        taken = [r for ok, r in results if ok]
        refused = [r.value for ok, r in results if not ok]
        self.assertEqual(len(taken), 100)
        self.assertEqual({(r.code, r.status) for r in refused}, {(451, "4.7.1")})
        self.assertIn("rate limit of 100 messages per hour exceeded, try again in",
                      str(refused[0]))
        yield defer.gatherResults([defer.maybeDeferred(r.commit) for r in taken])
        # Committed units stay counted; the key expires by itself (set in the same script).
        yield self.refusal(nodes[0].transaction("doe@example.test"))
        ttl = int(self.server.command("PTTL", f"{self.prefix}rate:doe@example.test:hour"))
        self.assertGreater(ttl, 3600_000)
        self.assertLessEqual(ttl, 3661_000)

    @defer.inlineCallbacks
    def test_an_aborted_transaction_gives_its_unit_back_to_every_node(self):
        a, b = RedisRateLimiter(self.node(), per_hour=2), RedisRateLimiter(self.node(),
                                                                          per_hour=2)
        first = yield a.transaction("u")
        yield b.transaction("u")
        yield self.refusal(a.transaction("u"))
        yield first.release()
        yield first.release()  # twice: nothing more
        third = yield b.transaction("u")
        yield third.commit()
        yield self.refusal(a.transaction("u"))

    @defer.inlineCallbacks
    def test_per_minute_and_the_users_own_limit(self):
        a = RedisRateLimiter(self.node(), per_hour=100, per_minute=1)
        yield a.transaction("u")
        reply = yield self.refusal(a.transaction("u"))
        self.assertIn("1 messages per minute", str(reply))
        retry = int(str(reply).rsplit("in ", 1)[1].split()[0])
        self.assertTrue(1 <= retry <= 61, retry)
        yield a.transaction("other", per_hour=1, per_minute=0)
        reply = yield self.refusal(a.transaction("other", per_hour=1, per_minute=0))
        self.assertIn("1 messages per hour", str(reply))

    @defer.inlineCallbacks
    def test_units_that_left_the_window_stop_counting_and_are_deleted(self):
        """A minute's window as the scripts left it after earlier checks (slots of a
        second, their total in ``t``, the oldest slot in ``o``): what left the window no
        longer counts and is deleted, the unit added joins the total, whether the last
        check was 100 s ago (slot by slot) or 20 minutes ago (the whole hash read once)."""
        for user, unchecked in (("recent", 100), ("idle", 1200)):
            now = int(self.server.command("TIME").split()[0])
            key = f"{self.prefix}rate:{user}:minute"
            gone, kept = now - 90, now - 5  # a slot that left the window, one that did not
            self.server.command("HSET", key, str(now - unchecked), "4", str(gone), "2",
                                str(kept), "1", "t", "7", "o", str(now - unchecked))
            rates = RedisRateLimiter(self.node(), per_hour=0, per_minute=3)
            yield rates.transaction(user)
            yield rates.transaction(user)
            reply = yield self.refusal(rates.transaction(user))
            self.assertIn("3 messages per minute", str(reply))
            flat = self.server.command("HGETALL", key).split()
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            self.assertNotIn(str(gone), fields)
            self.assertNotIn(str(now - unchecked), fields)
            self.assertEqual(fields["t"], "3")
            self.assertEqual(sum(int(v) for k, v in fields.items() if k not in "to"), 3)

    @defer.inlineCallbacks
    def test_counting_recipients_refuses_the_rcpt_that_goes_over(self):
        a = RedisRateLimiter(self.node(), per_hour=3, unit="recipients")
        b = RedisRateLimiter(self.node(), per_hour=3, unit="recipients")
        one = yield a.transaction("u")
        yield one.recipient()
        yield one.recipient()
        two = yield b.transaction("u")
        yield two.recipient()
        yield self.refusal(two.recipient())
        yield one.release()
        yield two.recipient()
        yield two.commit()

    @defer.inlineCallbacks
    def test_limits_changed_in_place_apply_to_the_next_check(self):
        """What a reload (mailrelay/reload.py) does: new values on the same objects."""
        rates = RedisRateLimiter(self.node(), per_hour=1)
        guard = RedisLoginGuard(self.node(), delay_after=5, block_after=5)
        yield rates.transaction("u")
        yield self.refusal(rates.transaction("u"))
        rates.per_hour = 2
        yield rates.transaction("u")
        yield guard.failed("192.0.2.9", "doe")
        self.assertEqual((yield guard.check("192.0.2.9")), 0.0)
        guard.configure(window=600, delay_after=1, block_after=2, block_time=60, max_delay=16,
                        user_alert_after=20, ipv6_prefix=64)
        self.assertEqual((yield guard.check("192.0.2.9")), 1.0)
        yield guard.failed("192.0.2.9", "doe")
        yield self.refusal(guard.check("192.0.2.9"))

    # ---- quotas ----

    @defer.inlineCallbacks
    def test_a_quota_holds_exactly_across_two_nodes_and_each_warning_comes_once(self):
        nodes = [RedisQuotaCounter(self.node()) for _ in range(2)]
        user = SmtpUser("App", quota_day=20)
        attempts = [nodes[i % 2].reserve(user, None) for i in range(50)]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        taken = [r for ok, r in results if ok]
        refused = [r.value for ok, r in results if not ok]
        self.assertEqual(len(taken), 20)
        self.assertEqual({(r.code, r.status) for r in refused}, {(451, "4.7.1")})
        self.assertTrue(all(isinstance(r, QuotaExceeded) for r in refused))
        # Open places count: refused before a single message was counted, so none of these
        # refusals is the 100 % (that comes with the 20th message).
        self.assertEqual([r for r in refused if r.crossing], [])
        crossings = []
        for reservation in taken:  # committed on alternating nodes, one at a time
            crossings.append((yield reservation.commit()))
        reached = {n + 1: [(c.percent, c.used) for c in found]
                   for n, found in enumerate(crossings) if found}
        # Each threshold once, by whichever node counted the message that reached it.
        self.assertEqual(reached, {16: [(80, 16)], 18: [(90, 18)], 20: [(100, 20)]})
        reply = yield self.assertFailure(nodes[1].reserve(user, None), QuotaExceeded)
        today = period_id("day", reactor.seconds())
        self.assertEqual(str(reply), "451 4.7.1 daily quota of 20 messages of user App "
                         "reached, it resets at " + f"{today} 00:00 UTC".replace(
                             today, period_id("day", period_end("day", today))))
        self.assertIsNone(reply.crossing)  # the 100 % was reported by the commit
        # One key, expiring with the day (plus the places' lease), set by the same script.
        key = f"{self.prefix}quota:user:app:d"
        self.assertEqual(self.server.command("HGET", key, "u"), "20")
        ttl = int(self.server.command("PTTL", key)) / 1000
        until_midnight = period_end("day", today) - reactor.seconds()
        self.assertLessEqual(ttl, until_midnight + 3600 + 5)
        self.assertGreater(ttl, until_midnight + 3600 - 60)

    @defer.inlineCallbacks
    def test_an_account_quota_and_a_monthly_one_are_counted_in_the_same_call(self):
        a, b = RedisQuotaCounter(self.node()), RedisQuotaCounter(self.node(), per_month=50)
        acme = Account("acme", quota_day=2)
        one = yield a.reserve(SmtpUser("one", account="acme"), acme)
        two = yield b.reserve(SmtpUser("two", account="acme"), acme)
        reply = yield self.assertFailure(a.reserve(SmtpUser("one", account="acme"), acme),
                                         QuotaExceeded)
        self.assertIn("daily quota of 2 messages of account acme reached", str(reply))
        yield two.release()  # an aborted transaction gives its place back, on every node
        two = yield b.reserve(SmtpUser("two", account="acme"), acme)
        self.assertEqual([(u.quota.period, u.quota.subject, u.used) for u in two.usage],
                         [("month", "user", 0), ("day", "account", 0)])
        self.assertEqual((yield one.commit()), [])
        [full] = yield two.commit()
        self.assertEqual((full.quota.subject, full.percent, full.used), ("account", 100, 2))
        self.assertEqual(self.server.command("HGET", f"{self.prefix}quota:user:two:m", "u"),
                         "1")

    @defer.inlineCallbacks
    def test_a_new_period_starts_from_zero_and_warns_again(self):
        """Redis's clock cannot be moved: the hash is made to say yesterday instead."""
        node = RedisQuotaCounter(self.node())
        user = SmtpUser("u", quota_day=1)
        yield (yield node.reserve(user, None)).commit()
        yield self.assertFailure(node.reserve(user, None), QuotaExceeded)
        self.server.command("HSET", f"{self.prefix}quota:user:u:d", "p", "2000-01-01")
        reservation = yield node.reserve(user, None)
        self.assertEqual(reservation.usage[0].used, 0)
        [crossing] = yield reservation.commit()
        self.assertEqual((crossing.percent, crossing.pid),
                         (100, period_id("day", reactor.seconds())))

    @defer.inlineCallbacks
    def test_a_lowered_quota_is_reported_full_by_the_first_refusal_only(self):
        a, b = RedisQuotaCounter(self.node()), RedisQuotaCounter(self.node())
        for _ in range(3):
            yield (yield a.reserve(SmtpUser("u", quota_month=100), None)).commit()
        lowered = SmtpUser("u", quota_month=2)
        first = yield self.assertFailure(a.reserve(lowered, None), QuotaExceeded)
        second = yield self.assertFailure(b.reserve(lowered, None), QuotaExceeded)
        self.assertEqual((first.crossing.percent, first.crossing.used), (100, 3))
        self.assertIsNone(second.crossing)

    @defer.inlineCallbacks
    def test_a_released_held_message_counts_past_a_full_quota_and_keeps_open_places(self):
        """An admin's release of mail held over quota (policy/quotahold.py) counts it
        whatever the quota says, and leaves the other nodes' open places alone."""
        a, b = RedisQuotaCounter(self.node()), RedisQuotaCounter(self.node())
        user = SmtpUser("u", quota_day=2)
        yield (yield a.reserve(user, None)).commit()
        open_place = yield b.reserve(user, None)  # the second place, a transaction open
        yield self.assertFailure(a.reserve(user, None), QuotaExceeded)
        [crossing] = yield a.count(user, None)
        self.assertEqual((crossing.percent, crossing.used), (100, 2))
        [usage] = yield a.usage(user, None)
        self.assertEqual((usage.used, usage.held), (2, 1))
        yield open_place.commit()
        [usage] = yield a.usage(user, None)
        self.assertEqual((usage.used, usage.held), (3, 0))

    @defer.inlineCallbacks
    def test_a_user_whose_mail_over_quota_is_held_passes_mail_with_redis_quotas(self):
        from mailrelay.auth.avatar import Submitter
        from mailrelay.policy.bruteforce import LoginGuard
        from mailrelay.policy.connections import ConnectionLimits
        from mailrelay.policy.ratelimit import RateLimiter
        from mailrelay.policy.submission import SubmissionPolicy

        counter = RedisQuotaCounter(self.node())
        policy = SubmissionPolicy(ConnectionLimits(), RateLimiter(reactor, per_hour=0),
                                  LoginGuard(reactor), None, counter)
        user = SmtpUser("u", quota_day=1, quota_action="hold")
        avatar = Submitter.for_user(user, None, "password")
        session = policy.connect("192.0.2.1")
        held = []
        for _ in range(2):
            yield session.mailFrom(avatar, "a@u.test")  # neither refused
            held.append(session.holding())
            yield session.accepted(avatar, None)
        self.assertIsNone(held[0])
        self.assertIsInstance(held[1], QuotaExceeded)
        self.assertEqual(held[1].quota.describe(), "daily quota of 1 messages of user u")
        [usage] = yield counter.usage(user, None)
        self.assertEqual((usage.used, usage.held), (1, 0))  # the held one counts nowhere
        session.disconnect()

    # ---- connections ----

    @defer.inlineCallbacks
    def test_connections_per_user_and_per_address_hold_across_nodes(self):
        a = RedisConnectionLimits(self.node(), max_per_ip=3, max_per_user=2)
        b = RedisConnectionLimits(self.node(), max_per_ip=3, max_per_user=2)
        t1 = yield a.open("192.0.2.1")
        t2 = yield b.open("192.0.2.1")
        t3 = yield a.open("192.0.2.1")
        reply = yield self.refusal(b.open("192.0.2.1"))
        self.assertEqual((reply.code, reply.status), (421, "4.7.0"))
        yield a.bind_user(t1, "Doe")
        yield b.bind_user(t2, "doe")
        reply = yield self.refusal(a.bind_user(t3, "DOE"))
        self.assertIn("too many connections for this user", str(reply))
        t2.close()
        yield task.deferLater(reactor, 0.05, lambda: None)  # the drop is not waited for
        yield a.bind_user(t3, "doe")
        yield b.open("192.0.2.1")

    @defer.inlineCallbacks
    def test_a_dead_nodes_leases_lapse_and_a_live_nodes_are_renewed(self):
        dead, alive, other = (RedisConnectionLimits(self.node(), max_per_user=1,
                                                    lease_time=1.5) for _ in range(3))
        t = yield dead.open("192.0.2.1")
        yield dead.bind_user(t, "gone")
        u = yield alive.open("192.0.2.2")
        yield alive.bind_user(u, "here")
        for _ in range(8):  # 2 s, past the lease time, the live node renewing
            yield alive.renew()
            yield task.deferLater(reactor, 0.25, lambda: None)
        mine = yield other.open("192.0.2.3")
        yield other.bind_user(mine, "gone")  # the dead node's lease lapsed
        theirs = yield other.open("192.0.2.4")
        reply = yield self.refusal(other.bind_user(theirs, "here"))
        self.assertEqual(reply.code, 421)

    # ---- failed logins ----

    @defer.inlineCallbacks
    def test_guessing_spread_over_nodes_is_blocked_at_the_global_threshold(self):
        guards = [RedisLoginGuard(self.node(), delay_after=3, block_after=6,
                                  user_alert_after=8) for _ in range(3)]
        for i in range(5):
            wait = yield guards[i % 3].check("203.0.113.9")
            self.assertEqual(wait, 0.0 if i < 3 else 2.0 ** (i - 3))
            yield guards[i % 3].failed("203.0.113.9", "doe")
        with capturedLogs() as events:
            yield guards[2].failed("203.0.113.9", "doe")
        self.assertTrue(any("blocked ip=203.0.113.9" in e["log_format"].format(**e)
                            for e in events))
        for guard in guards:
            reply = yield self.refusal(guard.check("203.0.113.9"))
            self.assertEqual((reply.code, reply.status), (421, "4.7.0"))
        # A username is never blocked, but spread over addresses it is alerted on.
        yield guards[0].failed("198.51.100.1", "doe")
        with capturedLogs() as events:
            yield guards[1].failed("198.51.100.2", "doe")
        alert = [e["log_format"].format(**e) for e in events if "from {addresses}" in
                 e["log_format"]]
        self.assertEqual(alert, ["login failures: user=doe failures=8 from 3 addresses "
                                 "within 600 s, last ip=198.51.100.2"])
        self.assertEqual((yield guards[0].check("198.51.100.1")), 0.0)

    @defer.inlineCallbacks
    def test_a_success_forgives_the_users_own_failures_from_that_address_only(self):
        a, b = (RedisLoginGuard(self.node(), delay_after=2, block_after=10) for _ in range(2))
        yield a.failed("192.0.2.7", "doe")
        yield b.failed("192.0.2.7", "doe")
        yield b.failed("192.0.2.7", "roe")
        self.assertEqual((yield a.check("192.0.2.7")), 2.0)
        yield b.succeeded("192.0.2.7", "Doe")
        self.assertEqual((yield a.check("192.0.2.7")), 0.0)
        self.assertEqual(self.server.command("ZCARD", f"{self.prefix}login:ip:192.0.2.7"), "1")

    # ---- without Redis ----

    @defer.inlineCallbacks
    def test_redis_down_refuses_with_451_and_recovers_when_it_returns(self):
        rates = RedisRateLimiter(self.node(), per_hour=5)
        guard = RedisLoginGuard(self.node())
        limits = RedisConnectionLimits(self.node(), max_per_ip=5)
        ticket = yield limits.open("192.0.2.1")
        yield rates.transaction("u")
        self.server.stop()
        reply = yield self.refusal(limits.open("192.0.2.1"))  # instead of the greeting
        self.assertEqual((reply.code, reply.status), (421, "4.3.0"))
        reply = yield self.refusal(limits.bind_user(ticket, "doe"))  # the login refused
        self.assertEqual((reply.code, reply.status), (451, "4.3.0"))
        ticket.close()
        with capturedLogs() as events:
            reply = yield self.refusal(rates.transaction("u"))
            yield self.refusal(rates.transaction("u"))
        self.assertEqual((reply.code, reply.status), (451, "4.3.0"))
        lines = [e["log_format"] for e in events if "unreachable" in e["log_format"]]
        self.assertEqual(len(lines), 1)  # once per change
        reply = yield self.refusal(guard.check("192.0.2.1"))
        self.assertEqual(reply.status, "4.3.0")
        yield guard.failed("192.0.2.1", "doe")  # counted nowhere shared, and no error
        self.server.start()
        yield self._until(lambda: rates.transaction("u"))
        self.assertTrue(rates.counters.up)

    @defer.inlineCallbacks
    def test_redis_down_in_local_mode_counts_each_nodes_share(self):
        rates = RedisRateLimiter(self.node(down="local", nodes=2), per_hour=6)
        limits = RedisConnectionLimits(self.node(down="local", nodes=2), max_per_ip=4,
                                       max_per_user=4)
        self.server.stop()
        yield defer.gatherResults([rates.transaction("u") for _ in range(3)])
        reply = yield self.refusal(rates.transaction("u"))
        self.assertEqual((reply.code, reply.status), (451, "4.7.1"))
        self.assertIn("rate limit of 3 messages per hour", str(reply))
        tickets = yield defer.gatherResults([limits.open("192.0.2.1") for _ in range(2)])
        yield self.refusal(limits.open("192.0.2.1"))
        yield limits.bind_user(tickets[0], "doe")
        yield limits.bind_user(tickets[1], "doe")
        self.server.start()
        t = yield self._until(lambda: limits.open("192.0.2.1"))
        self.assertTrue(limits.counters.up)
        for ticket in (*tickets, t):
            ticket.close()

    @defer.inlineCallbacks
    def test_quotas_without_redis_refuse_or_count_each_nodes_share(self):
        refusing = RedisQuotaCounter(self.node())
        local = RedisQuotaCounter(self.node(down="local", nodes=2))
        user = SmtpUser("u", quota_day=4)
        yield (yield refusing.reserve(user, None)).commit()
        self.server.stop()
        reply = yield self.refusal(refusing.reserve(user, None))
        self.assertEqual((reply.code, reply.status), (451, "4.3.0"))
        for _ in range(2):
            reservation = yield local.reserve(user, None)
            yield reservation.commit()
        reply = yield self.assertFailure(local.reserve(user, None), QuotaExceeded)
        self.assertIn("daily quota of 2 messages of user u reached", str(reply))
        self.server.start()
        reservation = yield self._until(lambda: local.reserve(user, None))
        # Redis's count again (this one started afresh), not the node's own 2
        self.assertEqual(reservation.usage[0].used, 0)
        yield reservation.release()

    @defer.inlineCallbacks
    def _until(self, attempt):
        """``attempt()`` again until Redis answers it (bounded: 10 s)."""
        for _ in range(100):
            try:
                return (yield attempt())
            except Reply:
                yield task.deferLater(reactor, 0.1, lambda: None)
        self.fail("Redis did not come back")


class OverTcp(unittest.TestCase):
    """Redis over loopback TCP with a password (AUTH): the URL's, or redis_password."""

    @defer.inlineCallbacks
    def test_auth_over_tcp(self):
        if not installed():
            raise AssertionError(NOT_INSTALLED)
        from harness import free_port

        tmp = tempfile.TemporaryDirectory(prefix="mailrelay-redis-")
        self.addCleanup(tmp.cleanup)
        server = RedisServer(Path(tmp.name), port=free_port(), password="s3cret:/@")
        server.start()
        self.addCleanup(server.stop)
        for url, password in ((f"redis://:s3cret%3A%2F%40@127.0.0.1:{server.port}/2", ""),
                              (f"redis://127.0.0.1:{server.port}", "s3cret:/@")):
            pool = connect(url, reactor, password, timeout=2)
            self.addCleanup(pool.disconnect)
            rates = RedisRateLimiter(RedisCounters(pool, reactor, prefix="tcp:"), per_hour=1)
            yield rates.transaction(url)
            reply = yield self.assertFailure(rates.transaction(url), Reply)
            self.assertEqual(reply.status, "4.7.1")
        # The user names here are the URLs: the first one's counts are in database 2.
        self.assertIn(f"{server.port}/2:hour", server.command("-n", "2", "KEYS", "tcp:*"))
        self.assertNotIn("/2:hour", server.command("KEYS", "tcp:*"))
        self.assertIn(f"127.0.0.1:{server.port}:hour", server.command("KEYS", "tcp:*"))


class OverTls(unittest.TestCase):
    """Redis over loopback TLS (``rediss://``, redis-server's ``tls-port``), with
    certificates made here: AUTH inside TLS; a server whose certificate the CA file does
    not vouch for, or that does not name the URL's host, is never used, and the
    configured failure mode answers instead; a client certificate when Redis asks."""

    def setUp(self) -> None:
        if not installed():
            raise AssertionError(NOT_INSTALLED)
        from harness import free_port

        from tests.certs import TestCA

        tmp = tempfile.TemporaryDirectory(prefix="mailrelay-redis-")
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        self.ca = TestCA(self.dir / "ca")
        self.other_ca = TestCA(self.dir / "other", name="someone else's CA")
        self.cert, self.key = self.ca.issue("redis.test")
        self.free_port = free_port

    def server(self, client_certificates: bool = False,
               cert: tuple[Path, Path] | None = None) -> RedisServer:
        server = RedisServer(self.dir / f"redis{client_certificates}", password="pw:tls",
                             tls_port=self.free_port(),
                             tls=(*(cert or (self.cert, self.key)), self.ca.cert_path),
                             client_certificates=client_certificates)
        server.start()
        self.addCleanup(server.stop)
        return server

    def limiter(self, url: str, down: str = "refuse", password: str = "pw:tls",
                **tls) -> RedisRateLimiter:
        pool = connect(url, reactor, password, timeout=1, **tls)
        self.addCleanup(pool.disconnect)
        return RedisRateLimiter(RedisCounters(pool, reactor, prefix="tls:", timeout=1,
                                              down=down, nodes=2), per_hour=2)

    @defer.inlineCallbacks
    def test_auth_and_the_counters_over_tls(self):
        server = self.server()
        rates = self.limiter(f"rediss://127.0.0.1:{server.tls_port}",
                             ca_file=str(self.ca.cert_path))
        yield rates.transaction("doe")
        yield rates.transaction("doe")
        reply = yield self.assertFailure(rates.transaction("doe"), Reply)
        self.assertEqual(reply.status, "4.7.1")
        self.assertEqual(server.command("HGET", "tls:rate:doe:hour", "t"), "2")
        # A plain connection to the TLS port gets nowhere.
        plain = self.limiter(f"redis://127.0.0.1:{server.tls_port}")
        reply = yield self.assertFailure(plain.transaction("doe"), Reply)
        self.assertEqual(reply.status, "4.3.0")

    @defer.inlineCallbacks
    def test_a_refused_auth_is_tried_again_until_redis_takes_it(self):
        server = self.server()
        rates = self.limiter(f"rediss://127.0.0.1:{server.tls_port}", password="new:pw",
                             ca_file=str(self.ca.cert_path))
        with capturedLogs() as events:
            yield self.assertFailure(rates.transaction("doe"), Reply)
        self.assertIn("WRONGPASS", " ".join(e["log_format"].format(**e) for e in events
                                            if e.get("log_format")))
        server.command("CONFIG", "SET", "requirepass", "new:pw")
        server.password = "new:pw"
        for _ in range(50):  # bounded: 5 s; the node reconnects within a second
            try:
                yield rates.transaction("doe")
                break
            except Reply:
                yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(server.command("HGET", "tls:rate:doe:hour", "t"), "1")

    @defer.inlineCallbacks
    def test_a_server_the_ca_file_does_not_vouch_for_is_refused(self):
        server = self.server()
        url = f"rediss://127.0.0.1:{server.tls_port}"
        wrong = str(self.other_ca.cert_path)
        with capturedLogs() as events:
            reply = yield self.assertFailure(self.limiter(url, ca_file=wrong).transaction("u"),
                                             Reply)
        self.assertEqual((reply.code, reply.status), (451, "4.3.0"))
        text = " ".join(e["log_format"].format(**e) for e in events if "log_format" in e
                        and e["log_format"])
        self.assertIn("Redis unreachable", text)
        self.assertIn("certificate verify failed", text)
        # redis_down = local: the node's share of the limit (2 / 2 nodes) instead.
        local = self.limiter(url, down="local", ca_file=wrong)
        yield local.transaction("u")
        reply = yield self.assertFailure(local.transaction("u"), Reply)
        self.assertIn("rate limit of 1 messages per hour", str(reply))
        # The system's trust roots do not vouch for a private CA either.
        yield self.assertFailure(self.limiter(url).transaction("u"), Reply)
        self.assertEqual(server.command("KEYS", "tls:*"), "")

    @defer.inlineCallbacks
    def test_a_certificate_for_another_name_is_refused(self):
        server = self.server(cert=self.ca.issue("elsewhere.test", ips=()))
        ca = str(self.ca.cert_path)
        reply = yield self.assertFailure(
            self.limiter(f"rediss://127.0.0.1:{server.tls_port}", ca_file=ca)
            .transaction("u"), Reply)
        self.assertEqual(reply.status, "4.3.0")
        self.assertEqual(server.command("KEYS", "tls:*"), "")

    @defer.inlineCallbacks
    def test_a_client_certificate_when_redis_asks_for_one(self):
        server = self.server(client_certificates=True)
        url, ca = f"rediss://127.0.0.1:{server.tls_port}", str(self.ca.cert_path)
        reply = yield self.assertFailure(self.limiter(url, ca_file=ca).transaction("u"), Reply)
        self.assertEqual(reply.status, "4.3.0")
        cert, key = self.ca.issue("node1.test")
        rates = self.limiter(url, ca_file=ca, certificate=str(cert), key=str(key))
        yield rates.transaction("u")
        self.assertEqual(server.command("HGET", "tls:rate:u:hour", "t"), "1")


def test_the_config_refuses_what_the_client_cannot_reach(tmp_path):
    from mailrelay.config import ConfigError, load_config

    for value, why in (("http://10.0.0.5", "is not unix:/PATH, redis://HOST:PORT or rediss"),
                       ("unix:run/redis.sock", "needs an absolute path"),
                       ("redis://host:port", "port")):
        path = tmp_path / "mailrelay.ini"
        path.write_text(f"[cluster]\nredis = {value}\n")
        try:
            load_config(str(path))
        except ConfigError as e:
            assert "[cluster] redis" in str(e) and why in str(e), str(e)
        else:
            raise AssertionError(f"{value} accepted")
    path.write_text("[cluster]\nredis = /run/redis.sock\nlease_time = 1s\n")
    try:
        load_config(str(path))
    except ConfigError as e:
        assert "lease_time: at least 3s" in str(e)
    else:
        raise AssertionError("lease_time 1s accepted")


def test_both_kinds_of_limiters_fill_the_same_seams():
    from twisted.internet.task import Clock
    from zope.interface.verify import verifyObject

    from mailrelay.interfaces import IConnectionLimits, ILoginGuard, IQuotaCounter, IRateLimiter
    from mailrelay.policy.bruteforce import LoginGuard
    from mailrelay.policy.connections import ConnectionLimits
    from mailrelay.policy.quota import QuotaCounter
    from mailrelay.policy.ratelimit import RateLimiter

    counters = RedisCounters(None, Clock())  # the pool is not touched until a check
    for iface, local, shared in (
            (IRateLimiter, RateLimiter(Clock()), RedisRateLimiter(counters)),
            (IConnectionLimits, ConnectionLimits(), RedisConnectionLimits(counters)),
            (ILoginGuard, LoginGuard(Clock()), RedisLoginGuard(counters)),
            (IQuotaCounter, QuotaCounter(Clock()), RedisQuotaCounter(counters))):
        assert verifyObject(iface, local) and verifyObject(iface, shared)


def test_an_unreadable_ca_file_stops_the_start_naming_it(tmp_path):
    from mailrelay.cluster.redis_counters import shared_limiters
    from mailrelay.config import ConfigError, load_config

    path = tmp_path / "mailrelay.ini"
    for option, why in (("redis_ca_file", "cannot read CA certificates"),
                        ("redis_certificate", "needs both the certificate and its key")):
        path.write_text(f"[server]\ndata_dir = {tmp_path}\n\n[cluster]\n"
                        f"redis = rediss://127.0.0.1:6380\n{option} = {tmp_path}/missing.pem\n")
        try:
            shared_limiters(load_config(str(path)), reactor)
        except ConfigError as e:
            assert f"[cluster] {option}: " in str(e) and why in str(e), str(e)
        else:
            raise AssertionError(f"a missing {option} accepted")
