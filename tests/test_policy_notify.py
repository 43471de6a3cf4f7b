"""Domain sender notifications: content, RFC 5322 form, and rate limiting per login."""

from __future__ import annotations

import email
import email.policy
import email.utils

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailrelay.model import Account
from mailrelay.policy.notify import SenderNotifier

T0 = 1_780_000_000  # 2026-05-28 20:26:40 UTC
ACCOUNT = Account("doe", domains=frozenset({"doe.com"}), notify="admin@doe.com")


class Outbox:
    """Stands in for the spool's submit: records what would be queued."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], bytes]] = []

    def __call__(self, sender: str, recipients: list[str], message: bytes):
        self.sent.append((sender, recipients, message))
        return succeed(None)

    def parsed(self, i: int = -1) -> email.message.EmailMessage:
        return email.message_from_bytes(self.sent[i][2], policy=email.policy.default)


def make(interval: float = 600.0) -> tuple[Clock, Outbox, SenderNotifier]:
    clock = Clock()
    clock.advance(T0)
    outbox = Outbox()
    notifier = SenderNotifier(clock, outbox, "postmaster@relay.example", "relay.example", interval)
    return clock, outbox, notifier


def test_one_message_says_who_tried_what_from_where_and_when():
    clock, outbox, notifier = make()
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    assert len(outbox.sent) == 1
    sender, recipients, raw = outbox.sent[0]
    assert sender == ""  # null envelope sender: no bounce loops
    assert recipients == ["admin@doe.com"]
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = outbox.parsed()
    assert msg["From"] == "Mail relay <postmaster@relay.example>"
    assert msg["To"] == "admin@doe.com"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "Refused sender for login john@doe.com"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == T0
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@relay.example>")
    body = msg.get_content()
    assert "The SMTP login john@doe.com (account doe)" in body
    assert "2026-05-28 20:26:40 UTC  from 192.0.2.7  ceo@doe.com (envelope MAIL FROM)" in body
    assert "1 attempt:" in body
    assert "at most one such message per login every 10 minutes" in body


def test_an_attack_yields_one_message_per_interval_with_the_count_of_the_rest():
    clock, outbox, notifier = make()
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    for i in range(50):
        clock.advance(5)
        notifier.refused(ACCOUNT, "john@doe.com", f"boss{i}@doe.com", "192.0.2.8", header=True)
    assert len(outbox.sent) == 1
    clock.advance(600 - 250 - 1)
    assert len(outbox.sent) == 1
    clock.advance(1)  # the quiet interval ends: one summary of what was collected
    assert len(outbox.sent) == 2
    msg = outbox.parsed()
    assert msg["Subject"] == "Refused senders: 50 attempts for login john@doe.com"
    body = msg.get_content()
    assert "50 attempts:" in body
    assert "from 192.0.2.8  boss0@doe.com (header From:)" in body
    assert "boss19@doe.com" in body and "boss20@doe.com" not in body
    assert "... and 30 more" in body
    clock.advance(600)  # a quiet interval with no attempts sends nothing ...
    assert len(outbox.sent) == 2
    assert notifier._pending == {}
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    assert len(outbox.sent) == 3  # ... and the next attempt is reported at once again


def test_logins_are_rate_limited_separately():
    clock, outbox, notifier = make()
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    notifier.refused(ACCOUNT, "JOHN@doe.com", "ceo@doe.com", "192.0.2.7")
    notifier.refused(ACCOUNT, "jane@doe.com", "ceo@doe.com", "192.0.2.7")
    other = Account("acme", notify="ops@acme.example")
    notifier.refused(other, "john@doe.com", "x@acme.example", "192.0.2.7")
    assert [r for _, r, _ in outbox.sent] == [
        ["admin@doe.com"],
        ["admin@doe.com"],
        ["ops@acme.example"],
    ]


def test_no_notification_address_means_no_message():
    clock, outbox, notifier = make()
    notifier.refused(Account("quiet"), "john@doe.com", "ceo@doe.com", "192.0.2.7")
    notifier.refused(None, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    clock.advance(1200)
    assert outbox.sent == []


def test_hostile_text_cannot_add_headers_or_lines():
    clock, outbox, notifier = make()
    notifier.refused(
        ACCOUNT, "john\r\nBcc: x@example.org", "a@doe.com\r\nBcc: y@example.org", "::1"
    )
    msg = outbox.parsed()
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Refused sender for login john??Bcc: x@example.org"
    assert "from ::1  a@doe.com??Bcc: y@example.org (envelope MAIL FROM)" in msg.get_content()


def test_a_failed_submit_is_logged_not_raised():
    clock = Clock()
    notifier = SenderNotifier(
        clock, lambda *a: fail(OSError("disk full")), "postmaster@relay.example", "relay.example"
    )
    with capturedLogs() as events:
        notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    assert any(e.get("log_failure") for e in events)


def test_stop_cancels_the_timers():
    clock, outbox, notifier = make()
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    notifier.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(1200)
    assert len(outbox.sent) == 1


def test_interval_in_words():
    clock, outbox, notifier = make(interval=3600)
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    assert "every 1 hour;" in outbox.parsed().get_content()


def test_bytes_that_were_not_utf8_are_reported_and_later_attempts_too():
    # A From: header read with "surrogateescape" once handed such an address on; the
    # notification could not be encoded and the login's later reports never came.
    clock, outbox, notifier = make()
    notifier.refused(ACCOUNT, "john@doe.com", "x@ev\udcffil.example", "192.0.2.7", header=True)
    assert len(outbox.sent) == 1
    assert "from 192.0.2.7  x@ev?il.example (header From:)" in outbox.parsed().get_content()
    notifier.refused(ACCOUNT, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    clock.advance(600)
    assert len(outbox.sent) == 2
    assert "ceo@doe.com (envelope MAIL FROM)" in outbox.parsed().get_content()


def test_a_notification_that_cannot_be_made_does_not_stop_the_next_ones():
    clock, outbox, notifier = make()
    broken = Account("doe", domains=frozenset({"doe.com"}), notify="admin@doe.com\nBcc: x@y.z")
    with capturedLogs() as events:
        notifier.refused(broken, "john@doe.com", "ceo@doe.com", "192.0.2.7")
    assert outbox.sent == []
    assert any(e.get("log_failure") for e in events)
    notifier.refused(ACCOUNT, "john@doe.com", "cfo@doe.com", "192.0.2.7")  # address fixed
    clock.advance(600)
    assert [r for _, r, _ in outbox.sent] == [["admin@doe.com"]]
    assert "cfo@doe.com (envelope MAIL FROM)" in outbox.parsed().get_content()
    clock.advance(600)
    notifier.refused(ACCOUNT, "john@doe.com", "coo@doe.com", "192.0.2.7")
    assert len(outbox.sent) == 2  # and reports are immediate again after a quiet interval
