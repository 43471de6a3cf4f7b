"""REQUIRETLS (RFC 8689): a sender's demand that its message travel only over TLS that
was checked, each hop of the way.

The session offers REQUIRETLS in EHLO inside TLS only, and ``take_mail`` takes it from
MAIL (smtp/server.py); the spool keeps it in the envelope (model.Envelope
``requiretls``), so a restart keeps the demand; the delivery client asks ``problem``
before MAIL whether this connection may carry such a message, and passes REQUIRETLS on
in MAIL. A message that cannot go is returned to its sender with 5.7.30 (RFC 8689 5),
never sent in a weaker way.

The ``TLS-Required: No`` header (RFC 8689 4.3) asks the opposite: that the recipient
domain's DANE or MTA-STS policy be ignored if it fails. Relays MAY honour it; this one
does not (a connection carries the mail of a destination under one policy, and a
domain's published demand stands), and leaves the header in the message for the next
hop. With REQUIRETLS in MAIL the header is ignored, as RFC 8689 4.1 says.
"""

from __future__ import annotations

from mailrelay.reply import Reply

KEYWORD = "REQUIRETLS"
STATUS = "5.7.30"  # RFC 8689 5: REQUIRETLS support required


def take_mail(params: dict[str, str | None], tls: bool) -> tuple[bool, dict[str, str | None]]:
    """Whether MAIL asked for REQUIRETLS, and the other parameters. Raises Reply: a value
    given (501 5.5.4), or a session without TLS, where it is not offered (530 5.7.10)."""
    if KEYWORD not in params:
        return False, params
    rest = dict(params)
    if rest.pop(KEYWORD) is not None:
        raise Reply(501, "5.5.4", "REQUIRETLS takes no value")
    if not tls:
        raise Reply(530, "5.7.10", "REQUIRETLS needs a TLS session")
    return True, rest


def problem(tls: bool, level: str, checked: bool, offered: bool) -> str | None:
    """Why a REQUIRETLS message cannot go over this connection, or None. ``level``: the
    hop's TLS policy (delivery/dane.py); ``checked``: its certificate was checked against
    the policy (DANE with usable TLSA records, or MTA-STS enforce, whose MX host was
    DNSSEC-validated or listed by the policy, RFC 8689 4.2.1); ``offered``: the next hop
    offers REQUIRETLS."""
    if not tls:
        return "no TLS to the next hop"
    if not checked:
        return f"the next hop is not authenticated by DANE or MTA-STS (TLS policy {level})"
    if not offered:
        return "the next hop does not offer REQUIRETLS"
    return None
