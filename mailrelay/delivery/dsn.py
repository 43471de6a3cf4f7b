"""Delivery status notifications (RFC 3464): the bounce, the optional delay warning, and
the "relayed" notice for NOTIFY=SUCCESS past a next hop that does not offer DSN.

A DSN is an ordinary message queued in the spool with the null sender, so it is delivered,
retried and logged like any other; a message whose own sender is null is never bounced
(no loops). The sender's DSN requests (RFC 3461, dsnparams.py) show in it: ENVID as
Original-Envelope-Id, each ORCPT as Original-Recipient, and RET=FULL returns the whole
message with a bounce (up to RETURN_LIMIT bytes, else its headers, as Postfix's
bounce_size_limit); otherwise, and in every other notice, the headers only.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from email.utils import formatdate

from twisted.internet.defer import Deferred

from mailrelay import dsnparams
from mailrelay.model import Envelope
from mailrelay.scope import ascii_form
from mailrelay.spool.spool import read_headers
from mailrelay.spool.state import RecipientState

RETURN_LIMIT = 50_000  # bytes of a message returned whole (RET=FULL) with its bounce
_SUBJECT = {"failed": "Undelivered Mail Returned to Sender",
            "delayed": "Delayed Mail (still being retried)",
            "relayed": "Successful Mail Delivery Report"}
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


def status_of(code: int | None, text: str) -> str:
    """The enhanced status code: the one the reply carries if its class fits, else x.0.0."""
    m = _STATUS.match(text)
    klass = str(code)[0] if code and 200 <= code < 600 else (m.group(1) if m else "4")
    if m and m.group(1) == klass:
        return m.group(0)
    return f"{klass}.0.0"


def notify_address(envelope: Envelope) -> str | None:
    """Where a DSN about ``envelope`` goes, or None when none may be sent: the null sender
    (a DSN about a DSN would loop) or notifications switched off (``bounce_to == ""``)."""
    if not envelope.sender or envelope.bounce_to == "":
        return None
    return envelope.bounce_to or envelope.sender


def _ascii(text: str, limit: int = 500) -> str:
    """One line of printable ASCII, as delivery-status fields must be."""
    text = " ".join(text.split())[:limit]
    return text.encode("ascii", "replace").decode("ascii")


def _date(t: float) -> str:
    return formatdate(t, localtime=False)


def build(*, envelope: Envelope, recipients: Sequence[tuple[str, RecipientState]],
          action: str, headers: bytes, hostname: str, postmaster: str, to: str, now: float,
          retry_until: float | None = None, whole: bool = False) -> bytes:
    """The whole DSN message, CRLF lines. ``action`` is "failed", "delayed" or "relayed";
    ``whole``: ``headers`` is the whole message (RET=FULL), returned as message/rfc822."""
    boundary = f"{secrets.token_hex(12)}/{hostname}"
    failed = action == "failed"
    lines = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: <{ascii_form(to) or to}>",
        f"Subject: {_SUBJECT[action]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{envelope.id}.{secrets.token_hex(6)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if failed:
        lines += ["Your message could not be delivered to one or more recipients.",
                  "It is attached below." if whole else "It is attached below (headers only).",
                  ""]
    elif action == "relayed":
        lines += ["Your message was passed on to the mail server of the recipients below,",
                  "as you asked to be told. That server does not offer delivery status",
                  "notifications, so no further notice of its delivery will come.", ""]
    else:
        lines += ["Your message has not been delivered yet to one or more recipients.",
                  f"Delivery will be retried until {_date(retry_until or now)}.",
                  "You do not need to resend it.", ""]
    for rcpt, state in recipients:
        where = f" (from {state.remote})" if state.remote else ""
        lines.append(_ascii(f"<{ascii_form(rcpt) or rcpt}>{where}: {state.code or ''} "
                            f"{state.text}", 900))
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *([f"Original-Envelope-Id: {envelope.envid}"] if envelope.envid else []),
        f"Reporting-MTA: dns; {hostname}",
        f"X-Mailrelay-Queue-ID: {envelope.id}",
        f"Arrival-Date: {_date(envelope.received_at)}",
    ]
    for rcpt, state in recipients:
        lines.append("")
        orcpt = envelope.dsn.get(rcpt, {}).get("orcpt")
        if orcpt:
            lines.append(f"Original-Recipient: {_ascii(dsnparams.orcpt_field(orcpt), 600)}")
        shown = ascii_form(rcpt) or rcpt  # a UTF-8 domain as A-labels, not "?"
        lines += [f"Final-Recipient: rfc822; {_ascii(shown, 320)}", f"Action: {action}",
                  f"Status: {status_of(state.code, state.text)}"]
        if state.remote:
            lines.append(f"Remote-MTA: dns; {_ascii(state.remote.split('[')[0], 255)}")
        if state.remote and state.code:
            lines.append(f"Diagnostic-Code: smtp; {state.code} {_ascii(state.text)}")
        elif state.text:
            lines.append(f"Diagnostic-Code: X-Mailrelay; {_ascii(state.text)}")
        lines.append(f"Last-Attempt-Date: {_date(now)}")
        if retry_until is not None and action == "delayed":
            lines.append(f"Will-Retry-Until: {_date(retry_until)}")
    eight_bit = any(b > 127 for b in headers)
    what = {"failed": "Undelivered", "delayed": "Delayed", "relayed": "Relayed"}[action]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/rfc822" if whole else "Content-Type: text/rfc822-headers",
        f"Content-Description: {what} message" if whole
        else f"Content-Description: {what} message headers",
    ]
    if eight_bit:
        lines.append("Content-Transfer-Encoding: 8bit")
    # ASCII but for To: a sender whose local part is UTF-8 (RFC 6532), which queue() marks
    # SMTPUTF8 (a UTF-8 domain is written as A-labels).
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n"
    original = headers if headers.endswith(b"\r\n") or not headers else headers + b"\r\n"
    return head + original + f"\r\n--{boundary}--\r\n".encode("ascii")


def queue(spool, *, envelope: Envelope, recipients: Sequence[tuple[str, RecipientState]],
          action: str, hostname: str, postmaster: str, now: float,
          retry_until: float | None = None) -> Deferred | None:
    """Queue a DSN about ``envelope`` through the spool; fires with the new queue id once
    durable. None when no DSN may be sent (see notify_address)."""
    to = notify_address(envelope)
    if to is None:
        return None
    whole = False
    with spool.open_body(envelope.id) as body:
        # RFC 8689 5: a REQUIRETLS message is never returned whole (the notice itself
        # does not travel under REQUIRETLS), only its headers.
        if action == "failed" and envelope.ret == "FULL" and not envelope.requiretls:
            headers = body.read(RETURN_LIMIT + 1)
            whole = len(headers) <= RETURN_LIMIT
            if not whole:
                body.seek(-len(headers), 1)
        if not whole:
            headers = read_headers(body)
    data = build(envelope=envelope, recipients=recipients, action=action, headers=headers,
                 hostname=hostname, postmaster=postmaster, to=to, now=now,
                 retry_until=retry_until, whole=whole)
    dsn = Envelope(id="", sender="", recipients=[to], user=None, account=envelope.account,
                   client_ip=None, helo=None, tls=False, received_at=now,
                   priority=envelope.priority, smtputf8=ascii_form(to) is None)
    incoming = spool.create(dsn)
    try:
        incoming.write(data)
    except BaseException:
        incoming.abort()
        raise
    return incoming.commit()
