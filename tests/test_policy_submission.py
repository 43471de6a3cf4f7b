"""The composed submission policy, driven the way the session drives it."""

from __future__ import annotations

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailrelay.auth.avatar import Submitter
from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy
from mailrelay.model import Account, SmtpUser
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.policy.connections import ConnectionLimits
from mailrelay.policy.notify import SenderNotifier
from mailrelay.policy.ratelimit import RateLimiter
from mailrelay.policy.submission import SubmissionPolicy
from mailrelay.reply import Reply

ACCOUNT = Account("doe", domains=frozenset({"doe.com"}), notify="admin@doe.com")


def avatar(username: str = "john@doe.com", method: str = "password", **fields) -> Submitter:
    return Submitter.for_user(SmtpUser(username, account="doe", **fields), ACCOUNT, method)


def make(unit: str = "messages", **limits):
    clock = Clock()
    sent: list[bytes] = []
    policy = SubmissionPolicy(
        ConnectionLimits(**limits),
        RateLimiter(clock, per_hour=100, unit=unit),
        LoginGuard(clock),
        SenderNotifier(
            clock,
            lambda s, r, m: succeed(sent.append(m)),
            "postmaster@relay.example",
            "relay.example",
        ),
    )
    return clock, policy, sent


def test_provides_the_interfaces():
    clock, policy, sent = make()
    assert verifyObject(ISubmissionPolicy, policy)
    assert verifyObject(ISessionPolicy, policy.connect("127.0.0.1"))


def test_41st_session_of_one_user_is_refused_and_a_closed_one_frees_its_place():
    clock, policy, sent = make(max_per_ip=0)
    john = avatar()
    sessions = []
    for _ in range(40):
        s = policy.connect("127.0.0.1")
        s.authSucceeded(john)
        sessions.append(s)
    extra = policy.connect("127.0.0.1")
    with pytest.raises(Reply) as e:
        extra.authSucceeded(john)
    assert (e.value.code, e.value.status) == (421, "4.7.0")
    sessions[0].disconnect()
    extra.authSucceeded(john)
    assert policy.connections.connections(user="john@doe.com") == 40


def test_users_own_connection_limit_applies():
    clock, policy, sent = make()
    app = avatar("app", max_connections=1)
    policy.connect("127.0.0.1").authSucceeded(app)
    with pytest.raises(Reply):
        policy.connect("127.0.0.1").authSucceeded(app)


def test_rate_limit_across_interleaved_sessions_and_release_on_reset():
    clock, policy, sent = make()
    john = avatar(rate_limit=3)
    sessions = [policy.connect(f"127.0.0.{i}") for i in range(1, 6)]
    results = []
    for s in sessions:
        s.authSucceeded(john)
        try:
            s.mailFrom(john, "john@doe.com")
            results.append("250")
        except Reply as e:
            results.append(f"{e.code} {e.status}")
    assert results == ["250", "250", "250", "451 4.7.1", "451 4.7.1"]
    sessions[0].reset()  # RSET: its reservation is given back
    sessions[3].mailFrom(john, "john@doe.com")
    sessions[1].accepted(john, None)
    sessions[2].disconnect()  # a connection lost mid-transaction gives it back too
    sessions[4].mailFrom(john, "john@doe.com")
    assert policy.rates.usage("john@doe.com")[0] == 3


def test_recipients_mode_refuses_the_rcpt_over_the_limit():
    clock, policy, sent = make(unit="recipients")
    app = avatar("app", rate_limit=2)
    s = policy.connect("127.0.0.1")
    s.authSucceeded(app)
    s.mailFrom(app, "x@doe.com")
    s.rcptTo(app, "a@example.org", 0)
    s.rcptTo(app, "b@example.org", 1)
    with pytest.raises(Reply) as e:
        s.rcptTo(app, "c@example.org", 2)
    assert "rate limit of 2 recipients per hour" in e.value.text
    s.data(app, None)
    s.accepted(app, None)
    assert policy.rates.usage("app")[0] == 2


def test_messages_per_connection():
    clock, policy, sent = make(max_messages=2)
    john = avatar()
    s = policy.connect("127.0.0.1")
    s.authSucceeded(john)
    for _ in range(2):
        s.mailFrom(john, "john@doe.com")
        s.accepted(john, None)
    with pytest.raises(Reply) as e:
        s.mailFrom(john, "john@doe.com")
    assert (e.value.code, e.value.status) == (451, "4.7.0")


def test_guessing_from_one_address_is_blocked_while_the_user_logs_in_from_another():
    clock, policy, sent = make()
    attacker = policy.connect("127.0.0.2")
    waits = []
    for _ in range(10):
        waits.append(attacker.authAttempt("john@doe.com"))
        clock.advance(waits[-1])
        assert attacker.authFailed("john@doe.com") is None
    assert waits == [0, 0, 0, 1, 2, 4, 8, 16, 16, 16]
    with pytest.raises(Reply) as e:
        attacker.authAttempt("john@doe.com")
    assert (e.value.code, e.value.status) == (421, "4.7.0")
    real = policy.connect("127.0.0.3")
    assert real.authAttempt("john@doe.com") == 0
    real.authSucceeded(avatar())
    real.mailFrom(avatar(), "john@doe.com")


def test_refused_sender_notifies_the_account():
    clock, policy, sent = make()
    s = policy.connect("192.0.2.7")
    s.senderRefused(avatar(), "ceo@doe.com", False)
    s.senderRefused(avatar(), "ceo@doe.com", True)
    assert len(sent) == 1
    assert b"from 192.0.2.7  ceo@doe.com (envelope MAIL FROM)" in sent[0]
    clock.advance(600)
    assert len(sent) == 2 and b"(header From:)" in sent[1]


def test_without_a_notifier_refusals_are_only_the_sessions_business():
    policy = SubmissionPolicy(ConnectionLimits(), RateLimiter(Clock()), LoginGuard(Clock()))
    policy.connect("127.0.0.1").senderRefused(avatar(), "ceo@doe.com", False)


def test_disconnect_frees_everything():
    clock, policy, sent = make()
    john = avatar()
    s = policy.connect("127.0.0.1")
    s.authSucceeded(john)
    s.mailFrom(john, "john@doe.com")
    s.disconnect()
    assert policy.connections.connections() == 0
    assert policy.connections.connections(user="john@doe.com") == 0
    assert policy.rates.usage("john@doe.com") == (0, 0)
