"""The session with the real submission policy (limits, brute-force defence, notifications)
over StringTransport, with a Clock for every time window."""

from __future__ import annotations

from test_smtp_support import ACCOUNT, Session, codes, make_portal, plain
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.model import Account
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.policy.connections import ConnectionLimits
from mailrelay.policy.notify import SenderNotifier
from mailrelay.policy.ratelimit import RateLimiter
from mailrelay.policy.submission import SubmissionPolicy

MESSAGE = (
    b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
    b"From: a@doe.test\r\n\r\nbody\r\n.\r\n"
)


class LimitsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.notifications: list[tuple[str, list[str], bytes]] = []
        self.policy = SubmissionPolicy(
            ConnectionLimits(max_total=100, max_per_ip=60, max_per_user=40, max_messages=0),
            RateLimiter(self.clock, per_hour=3),
            LoginGuard(self.clock, delay_after=2, block_after=4, max_delay=1.0),
            SenderNotifier(self.clock, self.submit, "postmaster@relay.test", "relay.test",
                           interval=600),
        )
        self.portal = make_portal({"192.0.2.50": "doe.test"})[0]

    def submit(self, sender, recipients, data):
        self.notifications.append((sender, recipients, data))
        return succeed("3" * 18)

    def session(self, ip: str = "192.0.2.7", **kw) -> Session:
        s = Session(self.clock, portal=self.portal, ip=ip, policy=self.policy, **kw)
        s.replies()
        return s

    def test_over_the_hourly_limit_451_with_a_retry_time_then_success_after_the_window(self):
        s = self.session()
        s.login()
        for _ in range(3):
            self.assertEqual(codes(s.send(MESSAGE)), [250, 250, 354, 250])
            self.clock.advance(60)
        lines = s.send(MESSAGE)
        self.assertEqual(lines[0], "451 4.7.1 rate limit of 3 messages per hour exceeded, "
                                   "try again in 3420 seconds")
        self.assertEqual(len(s.spool.committed), 3)
        # Another session of the same user shares the counter.
        other = self.session()
        other.login()
        self.assertEqual(codes(other.send(b"MAIL FROM:<a@doe.test>\r\n")), [451])
        other.send(b"QUIT\r\n")
        other.lose()
        self.clock.advance(3419)
        s = self.session()
        s.login()
        self.assertEqual(codes(s.send(b"MAIL FROM:<a@doe.test>\r\n")), [451])
        self.clock.advance(1)
        self.assertEqual(codes(s.send(b"RSET\r\n" + MESSAGE)), [250, 250, 250, 354, 250])

    def test_41st_session_of_a_user_is_refused_at_auth_and_a_closed_one_frees_a_place(self):
        sessions = [self.session() for _ in range(40)]
        for s in sessions:
            s.login()
        extra = self.session()
        lines = extra.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("doe.test") + b"\r\n")
        self.assertEqual(lines[-1], "421 4.7.0 too many connections for this user")
        self.assertTrue(extra.closed)
        extra.lose()
        # A login by IP counts the same way.
        by_ip = self.session(ip="192.0.2.50")
        self.assertEqual(codes(by_ip.send(b"EHLO c.test\r\nMAIL FROM:<a@doe.test>\r\n")),
                         [250, 421])
        by_ip.lose()
        sessions[0].lose()
        again = self.session()
        again.login()
        self.assertEqual(self.policy.connections.connections(user="doe.test"), 40)

    def test_guessing_is_delayed_then_blocked_while_the_user_logs_in_elsewhere(self):
        bad = b"AUTH PLAIN " + plain("doe.test", "guess") + b"\r\n"
        s = self.session(ip="192.0.2.66")
        s.send(b"EHLO c.test\r\n")
        self.assertEqual(codes(s.send(bad + bad)), [535, 535])
        self.assertEqual(s.send(bad), [])  # the third attempt waits before it is checked
        self.clock.advance(1)
        self.assertEqual(codes(s.replies()), [535, 421])  # three failures end the session
        s.lose()
        s = self.session(ip="192.0.2.66")
        s.send(b"EHLO c.test\r\n" + bad)
        self.clock.advance(1)
        self.assertEqual(codes(s.replies()), [535])
        lines = s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")
        self.assertEqual(lines, ["421 4.7.0 too many failed logins from your address, "
                                 "try again later"])
        s.lose()
        real = self.session(ip="192.0.2.77")
        real.login()  # not slowed: no clock advance needed
        self.clock.advance(900)  # the block ends
        s = self.session(ip="192.0.2.66")
        s.login()

    def test_a_refused_sender_notifies_the_account_once_per_interval(self):
        self.portal.realm.account = Account(ACCOUNT.name, ACCOUNT.domains, "admin@doe.test")
        s = self.session()
        s.login("john@shop.test")
        for _ in range(3):
            self.assertEqual(codes(s.send(b"MAIL FROM:<ceo@shop.test>\r\n")), [550])
        self.assertEqual(len(self.notifications), 1)
        sender, recipients, data = self.notifications[0]
        self.assertEqual((sender, recipients), ("", ["admin@doe.test"]))
        self.assertIn(b"john@shop.test", data)
        self.assertIn(b"ceo@shop.test", data)
        self.assertIn(b"192.0.2.7", data)
        self.clock.advance(600)  # the two later attempts, in one summary
        self.assertEqual(len(self.notifications), 2)
        self.assertIn(b"2 attempts", self.notifications[1][2])
