"""Daily and monthly quotas, per user and per account, driven the way the session drives
the policy, with a Clock for the calendar: warnings at exactly 80, 90 and 100 %, once per
period; 451 4.7.1 past the quota; a new UTC day or month starts from 0; the counts survive
a restart."""

from __future__ import annotations

import calendar
import email

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.auth.avatar import Submitter
from mailrelay.events import EventKind
from mailrelay.interfaces import IEventSink, IQuotaCounter, IQuotaReservation
from mailrelay.model import Account, SmtpUser
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.policy.connections import ConnectionLimits
from mailrelay.policy.quota import QuotaCounter, QuotaStore, QuotaWriter
from mailrelay.policy.quotawarn import QuotaWarner
from mailrelay.policy.ratelimit import RateLimiter
from mailrelay.policy.submission import SubmissionPolicy
from mailrelay.reply import Reply

START = calendar.timegm((2026, 12, 6, 20, 0, 0))  # a Sunday evening, UTC


@implementer(IEventSink)
class Recorded:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str | None, dict]] = []

    def emit(self, kind, account, user, data) -> None:
        self.events.append((kind, account, user, data))


class Relay:
    """The policy of one relay, its notification mails and its events."""

    def __init__(self, clock: Clock, account: Account, store=None, **defaults) -> None:
        self.clock = clock
        self.account = account
        self.mails: list[tuple[str, list[str], bytes]] = []
        self.sink = Recorded()
        self.policy = SubmissionPolicy(
            ConnectionLimits(), RateLimiter(clock, per_hour=0), LoginGuard(clock), None,
            QuotaCounter(clock, store=store, **defaults),
            QuotaWarner(clock, self.submit, "postmaster@relay.test", "relay.test", self.sink))

    def submit(self, sender, recipients, data):
        self.mails.append((sender, recipients, data))
        return succeed("q")

    def login(self, username: str, **fields) -> tuple[Submitter, object]:
        avatar = Submitter.for_user(SmtpUser(username, account=self.account.name, **fields),
                                    self.account, "password")
        session = self.policy.connect("127.0.0.1")
        session.authSucceeded(avatar)
        return avatar, session

    def send(self, avatar, session, recipients: int = 1) -> str:
        """One transaction: "250", or the refusal at MAIL."""
        try:
            session.mailFrom(avatar, "a@doe.test")
        except Reply as e:
            return f"{e.code} {e.status} {e.text}"
        for n in range(recipients):
            session.rcptTo(avatar, f"r{n}@example.net", n)
        session.accepted(avatar, None)
        return "250"

    def subjects(self) -> list[str]:
        return [email.message_from_bytes(m)["Subject"] for _, _, m in self.mails]


def clock_at(t: float = START) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


ACME = Account("acme", domains=frozenset({"doe.test"}), notify="it@acme.test")


def test_warnings_at_exactly_80_90_and_100_percent_then_451_naming_the_reset():
    relay = Relay(clock_at(), ACME)
    app, session = relay.login("app", quota_day=10)
    warned_at = {}
    for n in range(1, 11):
        before = len(relay.mails)
        assert relay.send(app, session, recipients=3) == "250"  # recipients count once
        if len(relay.mails) > before:
            warned_at[n] = relay.subjects()[-1]
    assert warned_at == {8: "Daily quota of 10 messages of user app at 80%",
                         9: "Daily quota of 10 messages of user app at 90%",
                         10: "Daily quota of 10 messages of user app reached"}
    assert all(to == ["it@acme.test"] and sender == "" for sender, to, _ in relay.mails)
    assert relay.send(app, session) == ("451 4.7.1 daily quota of 10 messages of user app "
                                        "reached, it resets at 2026-12-07 00:00 UTC")
    assert len(relay.mails) == 3  # a refusal after the 100 % mail is not mailed again
    assert relay.sink.events == [
        (EventKind.QUOTA_APPROACHING, "acme", "app",
         {"percent": 80, "period": "day", "limit": 10, "used": 8, "quota": "user"}),
        (EventKind.QUOTA_APPROACHING, "acme", "app",
         {"percent": 90, "period": "day", "limit": 10, "used": 9, "quota": "user"}),
        (EventKind.QUOTA_EXCEEDED, "acme", "app",
         {"percent": 100, "period": "day", "limit": 10, "used": 10, "quota": "user"}),
    ]
    body = email.message_from_bytes(relay.mails[-1][2]).get_payload()
    assert "10 of 10 (100%)" in body and "2026-12-07 00:00 UTC" in body


def test_a_new_utc_day_starts_from_zero_and_warns_again():
    relay = Relay(clock_at(), ACME)
    app, session = relay.login("app", quota_day=5)
    assert [relay.send(app, session) for _ in range(6)][-1].startswith("451 4.7.1")
    relay.clock.advance(calendar.timegm((2026, 12, 7, 0, 0, 0)) - START - 1)  # 23:59:59
    assert relay.send(app, session).startswith("451 4.7.1")
    relay.clock.advance(1)  # midnight UTC
    assert [relay.send(app, session) for _ in range(5)] == ["250"] * 5
    assert relay.send(app, session).endswith("resets at 2026-12-08 00:00 UTC")
    # 4 of 5 is 80 %, 5 of 5 is 90 % and 100 %: one mail says the highest
    assert relay.subjects() == ["Daily quota of 5 messages of user app at 80%",
                                "Daily quota of 5 messages of user app reached"] * 2


def test_a_monthly_quota_spans_the_days_and_resets_on_the_first():
    relay = Relay(clock_at(calendar.timegm((2026, 11, 29, 12, 0, 0))), ACME)
    app, session = relay.login("app", quota_month=4)
    assert [relay.send(app, session) for _ in range(2)] == ["250"] * 2
    relay.clock.advance(86400)  # Nov 30: the month goes on
    assert [relay.send(app, session) for _ in range(3)] == ["250", "250", (
        "451 4.7.1 monthly quota of 4 messages of user app reached, it resets at "
        "2026-12-01 00:00 UTC")]
    relay.clock.advance(12 * 3600)  # Dec 1, 00:00 UTC
    assert [relay.send(app, session) for _ in range(5)][-2:] == ["250", (
        "451 4.7.1 monthly quota of 4 messages of user app reached, it resets at "
        "2027-01-01 00:00 UTC")]
    assert relay.sink.events[-1][3] == {"percent": 100, "period": "month", "limit": 4,
                                        "used": 4, "quota": "user"}


def test_an_account_quota_is_shared_by_its_users_and_open_transactions_count():
    account = Account("acme", domains=frozenset({"doe.test"}), notify="it@acme.test",
                      quota_day=3)
    relay = Relay(clock_at(), account)
    a, sa = relay.login("a")
    b, sb = relay.login("b")
    assert relay.send(a, sa) == "250"
    sa.mailFrom(a, "a@doe.test")  # open: its place is held
    sb.mailFrom(b, "a@doe.test")
    with pytest.raises(Reply) as e:
        relay.policy.connect("127.0.0.1").mailFrom(b, "a@doe.test")
    assert e.value.text.startswith("daily quota of 3 messages of account acme reached")
    sb.reset()  # RSET gives the place back
    sb.mailFrom(b, "a@doe.test")
    sa.accepted(a, None)
    sb.accepted(b, None)
    assert relay.send(a, sa).startswith("451 4.7.1 daily quota of 3 messages of account")
    # 2 of 3 is under 80 %; the 3rd reaches 80, 90 and 100 % at once: one mail
    assert relay.subjects() == ["Daily quota of 3 messages of account acme reached"]


def test_the_counter_and_its_reservations_fill_their_seams():
    counter = QuotaCounter(clock_at(), per_day=5)
    assert verifyObject(IQuotaCounter, counter)
    assert verifyObject(IQuotaReservation, counter.reserve(SmtpUser("app"), None))


def test_the_configured_default_applies_and_0_switches_a_users_quota_off():
    relay = Relay(clock_at(), ACME, per_day=2)
    app, session = relay.login("app")
    free, free_session = relay.login("free", quota_day=0)
    assert [relay.send(app, session) for _ in range(3)][-1].startswith("451 4.7.1 daily "
                                                                       "quota of 2")
    assert [relay.send(free, free_session) for _ in range(5)] == ["250"] * 5


def test_a_lowered_quota_refuses_and_reports_it_full_once():
    relay = Relay(clock_at(), ACME)
    app, session = relay.login("app", quota_day=100)
    for _ in range(5):
        relay.send(app, session)
    app, session = relay.login("app", quota_day=3)
    assert relay.send(app, session).startswith("451 4.7.1")
    assert relay.send(app, session).startswith("451 4.7.1")
    assert relay.subjects() == ["Daily quota of 3 messages of user app reached"]


def test_counts_and_warnings_survive_a_restart(tmp_path):
    path = str(tmp_path / "quota.sqlite")
    clock = clock_at()
    writer = QuotaWriter(QuotaStore(path), clock, clock)
    relay = Relay(clock, ACME, store=writer)
    app, session = relay.login("app", quota_month=10)
    for _ in range(8):
        relay.send(app, session)
    writer.db.save(writer._take())  # what the service's flush does in its thread
    writer.db.close()
    # The relay restarts: the month's count goes on from 8, the 80 % is not sent again.
    writer = QuotaWriter(QuotaStore(path), clock, clock)
    relay = Relay(clock, ACME, store=writer)
    app, session = relay.login("app", quota_month=10)
    assert [relay.send(app, session) for _ in range(3)][:2] == ["250", "250"]
    assert relay.subjects() == ["Monthly quota of 10 messages of user app at 90%",
                                "Monthly quota of 10 messages of user app reached"]
    writer.db.close()
