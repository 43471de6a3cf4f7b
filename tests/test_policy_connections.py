"""Connection limits: total, per client address, per user; messages per connection."""

from __future__ import annotations

import pytest

from mailrelay.policy.connections import ConnectionLimits
from mailrelay.reply import Reply


def test_per_user_cap_refuses_the_41st_connection_by_default():
    limits = ConnectionLimits(max_per_ip=0)
    tickets = []
    for i in range(40):
        t = limits.open(f"192.0.2.{i + 1}")
        limits.bind_user(t, "john@doe.com")
        tickets.append(t)
    extra = limits.open("192.0.2.200")
    with pytest.raises(Reply) as e:
        limits.bind_user(extra, "JOHN@doe.com")
    assert (e.value.code, e.value.status) == (421, "4.7.0")
    assert e.value.text == "too many connections for this user"
    assert extra.user is None
    limits.bind_user(extra, "jane@doe.com")  # other users are not affected
    tickets[0].close()
    another = limits.open("192.0.2.201")
    limits.bind_user(another, "john@doe.com")
    assert limits.connections(user="john@doe.com") == 40


def test_per_user_limit_from_the_user_overrides_the_default():
    limits = ConnectionLimits()
    a, b, c = (limits.open("127.0.0.1") for _ in range(3))
    limits.bind_user(a, "app", limit=2)
    limits.bind_user(b, "app", limit=2)
    with pytest.raises(Reply):
        limits.bind_user(c, "app", limit=2)
    for _ in range(50):
        limits.bind_user(limits.open("192.0.2.1"), "unlimited", limit=0)


def test_per_ip_cap():
    limits = ConnectionLimits(max_per_ip=3)
    for _ in range(3):
        limits.open("127.0.0.2")
    with pytest.raises(Reply) as e:
        limits.open("127.0.0.2")
    assert (e.value.code, e.value.status) == (421, "4.7.0")
    assert "too many connections from your address" in e.value.text
    limits.open("127.0.0.3")
    # A dual-stack socket shows an IPv4 client as ::ffff:a.b.c.d: the same client.
    with pytest.raises(Reply):
        limits.open("::ffff:127.0.0.2")


def test_ipv6_clients_are_counted_by_their_64():
    limits = ConnectionLimits(max_per_ip=2)
    limits.open("2001:db8:1:2::1")
    limits.open("2001:db8:1:2:ffff::9")
    with pytest.raises(Reply):
        limits.open("2001:db8:1:2::abcd")
    limits.open("2001:db8:1:3::1")
    assert limits.connections(ip="2001:db8:1:2::77") == 2


def test_total_cap():
    limits = ConnectionLimits(max_total=5, max_per_ip=0)
    tickets = [limits.open(f"10.0.0.{i}") for i in range(5)]
    with pytest.raises(Reply) as e:
        limits.open("10.0.1.1")
    assert e.value.text == "too many connections, try again later"
    tickets[2].close()
    limits.open("10.0.1.1")


def test_close_frees_everything_and_is_idempotent():
    limits = ConnectionLimits()
    t = limits.open("127.0.0.1")
    limits.bind_user(t, "u")
    t.close()
    t.close()
    assert limits.connections() == 0
    assert limits.connections(ip="127.0.0.1") == 0
    assert limits.connections(user="u") == 0
    assert limits._per_ip == {} and limits._per_user == {}
    with pytest.raises(RuntimeError):
        limits.bind_user(t, "u")


def test_rebinding_moves_the_connection_to_the_new_user():
    limits = ConnectionLimits()
    t = limits.open("127.0.0.1")
    limits.bind_user(t, "ip-user")  # IP authentication at connect
    limits.bind_user(t, "ip-user")  # same user again: still one
    assert limits.connections(user="ip-user") == 1
    limits.bind_user(t, "john@doe.com")  # then AUTH as someone else
    assert limits.connections(user="ip-user") == 0
    assert limits.connections(user="john@doe.com") == 1


def test_messages_per_connection():
    limits = ConnectionLimits(max_messages=3)
    t = limits.open("127.0.0.1")
    for _ in range(3):
        limits.count_message(t)
    with pytest.raises(Reply) as e:
        limits.count_message(t)
    assert (e.value.code, e.value.status) == (451, "4.7.0")
    assert "too many messages on this connection" in e.value.text
    limits.count_message(limits.open("127.0.0.1"))  # a new connection starts afresh


def test_default_messages_per_connection_is_2500():
    limits = ConnectionLimits()
    t = limits.open("127.0.0.1")
    for _ in range(2500):
        limits.count_message(t)
    with pytest.raises(Reply):
        limits.count_message(t)
