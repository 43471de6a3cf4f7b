"""End to end through twistd: SMTPUTF8 (RFC 6531) and 8BITMIME (RFC 6152) in and out.

One relay and two next hops on 127.0.0.1: one offers SMTPUTF8 and 8BITMIME, the other
neither. Mail is submitted with smtplib (STARTTLS, AUTH, ``mail_options=['SMTPUTF8']``);
each sink records the exact MAIL and RCPT lines and bytes it received.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from harness import Relay, Sink, wait_for

PASSWORD = "correct horse battery"


@pytest.fixture
def setup(tmp_path):
    """(relay, modern sink, old sink): faß.test (our senders, so bounces) and exämple.test
    go to the modern sink, bücher.test to the old one."""
    modern = Sink(tmp_path / "modern", "--smtputf8", "--pipelining")
    old = Sink(tmp_path / "old", "--no-8bitmime")
    relay = Relay(tmp_path / "relay", config=(
        f"[delivery]\nport = {old.port}\nallow_local_mx = yes\nmx_tls = none\n"
        "retry_first = 1s\nretry_max = 2s\n"
        f"[routes]\nfaß.test = 127.0.0.1:{modern.port}\n"
        f"xn--exmple-cua.test = 127.0.0.1:{modern.port}\n"
        f"bücher.test = 127.0.0.1:{old.port}\n"))
    relay.domain_login("faß.test", PASSWORD)
    relay.start()
    try:
        yield relay, modern, old
    finally:
        relay.stop()
        modern.stop()
        old.stop()


def send(relay: Relay, sender: str, rcpts: list[str], data: bytes, utf8: bool) -> None:
    with relay.smtp(login=("xn--fa-hia.test", PASSWORD)) as client:
        assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
        refused = client.sendmail(sender, rcpts, data,
                                  mail_options=["SMTPUTF8"] if utf8 else [])
    assert refused == {}


def test_utf8_addresses_and_8bit_mail_end_to_end(setup):
    relay, modern, old = setup
    check_refusals(relay, modern, old)
    # 1. UTF-8 everywhere: the envelope sender's domain as U-labels, From: as A-labels.
    utf8 = ("From: Jöhn <jöhn@xn--fa-hia.test>\r\nTo: <ülla@exämple.test>\r\n"
            "Subject: Grüße\r\n\r\nGrüße aus Köln\r\n").encode()
    send(relay, "jöhn@faß.test", ["ülla@exämple.test", "x@bücher.test"], utf8, utf8=True)
    by_rcpt = {m["recipients"][0]: (m, d) for m, d in modern.wait(2)}
    meta, data = by_rcpt["ülla@exämple.test"]
    assert meta["commands"] == ["MAIL FROM:<jöhn@faß.test> BODY=8BITMIME SMTPUTF8",
                                "RCPT TO:<ülla@exämple.test>"]
    assert meta["recipients"] == ["ülla@exämple.test"]
    received, _, rest = data.partition(b"\r\nFrom: ")
    assert b"From: " + rest == utf8
    assert b"by relay.test (mailrelay) with UTF8SMTPSA id " in received
    assert "for <ülla@exämple.test>".encode() not in received  # two recipients: none named
    # The old hop cannot take the UTF-8 sender: a bounce, itself SMTPUTF8 (and 8-bit: it
    # quotes the header), to the sender, naming the recipient as A-labels.
    meta, dsn = by_rcpt["jöhn@faß.test"]
    assert meta["commands"] == ["MAIL FROM:<> BODY=8BITMIME SMTPUTF8",
                                "RCPT TO:<jöhn@faß.test>"]
    assert "To: <jöhn@faß.test>".encode() in dsn
    assert (b"Final-Recipient: rfc822; x@xn--bcher-kva.test\r\nAction: failed\r\n"
            b"Status: 5.6.7\r\nRemote-MTA: dns; 127.0.0.1\r\nDiagnostic-Code: smtp; 550 "
            b"5.6.7 non-ASCII sender address and the server does not offer SMTPUTF8") in dsn
    assert old.messages() == []

    # 2. Only the domains are UTF-8: to the old hop as A-labels, no SMTPUTF8; but not the
    # UTF-8 header of an SMTPUTF8 message (5.6.9).
    seven = b"From: a@xn--fa-hia.test\r\nSubject: plain\r\n\r\nhello\r\n"
    send(relay, "a@faß.test", ["y@bücher.test"], seven, utf8=True)
    [(meta, data)] = old.wait(1)
    assert meta["commands"] == ["MAIL FROM:<a@xn--fa-hia.test>",
                                "RCPT TO:<y@xn--bcher-kva.test>"]
    assert data.endswith(b"\r\n" + seven)
    assert b" with UTF8SMTPSA id " in data and b"\tfor <y@xn--bcher-kva.test>; " in data
    send(relay, "a@faß.test", ["w@bücher.test"], utf8, utf8=True)
    dsn = wait_for(lambda: [d for m, d in modern.messages()
                            if m["recipients"] == ["a@faß.test"]], what="the 5.6.9 bounce")[0]
    assert (b"Diagnostic-Code: smtp; 550 5.6.9 UTF-8 header (SMTPUTF8 message) and the "
            b"server does not offer SMTPUTF8") in dsn

    # 3. 8-bit without SMTPUTF8: BODY=8BITMIME where offered, a bounce (5.6.3) where not.
    eight = b"From: a@xn--fa-hia.test\r\nSubject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n"
    send(relay, "a@xn--fa-hia.test", ["z@xn--exmple-cua.test", "z@xn--bcher-kva.test"],
         eight, utf8=False)
    messages = modern.wait(5)
    by_rcpt = {m["recipients"][0]: (m, d) for m, d in messages[3:]}
    meta, data = by_rcpt["z@xn--exmple-cua.test"]
    assert meta["commands"] == ["MAIL FROM:<a@xn--fa-hia.test> BODY=8BITMIME",
                                "RCPT TO:<z@xn--exmple-cua.test>"]
    assert data.endswith(b"\r\n" + eight) and b" with ESMTPSA id " in data
    meta, dsn = by_rcpt["a@xn--fa-hia.test"]
    assert meta["commands"] == ["MAIL FROM:<> BODY=8BITMIME", "RCPT TO:<a@xn--fa-hia.test>"]
    assert (b"Diagnostic-Code: smtp; 554 5.6.3 8-bit message and the server does not offer "
            b"8BITMIME; not converted to 7 bits") in dsn
    assert len(old.messages()) == 1
    wait_for(lambda: not relay.spool_files("queue"), timeout=20, what="the spool to empty")


def check_refusals(relay: Relay, modern: Sink, old: Sink) -> None:
    """Without SMTPUTF8 in MAIL, a UTF-8 address gets 553 5.6.7 (RFC 6531 3.5); bytes
    that are not UTF-8 are bad syntax either way."""
    with relay.smtp(login=("xn--fa-hia.test", PASSWORD)) as client:
        client.command_encoding = "utf-8"  # as a client that ignores SMTPUTF8 would send
        assert client.docmd("MAIL", "FROM:<jöhn@faß.test>") == (
            553, b"5.6.7 Non-ASCII sender address needs SMTPUTF8 (RFC 6531)")
        assert client.docmd("MAIL", "FROM:<a@xn--fa-hia.test>")[0] == 250
        assert client.docmd("RCPT", "TO:<ülla@exämple.test>") == (
            553, b"5.6.7 Non-ASCII recipient address needs SMTPUTF8 (RFC 6531)")
        assert client.docmd("RSET")[0] == 250
        client.command_encoding = "latin-1"  # é as the one byte 0xE9
        assert client.docmd("MAIL", "FROM:<j\xe9@xn--fa-hia.test> SMTPUTF8") == (
            501, b"5.1.7 Bad sender address syntax: not valid UTF-8")
    # swaks sends a UTF-8 address without SMTPUTF8, and is told so.
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by test.sh"
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{relay.smtp_port}", "--tls", "--tls-verify",
         "--tls-ca-path", str(relay.data / "tls" / "cert.pem"), "--auth", "PLAIN",
         "--auth-user", "xn--fa-hia.test", "--auth-password", PASSWORD,
         "--from", "jöhn@faß.test", "--to", "x@example.test", "--helo", "client.test"],
        capture_output=True, timeout=60)
    assert result.returncode != 0
    assert " ~> MAIL FROM:<jöhn@faß.test>\n".encode() in result.stdout
    assert b"<~* 553 5.6.7 Non-ASCII sender address needs SMTPUTF8 (RFC 6531)" in result.stdout
    assert old.messages() == [] and modern.messages() == []
