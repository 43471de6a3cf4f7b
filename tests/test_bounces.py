"""The bounce domain's parts: VERP return paths (bounces/verp.py) and the reading of the
reports that come back to them (bounces/parse.py), with reports as remote systems write
them (tests/bounce_samples.py)."""

from __future__ import annotations

import random

import pytest
from bounce_samples import arf_complaint, exchange_dsn, postfix_dsn

from mailrelay.bounces.feed import restore_sender
from mailrelay.bounces.parse import parse
from mailrelay.bounces.verp import MAX_LOCAL, Verp
from mailrelay.model import Envelope

KEY = bytes(range(32))
QUEUE_ID = "3019aa5c0e2f1a2b3c"


def envelope(sender="news@doe.com", user="doe.com", return_path="bounces.doe.com",
             **kw) -> Envelope:
    return Envelope(id=QUEUE_ID, sender=sender, recipients=["bob@example.net"], user=user,
                    account="default", client_ip=None, helo=None, tls=True, received_at=0.0,
                    return_path=return_path, **kw)


# ---- VERP addresses ----


def test_a_return_path_names_the_message_recipient_and_sender():
    verp = Verp(KEY)
    address = verp.address(envelope(), "bob@example.net")
    local, domain = address.split("@")
    assert domain == "bounces.doe.com" and local.startswith("b+")
    assert local == local.lower() and local[2:].isalnum()
    path = verp.open(address)
    assert (path.queue_id, path.account, path.user, path.sender, path.recipient,
            path.domain) == (QUEUE_ID, "default", "doe.com", "news@doe.com",
                             "bob@example.net", "bounces.doe.com")
    # A remote server may change the case of the local part: still ours.
    assert verp.open(address.upper()) == path
    # Each recipient has its own.
    assert verp.address(envelope(), "carol@example.net") != address
    # The sender is left out when it is the login (a user-level login): shorter.
    own = verp.address(envelope(sender="john@doe.com", user="john@doe.com"), "bob@example.net")
    assert verp.open(own).sender == "john@doe.com"


def test_forged_or_altered_return_paths_are_refused():
    verp = Verp(KEY)
    address = verp.address(envelope(), "bob@example.net")
    local, domain = address.split("@")
    token = local[2:]
    for i in (0, len(token) // 2, len(token) - 1):  # one character changed anywhere
        changed = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1:]
        assert verp.open(f"b+{changed}@{domain}") is None
    assert verp.open(f"{local}@bounces.other.net") is None  # another domain
    assert Verp(bytes(32)).open(address) is None  # another key
    assert verp.open(f"b+{token[:-3]}@{domain}") is None  # cut short
    assert verp.open(f"b+{token}aaaa@{domain}") is None  # longer
    for other in ("postmaster@bounces.doe.com", "b+@bounces.doe.com", "b+!!!@bounces.doe.com",
                  "bob@example.net", "b+" + "a" * 300 + "@bounces.doe.com", "", "@",
                  f"b+{token}"):
        assert verp.open(other) is None


def test_no_return_path_for_the_null_sender_the_relay_or_too_long_a_path():
    verp = Verp(KEY)
    assert verp.address(envelope(sender=""), "bob@example.net") is None
    assert verp.address(envelope(return_path=None), "bob@example.net") is None
    assert verp.address(envelope(user=None), "bob@example.net") is None
    long_rcpt = "x" * 60 + "@" + "y" * 100 + ".example"
    assert verp.address(envelope(), long_rcpt) is None
    ok = verp.address(envelope(), "a" * 40 + "@example.net")
    assert ok is not None and len(ok.split("@")[0]) <= MAX_LOCAL


# ---- reports ----

VERP = "b+abc@bounces.doe.com"
RCPT = "bob@example.net"


def test_postfix_hard_bounce():
    report = parse(postfix_dsn(VERP, RCPT))
    assert report.kind == "failed"
    [block] = report.recipients
    assert (block.recipient, block.action, block.status, block.code, block.remote) == (
        RCPT, "failed", "5.1.1", 550, "store.example.net")
    assert "User unknown in virtual mailbox table" in block.diagnostic
    assert b"Subject: November newsletter\r\n" in report.headers


def test_postfix_delay_notice():
    report = parse(postfix_dsn(VERP, RCPT, "4.2.2", "delayed"))
    assert report.kind == "delayed" and report.recipients[0].status == "4.2.2"
    assert report.recipients[0].code == 450


def test_exchange_ndr():
    report = parse(exchange_dsn(VERP, RCPT))
    assert report.kind == "failed"
    [block] = report.recipients
    assert (block.recipient, block.status, block.code) == (RCPT, "5.1.10", 550)
    assert block.remote == "AM0PR01MB12345.eurprd01.prod.outlook.com"
    assert report.headers.startswith(b"Return-Path: <b+abc@bounces.doe.com>\r\n")


def test_arf_complaint_and_other_feedback():
    report = parse(arf_complaint(VERP, RCPT))
    assert (report.kind, report.feedback_type) == ("complaint", "abuse")
    assert b"From: <news@doe.com>\r\n" in report.headers
    not_spam = parse(arf_complaint(VERP, RCPT, "not-spam"))
    assert not_spam.kind is None and "not-spam" in not_spam.reason


def test_messages_that_are_no_report():
    autoreply = b"From: bob@example.net\r\nSubject: Out of office\r\n\r\nI am away.\r\n"
    for data in (autoreply, b"", b"\r\n\r\n", b"garbage \x00\xff\xfe",
                 b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n"):
        report = parse(data)
        assert report.kind is None and report.reason


def test_the_verp_address_in_returned_headers_becomes_the_clients_sender():
    verp = Verp(KEY)
    address = verp.address(envelope(), RCPT)
    headers = parse(postfix_dsn(address.upper(), RCPT)).headers
    restored = restore_sender(headers, verp.open(address))
    assert b"Return-Path: <news@doe.com>\r\n" in restored and b"b+" not in restored.lower()


@pytest.mark.parametrize("seed", range(40))
def test_mangled_reports_never_raise(seed):
    rng = random.Random(seed)
    sample = rng.choice([postfix_dsn(VERP, RCPT), exchange_dsn(VERP, RCPT),
                         arf_complaint(VERP, RCPT)])
    data = bytearray(sample)
    for _ in range(rng.randrange(1, 40)):
        op = rng.randrange(4)
        i = rng.randrange(len(data) or 1)
        if op == 0 and data:
            del data[i:i + rng.randrange(1, 200)]
        elif op == 1:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        elif op == 2:
            data[i:i] = rng.choice([b"\r\n\r\n", b"--", b"Status: 9.9.9.9\r\n", b"Action:\r\n",
                                    b"Content-Type: message/delivery-status\r\n",
                                    b"Content-Transfer-Encoding: base64\r\n", b";;;<>"])
        else:
            data = data[: rng.randrange(len(data) + 1)]
    report = parse(bytes(data))
    assert report.kind in (None, "failed", "delayed", "delivered", "complaint")
    for block in report.recipients:
        assert block.status[0] in "245" and isinstance(block.code, int)
