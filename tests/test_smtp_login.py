"""The session's login (smtp/login.py) without a session: the SASL exchanges, password,
IP and address logins through the portal, and the policy's say in each."""

from __future__ import annotations

import pytest
from test_smtp_support import PASSWORD, b64, make_portal, plain
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.policy.connections import ConnectionLimits
from mailrelay.policy.ratelimit import RateLimiter
from mailrelay.policy.submission import SubmissionPolicy
from mailrelay.reply import Reply
from mailrelay.smtp.login import SessionLogin
from mailrelay.smtp.sasl import Login


def run(coroutine):
    """The outcome of a coroutine that waits on nothing the test does not drive."""
    results: list = []
    ensureDeferred(coroutine).addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def setup(ip="192.0.2.7", **portal_args):
    portal, checker, realm = make_portal(**portal_args)
    clock = Clock()
    policy = SubmissionPolicy(ConnectionLimits(max_per_user=1), RateLimiter(clock),
                              LoginGuard(clock))
    login = SessionLogin(portal, clock, 1, ip)
    login.policy = policy.connect(ip)
    return login, checker, realm, policy


def test_plain_with_an_initial_response():
    login, checker, _, _ = setup()
    credentials = login.start(b"plain", plain("doe.test"))
    assert isinstance(credentials, Login) and login.exchange is None
    assert run(login.password(credentials, True)) is True
    assert (login.username, login.by_password) == ("doe.test", True)
    assert checker.seen == [("doe.test", "192.0.2.7", True)]


def test_login_exchange_step_by_step():
    login, _, _, _ = setup()
    assert login.start(b"LOGIN", None) == b"Username:"
    assert login.exchange is not None
    assert login.respond(b64("doe.test")) == b"Password:"
    credentials = login.respond(b64(PASSWORD))
    assert login.exchange is None
    assert run(login.password(credentials, False)) is True


def test_exchange_refusals():
    login, _, _, _ = setup()
    with pytest.raises(Reply) as unknown:
        login.start(b"CRAM-MD5", None)
    assert (unknown.value.code, unknown.value.status) == (504, "5.5.4")
    login.start(b"LOGIN", None)
    with pytest.raises(Reply) as cancelled:
        login.respond(b"*")
    assert (cancelled.value.code, cancelled.value.text) == (501, "Authentication cancelled")
    assert login.exchange is None


def test_bad_credentials_are_counted_and_told_to_the_policy():
    login, _, _, policy = setup()
    for _ in range(2):
        assert run(login.password(login.start(b"PLAIN", plain("doe.test", "bad")), True)) \
            is False
    assert login.failures == 2 and login.avatar is None
    assert policy.logins.check("192.0.2.7") == 0  # two failures: no delay yet


def test_a_directory_that_cannot_answer_is_a_temporary_failure():
    login, _, _, _ = setup()
    with pytest.raises(Reply) as failure:
        run(login.password(login.start(b"PLAIN", plain("ldapdown.test")), True))
    assert (failure.value.code, failure.value.status) == (454, "4.7.0")


def test_a_login_the_policy_refuses_is_logged_out():
    login, _, realm, policy = setup()
    other = SessionLogin(login.portal, login.clock, 2, "192.0.2.8")
    other.policy = policy.connect("192.0.2.8")
    assert run(login.password(login.start(b"PLAIN", plain("doe.test")), True))
    with pytest.raises(Reply) as refused:  # max_per_user=1
        run(other.password(other.start(b"PLAIN", plain("doe.test")), True))
    assert refused.value.code == 421
    assert other.avatar is None and realm.logouts == 1


def test_ip_login_once_per_connection_until_forgotten():
    login, _, realm, _ = setup(ip="192.0.2.50", ip_users={"192.0.2.0/24": "webapp"})
    run(login.by_ip())
    assert (login.username, login.avatar.method, login.ip_tried) == ("webapp", "ip", True)
    login.forget()
    assert (login.avatar, login.ip_tried, realm.logouts) == (None, False, 1)
    outside, _, _, _ = setup(ip="198.51.100.1", ip_users={"192.0.2.0/24": "webapp"})
    run(outside.by_ip())
    assert outside.avatar is None and outside.ip_tried


def test_address_login_vouches_for_its_sender_only():
    login, _, realm, _ = setup(addresses="alerts@doe.test;printer@doe.test")
    run(login.by_sender("alerts@doe.test"))
    assert (login.username, login.avatar.method) == ("alerts@doe.test", "address")
    run(login.by_sender("alerts@doe.test"))  # the same sender: the same login
    assert realm.logins == 1
    run(login.by_sender("printer@doe.test"))
    assert login.username == "printer@doe.test" and realm.logouts == 1
    run(login.by_sender("ceo@doe.test"))  # not listed: no login at all
    assert login.avatar is None and realm.logouts == 2
