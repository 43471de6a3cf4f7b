"""Login without AUTH: IP authentication (networks mapped to SMTP users) and address
authentication (listed sender addresses).

IP authentication is configured as text, entries separated by semicolons or newlines, each
``NETWORK = USERNAME``::

    127.0.0.2/32 = app.example.com; ::1/128 = john@doe.com
    192.0.2.0/24 = webmail

A bare address counts as a single host (/32, /128). A client matching several networks
belongs to the most specific one (longest prefix). The session then treats the client as
that SMTP user: its scope, status and limits apply as after a password login.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from mailrelay.net import parse_ip
from mailrelay.scope import is_address, parse_addresses

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
KNOWN_ADDRESSES = 4096  # client addresses whose answer is kept (all forgotten when full)


class IpAuthError(ValueError):
    """A bad IP authentication entry; the text names it and says what is wrong."""


def parse_network(text: str) -> Network:
    text = text.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise IpAuthError(
            f"{text!r} is not an IPv4 or IPv6 network (examples: 192.0.2.0/24, 192.0.2.7, "
            "2001:db8::/32)"
        )
    raise IpAuthError(f"{text!r} has host bits set: did you mean {loose}?")


class IpAuthTable:
    """Networks mapped to SMTP usernames; empty when IP authentication is not used."""

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        """``entries``: (network, username) pairs. Raises IpAuthError."""
        seen: dict[Network, str] = {}
        for network_text, username in entries:
            network = parse_network(network_text)
            username = username.strip()
            if not username or re.search(r"[\s;=,]", username):
                raise IpAuthError(f"{network_text.strip()}: {username!r} is not a username")
            if network in seen:
                raise IpAuthError(f"{network} is listed twice ({seen[network]}, {username})")
            seen[network] = username
        self._known: dict[str, str | None] = {}  # answers of lookup, by address text
        # Longest prefix first, so the first match is the most specific.
        self.networks: list[tuple[Network, str]] = sorted(
            seen.items(), key=lambda item: item[0].prefixlen, reverse=True
        )

    @classmethod
    def parse(cls, text: str) -> IpAuthTable:
        """``"127.0.0.2/32 = app.example.com; ::1/128 = john@doe.com"``. Raises IpAuthError."""
        entries = []
        for item in re.split(r"[;\n]", text):
            item = item.strip()
            if not item:
                continue
            if "," in item:
                raise IpAuthError(f"entries are separated by semicolons, not commas: {item!r}")
            network, equals, username = item.partition("=")
            if not equals:
                raise IpAuthError(f"{item!r} is not NETWORK = USERNAME")
            entries.append((network, username))
        return cls(entries)

    def lookup(self, ip: str) -> str | None:
        """The SMTP username for a client at ``ip`` (IPv4-mapped IPv6 counts as IPv4), or
        None when no network matches."""
        # Parsing the address is most of the work, and a relay's clients are few addresses.
        try:
            return self._known[ip]
        except KeyError:
            pass
        if len(self._known) >= KNOWN_ADDRESSES:
            self._known.clear()
        username = self._known[ip] = self._lookup(ip)
        return username

    def _lookup(self, ip: str) -> str | None:
        try:
            address = parse_ip(ip)
        except ValueError:
            return None
        for network, username in self.networks:
            if address.version == network.version and address in network:
                return username
        return None

    def __bool__(self) -> bool:
        return bool(self.networks)


class AddressAuth:
    """Sender addresses that may send without AUTH. Empty (off) by default: anyone can
    write any MAIL FROM, so each listed address is open to whoever can reach the relay."""

    def __init__(self, addresses: Iterable[str] = ()) -> None:
        """Raises ValueError for an entry that is not an address."""
        addresses = [a.strip().lower() for a in addresses]
        for address in addresses:
            if not is_address(address):
                raise ValueError(f"{address!r} is not a valid email address")
        self.addresses = frozenset(addresses)

    @classmethod
    def parse(cls, text: str) -> AddressAuth:
        """``"alerts@example.com;printer@example.com"``; raises scope.ScopeError."""
        return cls(parse_addresses(text))

    def allows_address(self, sender: str) -> bool:
        """True when ``sender`` (the envelope MAIL FROM) may send without AUTH."""
        return sender.strip().lower() in self.addresses

    def __bool__(self) -> bool:
        return bool(self.addresses)
