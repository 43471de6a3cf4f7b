"""The bounce domain end to end through twistd: mail of an account with a bounce domain
leaves with a VERP envelope sender per recipient (seen by tests/smtp_sink.py), a real
bounce and a real complaint sent back with smtplib to the bounce listener suppress the
recipients, count in the statistics and notify the sender, and the listener refuses every
other recipient."""

from __future__ import annotations

import json
import os
import smtplib
import stat
import uuid

import pytest
from bounce_samples import arf_complaint, postfix_dsn
from harness import Relay, Sink, free_port, wait_for
from test_e2e_features import arrived, send, wait_stats

PASSWORD = "correct horse battery"
USER = "news@doe.test"


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    s = Sink(tmp_path_factory.mktemp("sink"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    relay = Relay(tmp_path_factory.mktemp("relay"), config=(
        f"[delivery]\nport = {sink.port}\nallow_local_mx = yes\nretry_first = 1s\n"
        f"retry_max = 2s\nmx_tls = none\n\n"
        f"[routes]\nexample.test = 127.0.0.1:{sink.port}\ndoe.test = 127.0.0.1:{sink.port}\n\n"
        f"[bounces]\nendpoint = tcp:{free_port()}:interface=127.0.0.1\n"
        "max_message_size = 100k\n"))  # fmt: skip
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.admin("account", "set", "default", "--bounce-domain", "bounces.doe.test")
    relay.add_user(USER, PASSWORD)
    relay.start()
    yield relay
    relay.stop()


def bounce_port(relay: Relay) -> int:
    text = relay.config_path.read_text()
    return int(text.split("[bounces]\nendpoint = tcp:")[1].split(":")[0])


def suppressed(relay: Relay) -> dict[str, str]:
    listed = relay.admin("suppression", "list", "--user", USER, "--json").stdout
    return {e["address"]: e["reason"] for e in json.loads(listed)}


def test_bounces_and_complaints_come_back_to_the_relay(relay, sink):
    r1, r2 = (f"{n}-{uuid.uuid4().hex[:8]}@example.test" for n in ("gone", "angry"))
    send(relay, USER, [r1, r2])
    # One transaction per recipient, each with its own return path at the bounce domain.
    ((meta1, _),), ((meta2, _),) = arrived(sink, r1), arrived(sink, r2)
    assert meta1["recipients"] == [r1] and meta2["recipients"] == [r2]
    verp1, verp2 = meta1["sender"], meta2["sender"]
    for verp in (verp1, verp2):
        assert verp.startswith("b+") and verp.endswith("@bounces.doe.test")
    assert verp1 != verp2
    assert f"sender={USER}" in relay.log()  # what the user sees keeps the client's sender
    assert stat.S_IMODE(os.stat(relay.data / "bounce.key").st_mode) == 0o600

    with smtplib.SMTP("127.0.0.1", bounce_port(relay), timeout=30) as client:
        assert client.ehlo("mx.example.net")[0] == 250
        assert client.has_extn("starttls")  # as remote servers use it: headers are private
        assert client.starttls(context=relay.tls_context())[0] == 220
        assert client.ehlo("mx.example.net")[0] == 250 and not client.has_extn("starttls")
        assert client.mail("")[0] == 250
        # Anything but a return path of the relay is refused: no relay, no guessing.
        for other in ("postmaster@bounces.doe.test", f"{r1}", "bob@doe.test",
                      verp1.replace("@", "x@"), verp1[:5] + ("a" if verp1[5] != "a" else "b")
                      + verp1[6:], verp1.split("@")[0] + "@bounces.other.test"):
            code, text = client.rcpt(other)
            assert (code, text[:5]) == (550, b"5.7.1"), (other, code, text)
        assert client.rcpt(verp1)[0] == 250
        code, text = client.data(postfix_dsn(verp1, r1))
        assert code == 250, text
        assert client.mail("fbl@example.net")[0] == 250
        assert client.rcpt(verp2.upper())[0] == 250  # a server that changed the case
        code, text = client.data(arf_complaint(verp2, r2))
        assert code == 250, text
        # Reports are bounded: SIZE, and the data itself.
        assert client.mail("", ["SIZE=200000"])[:2] == (
            552, b"5.3.4 Message size exceeds fixed limit of 102400 bytes")
        client.rset()
        assert client.mail("")[0] == 250 and client.rcpt(verp1)[0] == 250
        # An auto-reply of 60 KB: taken, and dropped (no report in it).
        code, text = client.data(b"Subject: Out of office\r\n\r\n" + (b"z" * 98 + b"\r\n") * 600)
        assert code == 250, text
        assert client.mail("")[0] == 250 and client.rcpt(verp1)[0] == 250
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 110)
        assert (code, text[:5]) == (552, b"5.3.4")

    # The hard bounce and the complaint are on the user's list, and counted.
    wait_for(lambda: len(suppressed(relay)) == 2, timeout=20, what="two suppressions")
    assert suppressed(relay) == {r1: "hard-bounce", r2: "complaint"}
    wait_stats(relay, USER, {"accepted": 1, "delivered": 2, "bounced": 1, "complaints": 1})
    # The sender is told, by the relay's own DSN, with its own address restored.
    ((meta, notice),) = arrived(sink, USER)
    assert meta["sender"] == "" and meta["recipients"] == [USER]
    assert f"Final-Recipient: rfc822; {r1}".encode() in notice
    assert b"Status: 5.1.1" in notice and b"User unknown" in notice
    assert f"Return-Path: <{USER}>".encode() in notice and b"b+" not in notice.lower()

    wait_for(lambda: "discarded: no delivery status or feedback report" in relay.log(),
             timeout=10, what="the auto-reply's log line")

    # Mail to them now is not sent.
    send(relay, USER, [r1, r2])
    wait_stats(relay, USER, {"accepted": 2, "suppressed": 2})
    assert len(arrived(sink, r1)) == 1 and len(arrived(sink, r2)) == 1
