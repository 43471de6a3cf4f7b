"""The kinds of event the relay reports (IEventSink), as accounts see them in webhooks.

Places that see something happen call ``events.emit(kind, account, user, data)`` on the
IEventSink they were given; ``NO_EVENTS`` is the sink of a relay without webhooks. The
call is all they do: keeping, signing and sending is the sink's (it adds the event id and
the time), so an event never slows the message path. ``account`` and ``user`` are the
SMTP user's who sent the message (or whose login it is); what the relay sends of its own
(bounces, notices, reports: no user) reports nothing.

``data``: JSON-able, the same field name for the same thing in every kind; a field that is
not known is left out.

- ``queue_id``: the message's queue id, as the ``250`` and the log name it.
- ``sender``: the envelope sender (``MAIL FROM``; ``""`` for the null sender).
- ``recipient``: the one envelope recipient the event is about; ``recipients``: all of a
  message's (audit BCC copies included: each of them has its delivery events too).
- ``auth_method``: how the sender logged in: ``password``, ``ip`` or ``address``.
- ``client_ip``: the submitting client's address.
- ``reply``: an SMTP reply, ``{"code": 550, "status": "5.1.1", "text": "..."}``: the
  relay's to the client for ``message.rejected``, the next hop's (or the one a DSN
  reports) for delivery events. ``status`` is the enhanced status code (``x.0.0`` when the
  server gave none), ``text`` the rest of the reply.
- ``remote_reply``: in delivery events, the same reply of the next hop as one line, as
  it came (``550 5.1.1 <bob@example.net>: Recipient address rejected``).
- ``remote``: the next hop, ``mx.example.net[192.0.2.1]``, when one answered.
- ``source``: where a delivery event was learnt: ``delivery`` (the next hop's reply) or
  ``dsn`` (a report that came back later to the account's bounce domain).

Per kind (besides the fields above where known):

- ``message.processed``: accepted and durable (after the ``250``'s fsync): queue_id,
  sender, recipients, ``size`` (octets, as the client sent it), auth_method, client_ip,
  ``tls``, ``sandboxed`` (kept and never delivered).
- ``message.rejected``: a reply of ``4xx``/``5xx`` to a logged-in client's ``MAIL``,
  ``RCPT``, ``DATA`` or ``BDAT`` (the end of the data included): ``stage`` (the
  command), reply, auth_method, client_ip, sender (the one given or in use), recipient
  (at ``RCPT``), recipients (at ``DATA``/``BDAT``: those accepted). Only for a session
  logged in (the account is known): a refused or failed login (``AUTH``) and commands
  before one report nothing, as anyone can send those under any name.
- ``message.delivered``, ``message.deferred``: queue_id, sender, recipient, reply,
  remote_reply, remote, ``attempt`` (1 for the first), ``tls`` (to the next hop),
  source, auth_method, client_ip (those of a DSN, source ``dsn``, have no attempt, tls,
  auth_method or client_ip).
- ``message.bounced``: the same, and ``bounce``: ``hard`` (the address cannot receive
  mail: features/hooks.py HARD_BOUNCE, the recipient is suppressed) or ``soft``;
  ``expired``: true when the message's lifetime ran out while deferred (reply 4.4.7).
- ``message.suppressed``: queue_id, sender, recipient, auth_method, client_ip: not sent
  to a recipient on the suppression list.
- ``message.opened``, ``message.unsubscribed``: queue_id, recipient;
  ``message.clicked``: and ``url``.
- ``message.complained``: queue_id, sender, recipient, ``feedback_type`` (ARF: abuse,
  fraud, virus...); the recipient is suppressed.
- ``credential.disabled``: ``reason`` (``dormant``: no login for ``[policy]
  dormant_after``), ``last_login`` (RFC 3339 UTC, or null: never) and
  ``last_login_ip``.
- ``quota.approaching`` (``percent``: 80 or 90), ``quota.exceeded``.
"""

from __future__ import annotations

import enum
import time

from zope.interface import implementer

from mailrelay.interfaces import IEventSink


class EventKind(enum.StrEnum):
    PROCESSED = "message.processed"  # accepted and spooled
    DELIVERED = "message.delivered"
    DEFERRED = "message.deferred"
    BOUNCED = "message.bounced"  # data["bounce"]: "hard" or "soft"
    REJECTED = "message.rejected"  # refused at submission, with the reply
    SUPPRESSED = "message.suppressed"
    OPENED = "message.opened"
    CLICKED = "message.clicked"
    UNSUBSCRIBED = "message.unsubscribed"
    COMPLAINED = "message.complained"
    QUOTA_APPROACHING = "quota.approaching"  # data["percent"]: 80 or 90
    QUOTA_EXCEEDED = "quota.exceeded"
    CREDENTIAL_DISABLED = "credential.disabled"


@implementer(IEventSink)
class NoEvents:
    """Drops every event."""

    def emit(self, kind: str, account: str | None, user: str | None, data: dict) -> None:
        pass


NO_EVENTS = NoEvents()


def reply(code: int, status: str | None, text: str) -> dict:
    """The ``reply`` field of a reply whose parts are known (the relay's own)."""
    return {"code": code, "status": status, "text": text}


def next_hop_reply(code: int | None, text: str) -> dict:
    """The ``reply`` and ``remote_reply`` fields of a next hop's reply as delivery keeps
    it: the text after the code, which starts with the enhanced status when the server
    gave one (``5.1.1 user unknown``)."""
    from mailrelay.delivery.dsn import status_of

    status = status_of(code, text)
    rest = text[len(status):].lstrip() if text.split(" ", 1)[0] == status else text
    return {"reply": reply(code, status, rest), "remote_reply": f"{code} {text}".strip()}


def of_message(envelope) -> dict:
    """The fields every event about a spooled message has: queue_id, sender, and how and
    from where it was submitted (auth_method, client_ip) where known."""
    return known({"queue_id": envelope.id, "sender": envelope.sender,
                  "auth_method": envelope.auth_method, "client_ip": envelope.client_ip})


def known(*parts: dict) -> dict:
    """``parts`` merged, the later ones winning, without the fields that are None (not
    known: left out of the event)."""
    return {k: v for part in parts for k, v in part.items() if v is not None}


def rfc3339(t: float | None) -> str | None:
    """Unix time as RFC 3339 UTC (``2026-12-06T12:30:00Z``)."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
