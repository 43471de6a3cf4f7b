"""Mail over a quota held instead of refused (``quota_action = hold``): the session's 250
says it is held and until when, the message waits in the real spool's hold/ and reaches
delivery (the spool's subscribers, as the delivery process hears of new mail) only when
the quota resets, counted in the new period, or when an admin releases it. A Clock drives
the calendar; sandboxed users' mail is never released."""

from __future__ import annotations

import calendar
import dataclasses
import smtplib

from test_smtp_support import ACCOUNT, PASSWORD, USERS, LoopbackCase, message, tls_files
from twisted.internet import defer
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.control import NotQuotaHeld
from mailrelay.events import EventKind
from mailrelay.interfaces import IEventSink, IHeldMail
from mailrelay.manage.queue import QueueControl
from mailrelay.model import Envelope, SmtpUser
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.policy.connections import ConnectionLimits
from mailrelay.policy.quota import QuotaCounter
from mailrelay.policy.quotahold import QuotaRelease
from mailrelay.policy.quotawarn import QuotaWarner
from mailrelay.policy.ratelimit import RateLimiter
from mailrelay.policy.submission import SubmissionPolicy

START = calendar.timegm((2026, 12, 6, 20, 0, 0))  # a Sunday evening, UTC
MIDNIGHT = calendar.timegm((2026, 12, 7, 0, 0, 0))


@implementer(IEventSink)
class Events:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def emit(self, kind, account, user, data) -> None:
        self.kinds.append(kind)


class Users:
    """The directory as QuotaRelease reads it: the test users and their account."""

    def getUser(self, name):
        return succeed(USERS.get(name))

    def getAccount(self, name):
        return succeed(ACCOUNT if name == ACCOUNT.name else None)


def blocking(f, *args):
    return maybeDeferred(f, *args)


class HoldCase(LoopbackCase):
    """The real spool (LoopbackCase), the quota counter and release on a Clock, and what
    delivery would hear of (``announced``)."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.clock.advance(START)
        self.events = Events()
        self.counter = QuotaCounter(self.clock)
        self.mails: list[bytes] = []
        self.warner = QuotaWarner(self.clock, self.submit, "postmaster@relay.test",
                                  "relay.test", self.events)
        self.announced: list[str] = []
        self.spool.subscribe(lambda envelope: self.announced.append(envelope.id))
        self.holds = QuotaRelease(self.spool, self.counter, Users(), self.warner, self.clock,
                                  blocking)
        self.addCleanup(lambda: self.holds.running and self.holds.stopService())

    def submit(self, sender, recipients, data):
        self.mails.append(data)
        return succeed("q")

    def hold(self, user: str = "held.test", until: float = MIDNIGHT,
             sandboxed: bool = False) -> defer.Deferred:
        envelope = Envelope("", "a@held.test", ["r@example.net"], user, "default",
                            "127.0.0.1", "client.test", True, self.clock.seconds(),
                            sandboxed=sandboxed, held_until=until,
                            held_quota=f"daily quota of 2 messages of user {user}")
        return self.spool.submit(envelope, message("a@held.test"))

    def used(self, user: str = "held.test") -> int:
        return self.counter.usage(USERS[user], ACCOUNT)[0].used


class ReleaseTests(HoldCase):
    @defer.inlineCallbacks
    def test_released_at_midnight_counted_in_the_new_day_and_what_does_not_fit_waits(self):
        ids = []
        for _ in range(3):
            ids.append((yield self.hold()))
        self.holds.startService()
        self.clock.advance(0)  # the check at start: nothing is due before midnight
        self.assertEqual((self.files("hold"), self.announced), (ids, []))
        self.clock.advance(MIDNIGHT - START - 1)
        self.assertEqual(self.files("hold"), ids)
        self.clock.advance(1)  # 00:00 UTC: two places in the new day's quota of 2
        self.assertEqual(self.announced, ids[:2])
        self.assertEqual((self.files("queue"), self.files("hold")), (ids[:2], ids[2:]))
        self.assertEqual(self.used(), 2)  # counted in the day they are released in
        self.clock.advance(86400)  # the next day: the last one
        self.assertEqual(self.announced, ids)
        self.assertEqual((self.files("queue"), self.files("hold")), (ids, []))
        self.assertEqual(self.used(), 1)

    @defer.inlineCallbacks
    def test_what_passed_while_the_relay_was_stopped_is_released_when_it_starts(self):
        queue_id = yield self.hold(until=START - 3600)
        self.holds.startService()
        self.clock.advance(0)
        self.assertEqual((self.announced, self.files("hold")), ([queue_id], []))
        self.assertEqual(self.used(), 1)

    def test_the_release_and_the_queue_control_fill_their_seam(self):
        self.assertTrue(verifyObject(IHeldMail, self.holds))
        self.assertTrue(verifyObject(IHeldMail, QueueControl(self.spool, self.clock, None,
                                                             self.holds)))

    @defer.inlineCallbacks
    def test_sandboxed_mail_is_never_released(self):
        sandboxed = yield self.hold("sandbox.test", until=START - 1, sandboxed=True)
        self.holds.startService()
        self.clock.advance(MIDNIGHT - START)
        self.assertEqual((self.files("hold"), self.announced), ([sandboxed], []))
        with self.assertRaises(NotQuotaHeld):
            yield self.holds.release(sandboxed)
        self.assertEqual((yield self.holds.release(None)), [])
        self.assertEqual(self.files("hold"), [sandboxed])

    @defer.inlineCallbacks
    def test_an_admin_release_goes_at_once_and_counts_even_past_the_quota(self):
        for _ in range(2):
            crossings = self.counter.reserve(USERS["held.test"], ACCOUNT).commit()
            self.warner.warn(ACCOUNT, "held.test", crossings)
        self.assertEqual(self.events.kinds[-1], EventKind.QUOTA_EXCEEDED)
        first = yield self.hold()
        second = yield self.hold()
        self.assertEqual((yield self.holds.release(first)), [first])
        self.assertEqual((self.announced, self.files("hold")), ([first], [second]))
        self.assertEqual(self.used(), 3)
        with self.assertRaises(KeyError):
            yield self.holds.release(first)  # in the queue now, not held
        self.assertEqual((yield self.holds.release(None)), [second])
        self.assertEqual(self.announced, [first, second])
        self.assertEqual(self.used(), 4)


def submit(port: int, login: str, sender: str = "a@held.test") -> tuple[int, str]:
    with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test",
                          context=tls_files().client, timeout=20) as c:
        c.login(login, PASSWORD)
        code, text = c.mail(sender)
        if code != 250:
            return code, text.decode()
        c.rcpt("r@example.net")
        code, text = c.data(message(sender))
        return code, text.decode()


class SessionTests(HoldCase):
    def listen_with_quotas(self) -> int:
        policy = SubmissionPolicy(ConnectionLimits(), RateLimiter(self.clock, per_hour=0),
                                  LoginGuard(self.clock), None, self.counter, self.warner)
        return self.listen("implicit", policy=policy)

    @defer.inlineCallbacks
    def test_the_message_over_quota_is_accepted_held_and_delivered_at_the_reset(self):
        self.realm.account = dataclasses.replace(ACCOUNT, notify="it@doe.test")
        port = self.listen_with_quotas()
        replies = []
        for _ in range(3):
            replies.append((yield deferToThread(submit, port, "held.test")))
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        queued = self.files("queue")
        held = self.files("hold")
        self.assertEqual((len(queued), len(held)), (2, 1))
        self.assertEqual(replies[2][1],
                         f"2.0.0 Ok: queued as {held[0]}, held: daily quota of 2 messages of "
                         "user held.test reached, released at 2026-12-07 00:00 UTC")
        self.assertEqual(self.announced, queued)  # delivery never heard of the held one
        envelope = self.spool.envelope(held[0])
        self.assertEqual((envelope.held_until, envelope.sandboxed), (MIDNIGHT, False))
        self.assertEqual(self.events.kinds[-1], EventKind.QUOTA_EXCEEDED)  # at the 2nd
        self.assertIn(b"Further messages are accepted and held until the quota resets at",
                      self.mails[-1])
        self.assertEqual(self.used(), 2)  # the held message counts nowhere yet

        self.holds.startService()
        self.clock.advance(MIDNIGHT - START - 1)
        self.assertEqual(self.files("hold"), held)
        self.clock.advance(1)
        self.assertEqual(self.announced, queued + held)  # once
        self.assertEqual((self.files("hold"), sorted(self.files("queue"))),
                         ([], sorted(queued + held)))
        self.assertEqual(self.used(), 1)
        # A new day, a new quota: sent at once again.
        self.assertEqual((yield deferToThread(submit, port, "held.test"))[0], 250)
        self.assertEqual(len(self.announced), 4)

    @defer.inlineCallbacks
    def test_a_refusing_user_still_gets_451_and_nothing_is_kept(self):
        login = "refused@held.test"
        USERS[login] = SmtpUser(login, quota_day=1)  # quota_action: refuse
        self.addCleanup(USERS.pop, login)
        port = self.listen_with_quotas()
        self.assertEqual((yield deferToThread(submit, port, login, login))[0], 250)
        self.assertEqual((yield deferToThread(submit, port, login, login)),
                         (451, "4.7.1 daily quota of 1 messages of user refused@held.test "
                               "reached, it resets at 2026-12-07 00:00 UTC"))
        self.assertEqual((len(self.files("queue")), self.files("hold")), (1, []))


def test_an_admins_count_past_the_quota_leaves_open_transactions_their_places():
    clock = Clock()
    clock.advance(START)
    counter = QuotaCounter(clock)
    user = SmtpUser("u", quota_day=1)
    open_place = counter.reserve(user, None)
    [crossing] = counter.count(user, None)
    assert (crossing.percent, crossing.used) == (100, 1)
    assert [(u.used, u.held) for u in counter.usage(user, None)] == [(1, 1)]
    open_place.commit()
    assert [(u.used, u.held) for u in counter.usage(user, None)] == [(2, 0)]
