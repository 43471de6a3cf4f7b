"""IP authentication (CIDR networks -> SMTP users) and address authentication tables."""

from __future__ import annotations

import pytest

from mailrelay.auth.ipauth import KNOWN_ADDRESSES, AddressAuth, IpAuthError, IpAuthTable
from mailrelay.scope import ScopeError


def test_parse_and_lookup_ipv4_and_ipv6():
    table = IpAuthTable.parse("127.0.0.2/32 = app.example.com; ::1/128 = john@doe.com")
    assert table.lookup("127.0.0.2") == "app.example.com"
    assert table.lookup("127.0.0.3") is None
    assert table.lookup("::1") == "john@doe.com"
    assert table.lookup("::2") is None


def test_answers_stay_right_past_the_addresses_remembered():
    table = IpAuthTable.parse("10.1.0.0/16 = app.example.com")
    for round_ in range(2):
        for i in range(KNOWN_ADDRESSES + 100):
            inside = f"10.1.{i // 256 % 256}.{i % 256}"
            outside = f"10.2.{i // 256 % 256}.{i % 256}"
            assert table.lookup(inside) == "app.example.com", (round_, inside)
            assert table.lookup(outside) is None, (round_, outside)


def test_most_specific_network_wins_whatever_the_order():
    table = IpAuthTable.parse(
        """
        10.0.0.0/8 = wide
        10.1.2.0/24 = narrow
        10.1.0.0/16 = middle
        2001:db8::/32 = v6wide
        2001:db8:1::/48 = v6narrow
        """
    )
    assert table.lookup("10.1.2.3") == "narrow"
    assert table.lookup("10.1.3.3") == "middle"
    assert table.lookup("10.2.0.1") == "wide"
    assert table.lookup("2001:db8:1::5") == "v6narrow"
    assert table.lookup("2001:db8:2::5") == "v6wide"
    assert table.lookup("11.0.0.1") is None


def test_ipv4_client_seen_through_a_dual_stack_socket():
    table = IpAuthTable([("127.0.0.2", "app")])
    assert table.lookup("::ffff:127.0.0.2") == "app"
    assert table.lookup("::ffff:127.0.0.3") is None


def test_a_bare_address_is_one_host_and_ipv4_never_matches_ipv6():
    table = IpAuthTable([("192.0.2.7", "printer"), ("::/0", "anyv6")])
    assert table.lookup("192.0.2.7") == "printer"
    assert table.lookup("192.0.2.8") is None
    assert table.lookup("2001:db8::1") == "anyv6"


def test_not_an_address_matches_nothing():
    table = IpAuthTable([("0.0.0.0/0", "everyone")])
    assert table.lookup("not-an-ip") is None
    assert table.lookup("") is None


def test_empty_table():
    assert not IpAuthTable.parse("")
    assert not IpAuthTable.parse(" ;\n ")
    assert IpAuthTable.parse("127.0.0.1 = u")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "127.0.0.300/32 = app",
            "'127.0.0.300/32' is not an IPv4 or IPv6 network (examples: 192.0.2.0/24, "
            "192.0.2.7, 2001:db8::/32)",
        ),
        ("10.0.0.1/8 = app", "'10.0.0.1/8' has host bits set: did you mean 10.0.0.0/8?"),
        ("10.0.0.0/33 = app", "'10.0.0.0/33' is not an IPv4 or IPv6 network"),
        ("2001:db8::1/32 = app", "did you mean 2001:db8::/32?"),
        ("fe80::zz/64 = app", "'fe80::zz/64' is not an IPv4 or IPv6 network"),
        ("127.0.0.2/32 app", "'127.0.0.2/32 app' is not NETWORK = USERNAME"),
        ("127.0.0.2/32 = a b", "127.0.0.2/32: 'a b' is not a username"),
        ("127.0.0.2/32 =  ", "127.0.0.2/32: '' is not a username"),
        ("10.0.0.0/8 = a; 10.0.0.0/8 = b", "10.0.0.0/8 is listed twice (a, b)"),
    ],
)
def test_bad_entries_get_clear_errors(text, message):
    with pytest.raises(IpAuthError) as e:
        IpAuthTable.parse(text)
    assert message in str(e.value)


@pytest.mark.parametrize("text", ["127.0.0.2/32 = a, 127.0.0.3/32 = b", "127.0.0.2, 127.0.0.3"])
def test_comma_separated_entries_are_explained(text):
    with pytest.raises(IpAuthError) as e:
        IpAuthTable.parse(text)
    assert "entries are separated by semicolons, not commas" in str(e.value)


def test_address_authentication_is_off_by_default():
    auth = AddressAuth()
    assert not auth
    assert not auth.allows_address("alerts@example.com")


def test_address_authentication():
    auth = AddressAuth.parse("alerts@example.com; Printer@Example.com")
    assert auth.allows_address("printer@example.com")
    assert auth.allows_address(" ALERTS@example.com ")
    assert not auth.allows_address("ceo@example.com")
    assert not auth.allows_address("")
    with pytest.raises(ScopeError):
        AddressAuth.parse("example.com")
    with pytest.raises(ValueError):
        AddressAuth(["not an address"])
