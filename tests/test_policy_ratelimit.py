"""Per-user rate limits: 451 with an honest retry time, exact under interleaved sessions."""

from __future__ import annotations

import random
import re

import pytest
from twisted.internet.task import Clock

from mailrelay.policy.ratelimit import RateLimiter
from mailrelay.reply import Reply


def retry_seconds(reply: Reply) -> int:
    return int(re.search(r"try again in (\d+) seconds", reply.text).group(1))


def test_hourly_limit_gives_451_with_retry_time_and_succeeds_after_the_window():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=3)
    for _ in range(3):
        limiter.reserve("john@doe.com").commit()
    clock.advance(100)
    with pytest.raises(Reply) as e:
        limiter.reserve("john@doe.com")
    assert (e.value.code, e.value.status) == (451, "4.7.1")
    assert "rate limit of 3 messages per hour exceeded" in e.value.text
    # The burst at t=0 leaves the window exactly one hour after it was sent.
    assert retry_seconds(e.value) == 3500
    clock.advance(3499)
    with pytest.raises(Reply):
        limiter.reserve("john@doe.com")
    clock.advance(1)
    limiter.reserve("john@doe.com").commit()


def test_the_retry_time_given_is_always_enough():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=50)
    rng = random.Random(5)
    refusals = 0
    for _ in range(2000):
        clock.advance(rng.uniform(0, 60))
        try:
            limiter.reserve("app").commit()
        except Reply as e:
            refusals += 1
            wait = retry_seconds(e)
            clock.advance(wait - 1)
            with pytest.raises(Reply):
                limiter.reserve("app")
            clock.advance(1)
            limiter.reserve("app").commit()
    assert refusals > 10


def test_users_are_counted_separately_and_case_insensitively():
    limiter = RateLimiter(Clock(), per_hour=1)
    limiter.reserve("John@Doe.com").commit()
    with pytest.raises(Reply):
        limiter.reserve("john@doe.com")
    limiter.reserve("jane@doe.com").commit()


def test_per_user_limit_overrides_the_default_and_zero_means_no_limit():
    limiter = RateLimiter(Clock(), per_hour=1)
    for _ in range(5):
        limiter.reserve("big", per_hour=5).commit()
    with pytest.raises(Reply):
        limiter.reserve("big", per_hour=5)
    for _ in range(1000):
        limiter.reserve("unlimited", per_hour=0).commit()


def test_default_is_200000_per_hour():
    limiter = RateLimiter(Clock())
    limiter.reserve("bulk", 200_000).commit()
    with pytest.raises(Reply) as e:
        limiter.reserve("bulk")
    assert "rate limit of 200000 messages per hour" in e.value.text


def test_per_minute_limit():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=100, per_minute=2)
    limiter.reserve("u").commit()
    clock.advance(10)
    limiter.reserve("u").commit()
    clock.advance(5)
    with pytest.raises(Reply) as e:
        limiter.reserve("u")
    assert "rate limit of 2 messages per minute exceeded" in e.value.text
    assert retry_seconds(e.value) == 45
    clock.advance(45)
    limiter.reserve("u").commit()


def test_when_both_windows_are_full_the_later_retry_time_is_given():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=2, per_minute=2)
    limiter.reserve("u", 2).commit()
    clock.advance(1)
    with pytest.raises(Reply) as e:
        limiter.reserve("u")
    assert "per hour" in e.value.text
    assert retry_seconds(e.value) == 3599


def test_open_reservations_count_so_interleaved_sessions_never_overshoot():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=10)
    open_ = [limiter.reserve("u") for _ in range(10)]
    with pytest.raises(Reply):
        limiter.reserve("u")
    open_[0].release()  # an aborted transaction gives its unit back
    open_[0].release()  # twice is harmless (connectionLost after RSET)
    again = limiter.reserve("u")
    with pytest.raises(Reply):
        limiter.reserve("u")
    again.commit()
    again.release()  # after commit: no effect
    assert limiter.usage("u") == (10, 10)


def test_many_random_interleaved_reservations_never_exceed_the_limit():
    clock = Clock()
    limit = 25
    limiter = RateLimiter(clock, per_hour=limit)
    rng = random.Random(1)
    pending = []
    committed: list[float] = []  # times of committed messages
    for _ in range(5000):
        clock.advance(rng.uniform(0, 20))
        action = rng.random()
        if action < 0.5:
            try:
                pending.append(limiter.reserve("u"))
            except Reply:
                pass
        elif pending:
            r = pending.pop(rng.randrange(len(pending)))
            if action < 0.8:
                r.commit()
                committed.append(clock.seconds())
            else:
                r.release()
        now = clock.seconds()
        in_window = sum(1 for t in committed if t > now - 3600)
        assert in_window + len(pending) <= limit
    assert len(committed) > 3 * limit  # the window slid and let more through


def test_recipients_mode_counts_each_rcpt():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=3, unit="recipients")
    t = limiter.transaction("u")
    assert t.count == 0
    t.recipient()
    t.recipient()
    t2 = limiter.transaction("u")
    t2.recipient()
    with pytest.raises(Reply) as e:
        t.recipient()  # the 4th recipient in the hour, across both sessions
    assert "rate limit of 3 recipients per hour exceeded" in e.value.text
    assert t.count == 2  # the refused RCPT took nothing
    t.commit()
    t2.release()
    t3 = limiter.transaction("u")
    t3.recipient()
    with pytest.raises(Reply):
        t3.recipient()


def test_messages_mode_reserves_at_mail_and_ignores_rcpt():
    limiter = RateLimiter(Clock(), per_hour=1)
    t = limiter.transaction("u")
    for _ in range(50):
        t.recipient()
    assert t.count == 1
    with pytest.raises(Reply):
        limiter.transaction("u")


def test_commit_after_release_is_a_bug():
    limiter = RateLimiter(Clock(), per_hour=1)
    r = limiter.reserve("u")
    r.release()
    with pytest.raises(RuntimeError):
        r.commit()
    with pytest.raises(RuntimeError):
        r.add()


def test_more_than_the_limit_at_once_is_refused_without_a_false_promise():
    limiter = RateLimiter(Clock(), per_hour=3)
    with pytest.raises(Reply) as e:
        limiter.reserve("u", 4)
    assert e.value.code == 451
    assert "try again" not in e.value.text
    assert limiter.usage("u") == (0, 0)


def test_a_release_after_the_units_left_the_window_does_not_go_negative():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=2)
    slow = limiter.reserve("u")
    clock.advance(3700)  # a transaction held open for over an hour
    limiter.reserve("u").commit()
    slow.release()
    assert limiter.usage("u") == (1, 1)
    limiter.reserve("u").commit()
    with pytest.raises(Reply):
        limiter.reserve("u")


def test_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(clock, per_hour=10**9, slots=60)
    for _ in range(100_000):
        clock.advance(0.5)
        limiter.reserve("busy").commit()
    windows = limiter._users["busy"]
    assert len(windows.hour.slots) <= 61
    assert len(windows.minute.slots) <= 61
    for i in range(1000):
        limiter.reserve(f"once{i}").commit()
    clock.advance(3601)
    limiter.reserve("other").commit()  # the next reservation sweeps idle users away
    assert set(limiter._users) == {"other"}


def test_bad_arguments():
    with pytest.raises(ValueError):
        RateLimiter(Clock(), unit="bytes")
    with pytest.raises(ValueError):
        RateLimiter(Clock(), slots=0)
