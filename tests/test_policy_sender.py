"""The sender checks (policy/sender.py) without a session: which senders a login may use,
the replies that refuse the others, and what the wrapped policy hears."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailrelay.auth.avatar import Submitter
from mailrelay.interfaces import ISenderChecks, ISubmissionPolicy
from mailrelay.model import SmtpUser, Status
from mailrelay.policy.sender import SenderChecks, SenderPolicy
from mailrelay.reply import Reply
from mailrelay.scope import Scope


def avatar(status=Status.ALLOWED, unverified=()):
    user = SmtpUser("app", scope=Scope.parse("doe.test", "ceo@other.test"), status=status,
                    unverified=frozenset(unverified))
    return Submitter.for_user(user, None)


class Inner:
    """A wrapped session policy that records its hooks and answers ``answer``."""

    def __init__(self, answer=None) -> None:
        self.calls: list[tuple] = []
        self.answer = answer

    def __getattr__(self, name):
        def hook(*args):
            self.calls.append((name, *args[1:]))  # without the avatar
            return self.answer
        return hook


def refusal(check, *args) -> str:
    with pytest.raises(Reply) as caught:
        check(*args)
    reply = caught.value
    return f"{reply.code} {reply.status} {reply.text}"


def test_mail_from_refusals_in_order():
    inner = Inner()
    checks = SenderChecks(inner)
    blocked = avatar(Status.BLOCKED)
    assert refusal(checks.mailFrom, blocked, "") == "550 5.7.1 user app is blocked"
    assert refusal(checks.mailFrom, avatar(), "") == (
        "550 5.7.1 the null sender <> is not allowed for user app")
    assert refusal(checks.mailFrom, avatar(), "x@evil.test") == (
        "550 5.7.1 Sender address <x@evil.test> not allowed for user app")
    assert refusal(checks.mailFrom, avatar(), '"a b"@doe.test') == (
        '553 5.1.7 Sender address <"a b"@doe.test>: quoted local parts are not accepted, '
        "send from the plain address")
    # Only the scope refusal is told; the wrapped policy never heard of MAIL.
    assert inner.calls == [("senderRefused", "x@evil.test", False)]


def test_a_sender_in_scope_reaches_the_wrapped_policy():
    inner = Inner(answer="reserved")
    checks = SenderChecks(inner)
    assert checks.mailFrom(avatar(), "a@doe.test") == "reserved"
    assert checks.mailFrom(avatar(Status.SANDBOXED), "ceo@other.test") == "reserved"
    assert inner.calls == [("mailFrom", "a@doe.test"), ("mailFrom", "ceo@other.test")]


def test_unverified_senders_refused_only_when_verification_is_on():
    waiting = avatar(unverified={"doe.test"})
    assert SenderChecks(None, verify_senders=False).mailFrom(waiting, "a@doe.test") is None
    checks = SenderChecks(None, verify_senders=True)
    assert refusal(checks.mailFrom, waiting, "a@doe.test") == (
        "550 5.7.1 sender <a@doe.test> not verified: follow the confirmation link mailed to it")
    assert checks.mailFrom(waiting, "ceo@other.test") is None  # confirmed entry


def test_from_header_addresses():
    inner = Inner()
    checks = SenderChecks(inner)
    assert checks.headerFrom(avatar(), "b@doe.test") is None
    assert refusal(checks.headerFrom, avatar(), "ceo@victim.test") == (
        "550 5.7.1 From: header address ceo@victim.test not allowed for user app")
    assert refusal(checks.headerFrom, avatar(), '"x y"@doe.test') == (
        '550 5.6.0 From: header address "x y"@doe.test: quoted local parts are not accepted, '
        "use the plain address")
    assert inner.calls == [("senderRefused", "ceo@victim.test", True)]


def test_a_failing_refusal_notice_does_not_change_the_reply():
    class Failing(Inner):
        def senderRefused(self, avatar, address, header):
            raise RuntimeError("notifier down")

    checks = SenderChecks(Failing())
    assert refusal(checks.mailFrom, avatar(), "x@evil.test").startswith("550 5.7.1 ")


def test_other_hooks_are_the_wrapped_policys_or_nothing():
    inner = Inner(answer=2.0)
    checks = SenderChecks(inner)
    assert checks.authAttempt("app") == 2.0
    checks.reset()
    assert inner.calls == [("authAttempt",), ("reset",)]
    alone = SenderChecks(None)
    assert alone.authAttempt("app") is None
    assert alone.disconnect() is None


def test_sender_policy_wraps_every_kind_of_connect():
    assert verifyObject(ISubmissionPolicy, SenderPolicy())
    assert verifyObject(ISenderChecks, SenderPolicy().connect("192.0.2.1"))
    inner = Inner()

    class Sync:
        def connect(self, client_ip):
            return inner

    class Later:
        def connect(self, client_ip):
            return defer.succeed(inner)

    class Full:
        def connect(self, client_ip):
            raise Reply(421, "4.7.0", "Too many connections")

    checks = SenderPolicy(Sync(), verify_senders=True).connect("192.0.2.1")
    checks.mailFrom(avatar(), "a@doe.test")
    got = []
    SenderPolicy(Later()).connect("192.0.2.1").addCallback(got.append)
    got[0].mailFrom(avatar(), "b@doe.test")
    assert inner.calls == [("mailFrom", "a@doe.test"), ("mailFrom", "b@doe.test")]
    assert ISenderChecks.providedBy(got[0])
    assert refusal(SenderPolicy(Full()).connect, "192.0.2.1") == "421 4.7.0 Too many connections"
