"""The bounce domain's parts: VERP return paths (bounces/verp.py) and the reading of the
reports that come back to them (bounces/parse.py), with reports as remote systems write
them (tests/bounce_samples.py)."""

from __future__ import annotations

import random

import pytest
from bounce_samples import arf_complaint, exchange_dsn, postfix_dsn

from mailrelay.bounces.feed import restore_sender
from mailrelay.bounces.parse import parse
from mailrelay.bounces.store import ReturnPath, ReturnPathStore
from mailrelay.bounces.verp import Token, Verp
from mailrelay.model import Envelope

KEY = bytes(range(32))
QUEUE_ID = "3019aa5c0e2f1a2b3c"


def envelope(sender="news@doe.com", user="doe.com", return_path="bounces.doe.com",
             recipients=("bob@example.net",), **kw) -> Envelope:
    return Envelope(id=QUEUE_ID, sender=sender, recipients=list(recipients), user=user,
                    account="default", client_ip=None, helo=None, tls=True, received_at=0.0,
                    return_path=return_path, **kw)


# ---- VERP addresses ----


@pytest.mark.parametrize("queue_id", [QUEUE_ID + "v0k9", QUEUE_ID])  # with a node part, older
def test_a_return_path_names_the_message_and_recipient_within_64_octets(queue_id):
    verp = Verp(KEY)
    env = envelope(recipients=["bob@example.net", "carol@example.net"])
    env.id = queue_id
    address = verp.address(env, "carol@example.net")
    local, domain = address.split("@")
    assert domain == "bounces.doe.com" and local.startswith("b+")
    assert local == local.lower() and local[2:].isalnum() and len(local) <= 64
    assert verp.open(address) == Token("bounces.doe.com", queue_id, 1)
    # A remote server may change the case of the local part: still ours.
    assert verp.open(address.upper()) == Token("bounces.doe.com", queue_id, 1)
    assert verp.open(verp.address(env, "bob@example.net")).index == 0


def test_forged_or_altered_return_paths_are_refused():
    verp = Verp(KEY)
    address = verp.address(envelope(), "bob@example.net")
    local, domain = address.split("@")
    token = local[2:]
    for i in range(len(token)):  # one character changed anywhere
        changed = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1:]
        assert verp.open(f"b+{changed}@{domain}") is None
    assert verp.open(f"{local}@bounces.other.net") is None  # another domain
    assert Verp(bytes(32)).open(address) is None  # another key
    assert verp.open(f"b+{token[:-3]}@{domain}") is None  # cut short
    assert verp.open(f"b+{token}aaaa@{domain}") is None  # longer
    assert verp.open(f"x+{token}@{domain}") is None
    for other in ("postmaster@bounces.doe.com", "b+@bounces.doe.com",
                  "b+" + "!" * len(token) + "@bounces.doe.com", "bob@example.net",
                  "b+" + "a" * 300 + "@bounces.doe.com", "", "@", f"b+{token}"):
        assert verp.open(other) is None


def test_no_return_path_for_the_null_sender_or_the_relays_own_mail():
    verp = Verp(KEY)
    assert verp.address(envelope(sender=""), "bob@example.net") is None
    assert verp.address(envelope(return_path=None), "bob@example.net") is None
    assert verp.address(envelope(user=None), "bob@example.net") is None
    assert verp.address(envelope(), "nobody@example.net") is None  # not a recipient


@pytest.fixture(params=["sqlite", "postgres"])
def return_paths(request, tmp_path):
    """The node's SQLite file, or the nodes' PostgreSQL (tests/pg_server.py)."""
    if request.param == "sqlite":
        store = ReturnPathStore(str(tmp_path / "bounces.sqlite"))
        yield store
        store.close()
        return
    import pg_server

    from mailrelay.postgres.db import Database
    from mailrelay.postgres.returnpaths import PgReturnPathStore

    db = Database(pg_server.shared_server().create_database())
    db.open()
    yield PgReturnPathStore(db)
    db.close()


def test_the_store_resolves_a_token_to_what_was_sent(return_paths):
    store = return_paths
    env = envelope(recipients=["bob@example.net", "carol@example.net"], bounce_to="")
    store.record(env, when=1000.0)
    store.record(envelope(sender="other@doe.com"), when=2000.0)  # kept as first recorded
    path = store.resolve(Token("bounces.doe.com", QUEUE_ID, 1))
    assert (path.account, path.user, path.sender, path.bounce_to, path.recipient,
            path.sent) == ("default", "doe.com", "news@doe.com", "", "carol@example.net",
                           1000.0)
    assert store.resolve(Token("bounces.doe.com", QUEUE_ID, 2)) is None
    assert store.resolve(Token("bounces.doe.com", "1" * 18, 0)) is None
    assert store.prune(before=999.0) == 0 and store.prune(before=1001.0) == 1
    assert store.resolve(Token("bounces.doe.com", QUEUE_ID, 1)) is None


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
    address = Verp(KEY).address(envelope(), RCPT)
    headers = parse(postfix_dsn(address.upper(), RCPT)).headers
    path = ReturnPath("bounces.doe.com", QUEUE_ID, "default", "doe.com", "news@doe.com", None,
                      RCPT, 0.0)
    restored = restore_sender(headers, path)
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
