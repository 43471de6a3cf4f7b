"""Brute-force defence: delays then a block for a guessing address, never for the real user."""

from __future__ import annotations

import gc
import weakref

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.reply import Reply

ATTACKER = "127.0.0.2"
REAL = "127.0.0.3"
USER = "john@doe.com"


def test_guessing_loop_is_delayed_then_blocked_while_the_real_user_logs_in_elsewhere():
    clock = Clock()
    guard = LoginGuard(clock)  # defaults: delay after 3, block after 10
    delays = []
    for _ in range(10):
        delays.append(guard.check(ATTACKER))
        clock.advance(delays[-1])  # the session waits this long before checking
        guard.failed(ATTACKER, USER)
        # The real user, from another address, is never slowed.
        assert guard.check(REAL) == 0
        guard.succeeded(REAL, USER)
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 16, 16]
    with pytest.raises(Reply) as e:
        guard.check(ATTACKER)
    assert (e.value.code, e.value.status) == (421, "4.7.0")
    assert e.value.text == "too many failed logins from your address, try again later"
    assert guard.check(REAL) == 0


def test_refusing_a_blocked_address_keeps_nothing_alive():
    # One shared exception, raised for every attempt, kept each raise's traceback: each
    # attempt's frames and what they held (the session, its TLS connection), for good.
    guard = LoginGuard(Clock(), block_after=2, delay_after=1)
    for _ in range(2):
        guard.failed(ATTACKER, USER)

    class Attempt:
        def run(self) -> None:
            guard.check(ATTACKER)

    refs = []
    for _ in range(50):
        attempt = Attempt()
        refs.append(weakref.ref(attempt))
        with pytest.raises(Reply) as e:
            attempt.run()
        assert e.value.code == 421
        del attempt, e
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_block_expires_and_then_the_address_starts_afresh():
    clock = Clock()
    guard = LoginGuard(clock, block_after=4, delay_after=2, block_time=900)
    for _ in range(4):
        guard.failed(ATTACKER, USER)
    clock.advance(899)
    with pytest.raises(Reply):
        guard.check(ATTACKER)
    clock.advance(1)
    assert guard.check(ATTACKER) == 0
    guard.failed(ATTACKER, USER)
    assert guard.check(ATTACKER) == 0  # one failure since the block: not yet delayed


def test_failures_leave_the_window():
    clock = Clock()
    guard = LoginGuard(clock, window=600, delay_after=3)
    for _ in range(3):
        guard.failed(ATTACKER, USER)
    assert guard.check(ATTACKER) == 1
    clock.advance(600)
    assert guard.check(ATTACKER) == 0


def test_spraying_many_usernames_from_one_address_is_blocked():
    guard = LoginGuard(Clock())
    for i in range(10):
        guard.failed(ATTACKER, f"user{i}@doe.com")
    with pytest.raises(Reply):
        guard.check(ATTACKER)


def test_a_success_forgives_only_that_users_own_typos():
    guard = LoginGuard(Clock(), delay_after=3)
    guard.failed(REAL, USER)
    guard.failed(REAL, USER)
    guard.failed(REAL, "other@doe.com")
    guard.succeeded(REAL, "John@Doe.com")
    assert guard.check(REAL) == 0
    guard.failed(REAL, "other@doe.com")
    guard.failed(REAL, "third@doe.com")
    # A valid login does not launder the failures for other usernames.
    guard.succeeded(REAL, USER)
    assert guard.check(REAL) == 1


def test_ipv6_addresses_in_one_64_count_together():
    guard = LoginGuard(Clock(), delay_after=2, block_after=3)
    guard.failed("2001:db8:5::1", USER)
    guard.failed("2001:db8:5::2", USER)
    guard.failed("2001:db8:5:0:ffff::3", USER)
    with pytest.raises(Reply):
        guard.check("2001:db8:5::99")
    assert guard.check("2001:db8:6::1") == 0
    assert guard.check("::1") == 0


def test_distributed_guessing_of_one_username_raises_an_alert_but_never_locks_the_user():
    guard = LoginGuard(Clock(), user_alert_after=5)
    with capturedLogs() as events:
        for i in range(12):
            guard.failed(f"198.51.100.{i}", USER)
    alerts = [formatEvent(e) for e in events if "addresses" in formatEvent(e)]
    assert alerts == [
        f"login failures: user={USER} failures=5 from 5 addresses within 600 s, "
        "last ip=198.51.100.4"
    ]
    assert guard.check(REAL) == 0


def test_every_failure_and_threshold_is_logged_with_ip_and_user_on_one_line():
    guard = LoginGuard(Clock(), delay_after=2, block_after=3, block_time=60)
    with capturedLogs() as events:
        for _ in range(3):
            guard.failed(ATTACKER, "evil\r\nlogin failed: ip=192.0.2.1 user=x")
    lines = [formatEvent(e) for e in events]
    assert all("\n" not in line and "\r" not in line for line in lines)
    user = "evil??login failed: ip=192.0.2.1 user=x"
    assert lines == [
        f"login failed: ip={ATTACKER} user={user} failures=1",
        f"login failed: ip={ATTACKER} user={user} failures=2",
        f"login failures: delaying ip={ATTACKER} user={user} failures=2",
        f"login failed: ip={ATTACKER} user={user} failures=3",
        f"login failures: blocked ip={ATTACKER} user={user} failures=3 for 60 s",
    ]


def test_memory_is_bounded():
    clock = Clock()
    guard = LoginGuard(clock, max_entries=100)
    for i in range(1000):
        guard.failed(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert len(guard._by_ip.entries) <= 100
    assert len(guard._by_user.entries) <= 100
    clock.advance(601)
    guard.check("10.9.9.9")  # the next check sweeps what has expired
    assert not guard._by_ip.entries and not guard._by_user.entries


def test_bad_thresholds():
    with pytest.raises(ValueError):
        LoginGuard(Clock(), delay_after=5, block_after=4)
