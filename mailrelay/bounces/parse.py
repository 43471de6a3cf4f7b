"""What a message sent to a VERP address reports: an RFC 3464 delivery status notification
or an RFC 5965 (ARF) complaint, read with Python's email package.

- A DSN is a ``multipart/report`` whose ``message/delivery-status`` part has a block of
  fields per recipient: ``Final-Recipient``, ``Action`` (failed, delayed, delivered,
  relayed, expanded), ``Status`` (an RFC 3463 code), ``Diagnostic-Code``, ``Remote-MTA``.
  Postfix, Exim, Exchange, Gmail and Sendmail all send this form.
- A complaint is a ``multipart/report`` whose ``message/feedback-report`` part has
  ``Feedback-Type: abuse`` (or fraud, virus): the recipient marked the mail as spam.
- The returned message (``message/rfc822`` or ``text/rfc822-headers``) gives the headers
  the sender sees again in the relay's own notification.

The report type parameter is not trusted: the parts are what count, wherever they are
nested. Anything else (an auto-reply, a bounce in free text, garbage) is a Report of kind
None. Parsing never raises: whatever the bytes, the listener gets a Report.
"""

from __future__ import annotations

import email
import email.message
import re
from dataclasses import dataclass, field

_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY_CODE = re.compile(r"\s*([245]\d\d)[\s-]")
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus"})
MAX_BLOCKS = 100  # recipient blocks read from one report


@dataclass(frozen=True)
class RecipientReport:
    """One recipient block of a DSN."""

    recipient: str | None  # Final-Recipient's address (Original-Recipient if none)
    action: str  # lower case
    status: str  # "5.1.1"; "5.0.0"/"4.0.0" when the report has none that fits
    diagnostic: str = ""  # Diagnostic-Code, without its type ("550 5.1.1 ...")
    remote: str | None = None  # Remote-MTA (or the Reporting-MTA)

    @property
    def code(self) -> int:
        """The reply code the diagnostic carries, else one of the status's class."""
        m = _REPLY_CODE.match(self.diagnostic + " ")
        if m and m.group(1)[0] == self.status[0]:
            return int(m.group(1))
        return 550 if self.status.startswith("5") else 450


@dataclass
class Report:
    kind: str | None = None  # "failed", "delayed", "delivered", "complaint"; None: no report
    recipients: list[RecipientReport] = field(default_factory=list)
    feedback_type: str | None = None  # of a complaint
    headers: bytes = b""  # the returned message's header section, CRLF lines
    reason: str = ""  # why kind is None


def parse(data: bytes) -> Report:
    try:
        return _parse(email.message_from_bytes(data))
    except Exception as e:  # a parser bug must cost a report, never the listener
        return Report(reason=f"unreadable message ({type(e).__name__})")


def _parse(message: email.message.Message) -> Report:
    report = Report()
    reporting = None
    for part in _parts(message):
        ctype = part.get_content_type()
        if ctype == "message/delivery-status" and not report.recipients:
            blocks = _blocks(part)
            if blocks:
                reporting = _mta(blocks[0].get("reporting-mta"))
                report.recipients = [r for b in blocks[1:MAX_BLOCKS + 1]
                                     if (r := _recipient(b, reporting)) is not None]
        elif ctype == "message/feedback-report" and report.feedback_type is None:
            blocks = _blocks(part)
            if blocks:
                report.feedback_type = (blocks[0].get("feedback-type") or "").strip().lower()
        elif ctype in ("message/rfc822", "text/rfc822-headers") and not report.headers:
            report.headers = _headers(part)
    if report.feedback_type is not None:
        if report.feedback_type in COMPLAINT_TYPES:
            report.kind = "complaint"
        else:
            report.reason = f"feedback report of type {report.feedback_type or 'none'!r}"
    elif report.recipients:
        actions = {r.action for r in report.recipients}
        for kind in ("failed", "delayed", "delivered", "relayed", "expanded"):
            if kind in actions:
                report.kind = "delivered" if kind in ("relayed", "expanded") else kind
                break
        else:
            report.reason = "no known Action in the delivery status"
    else:
        report.reason = "no delivery status or feedback report"
    return report


def _parts(message: email.message.Message, depth: int = 0):
    """The message's parts, depth first, without descending into a returned message (its
    own parts are the user's mail, not the report)."""
    yield message
    if depth > 10:
        return
    if message.get_content_maintype() == "multipart" and message.is_multipart():
        for part in message.get_payload():
            if isinstance(part, email.message.Message):
                yield from _parts(part, depth + 1)


def _blocks(part: email.message.Message) -> list[dict[str, str]]:
    """The field blocks of a delivery-status or feedback-report part, as lower-case keys;
    the email package has parsed them into messages, or left the text (encoded, or a
    type it does not know)."""
    payload = part.get_payload()
    if isinstance(payload, list) and all(isinstance(p, email.message.Message) for p in payload):
        blocks = [{k.lower(): str(v) for k, v in p.items()} for p in payload]
        # A part parsed as one message keeps the later blocks in its body.
        if len(payload) == 1 and isinstance(payload[0].get_payload(), str):
            blocks += _text_blocks(payload[0].get_payload())
        return [b for b in blocks if b]
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        raw = str(payload).encode("utf-8", "replace")
    return _text_blocks(raw.decode("utf-8", "replace"))


def _text_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
        elif line[0] in " \t" and last is not None:
            current[last] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip().lower()
            current.setdefault(last, value.strip())
    if current:
        blocks.append(current)
    return blocks


def _address(value: str | None) -> str | None:
    """``rfc822; bob@example.net`` -> ``bob@example.net``."""
    if not value:
        return None
    kind, sep, address = value.partition(";")
    address = (address if sep else kind).strip().strip("<>").strip()
    return address or None


def _mta(value: str | None) -> str | None:
    """``dns; mx.example.net`` -> ``mx.example.net``."""
    if not value:
        return None
    name = value.partition(";")[2].strip() if ";" in value else value.strip()
    return " ".join(name.split())[:255] or None


def _recipient(block: dict[str, str], reporting: str | None) -> RecipientReport | None:
    action = " ".join((block.get("action") or "").split()).lower().partition(" ")[0]
    if not action:
        return None
    m = _STATUS.match(block.get("status") or "")
    if m and int(m.group(2)) < 1000:
        status = ".".join(m.groups())
    else:
        status = "4.0.0" if action == "delayed" else "5.0.0" if action == "failed" else "2.0.0"
    diagnostic = block.get("diagnostic-code") or ""
    if ";" in diagnostic:
        diagnostic = diagnostic.partition(";")[2]
    return RecipientReport(
        recipient=_address(block.get("final-recipient")) or _address(
            block.get("original-recipient")),
        action=action,
        status=status,
        diagnostic=" ".join(diagnostic.split())[:1000],
        remote=_mta(block.get("remote-mta")) or reporting,
    )


def _headers(part: email.message.Message) -> bytes:
    """The header section of the returned message, CRLF lines."""
    if part.get_content_type() == "text/rfc822-headers":
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            raw = str(part.get_payload()).encode("utf-8", "replace")
    else:
        inner = part.get_payload()
        if not (isinstance(inner, list) and inner
                and isinstance(inner[0], email.message.Message)):
            return b""
        raw = b"".join(f"{k}: {v}\n".encode("utf-8", "replace")
                       for k, v in inner[0].items())
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    lines = [line for line in re.split(rb"\r?\n", head) if line.strip() or line]
    return b"".join(line.rstrip(b"\r") + b"\r\n" for line in lines)[:64 * 1024]
