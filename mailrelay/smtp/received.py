"""The Received: trace header the relay prepends (RFC 5321 4.4, RFC 3848 "with" types)."""

from __future__ import annotations

import datetime
import ipaddress
import re
from email.utils import format_datetime
from functools import lru_cache

from mailrelay.scope import ascii_form

# What may appear of the client's HELO argument: enough for any host name or address
# literal; everything else (parentheses, semicolons, quotes) would change the header's
# structure, and CR/LF never reach here (refused in commands).
_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
MAX_HELO = 255


def sanitize_helo(helo: str) -> str:
    return _UNSAFE_HELO.sub("_", helo[:MAX_HELO]) or "unknown"


@lru_cache(maxsize=1024)  # clients come back: parsing the address was 1% of a message
def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    try:
        if ipaddress.ip_address(ip).version == 6:
            return f"[IPv6:{ip}]"
    except ValueError:
        pass
    return f"[{ip}]"


def protocol_name(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool = False) -> str:
    """SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848); UTF8SMTP, UTF8SMTPS, UTF8SMTPA or
    UTF8SMTPSA (RFC 6531 3.7.3) for a message sent with SMTPUTF8."""
    if smtputf8:
        return "UTF8SMTP" + ("S" if tls else "") + ("A" if authenticated else "")
    if authenticated:
        return "ESMTPSA" if tls else "ESMTPA"
    if not esmtp:
        return "SMTP"
    return "ESMTPS" if tls else "ESMTP"


def received_header(
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    when: float,
) -> bytes:
    """The header as CRLF lines; ``for <rcpt>`` only for a single recipient (naming more
    would disclose Bcc recipients to each other), its domain as A-labels: the header is
    UTF-8 (an SMTPUTF8 message) only for a UTF-8 local part, and so the message can still
    go to a next hop without SMTPUTF8 when nothing else is."""
    date = _date(int(when))
    lines = [
        f"Received: from {sanitize_helo(helo)} ({address_literal(client_ip)})",
        f"\tby {hostname} (mailrelay) with {protocol} id {queue_id}",
    ]
    if len(recipients) == 1:
        lines.append(f"\tfor <{ascii_form(recipients[0]) or recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return "\r\n".join(lines).encode("utf-8") + b"\r\n"


@lru_cache(maxsize=2)  # the messages of one second share their date: made once
def _date(second: int) -> str:
    return format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))
