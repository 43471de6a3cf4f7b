"""Client addresses, as the session shows them and as policy keys: IPv4-mapped IPv6
unwrapped, IPv6 grouped by prefix."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress:
    """``"127.0.0.2"``, ``"::1"``, ``"::ffff:127.0.0.2"`` (a dual-stack socket's view of an
    IPv4 client, returned as the IPv4 address). Raises ValueError."""
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@lru_cache(maxsize=4096)  # a client comes back: parsing its address again was 2% of a message
def plain_ip(text: str) -> str:
    """The text of a peer's address, an IPv4-mapped IPv6 address as plain IPv4; text that
    is not an IP address (a UNIX socket peer) as it is."""
    try:
        ip = parse_ip(text)
    except ValueError:
        return text
    return str(ip) if ip.version == 4 and ":" in text else text


@lru_cache(maxsize=4096)
def client_key(text: str, ipv6_prefix: int = 64) -> str:
    """The key counters use for a client: its IPv4 address, or its IPv6 /``ipv6_prefix``
    network, since one IPv6 client usually owns a whole /64 and could rotate through it.
    Text that is not an IP address (a UNIX socket peer) is its own key."""
    try:
        ip = parse_ip(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)
