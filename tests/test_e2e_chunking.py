"""End to end through the real twistd process: CHUNKING (RFC 3030) from a raw-socket
client (swaks has no BDAT), delivered to a next hop that speaks only DATA. One relay and
one sink for the whole module."""

from __future__ import annotations

import email
import email.policy
import json

import pytest
from harness import Relay, Sink, wait_for
from rawsmtp import Raw, plain

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    base = tmp_path_factory.mktemp("chunking")
    sink = Sink(base / "sink")  # Twisted's ESMTP server: no CHUNKING, DATA only
    r = Relay(base / "relay", config=(
        "[limits]\nidle_timeout = 3s\nmax_message_size = 200k\n"
        f"[delivery]\nport = {sink.port}\nmx_tls = none\nretry_first = 1s\n"
        f"[routes]\nexample.net = 127.0.0.1:{sink.port}\n"))
    r.domain_login("doe.test", PASSWORD)
    r.sink = sink
    r.start()
    yield r
    r.stop()
    sink.stop()


def login(relay) -> Raw:
    c = Raw(relay.smtps_port, tls=relay.tls_context())
    assert c.cmd(b"EHLO client.test")[0] == 250
    assert c.cmd(plain("doe.test", PASSWORD))[0] == 235
    return c


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def envelope(to: str, sender: str = "a@doe.test") -> bytes:
    return f"MAIL FROM:<{sender}>\r\nRCPT TO:<{to}>\r\n".encode()


def arrived(relay, to: str) -> bytes:
    """The one message the sink got for ``to``."""
    found = wait_for(lambda: [m for m in relay.sink.messages() if to in m[0]["recipients"]],
                     timeout=30, what=f"a message for {to} at the sink")
    assert len(found) == 1, found
    return found[0][1]


def test_chunking_offered_on_every_listener(relay):
    with Raw(relay.smtp_port) as c:
        assert c.cmd(b"EHLO client.test")[0] == 250
        assert b"250-CHUNKING\r\n" in c.received and b"BINARYMIME" not in c.received
    with Raw(relay.smtps_port, tls=relay.tls_context()) as c:
        assert c.cmd(b"EHLO client.test")[0] == 250
        assert b"250-CHUNKING\r\n" in c.received


def test_bdat_messages_reach_a_data_only_next_hop_intact(relay):
    head = b"From: a@doe.test\r\nSubject: chunks\r\n\r\n"
    dots = b"From: a@doe.test\nSubject: bare LF\n\nfirst\n.\n..\n.\r\n\r\n.\r\nlast line"
    with login(relay) as c:
        # One chunk.
        c.send(envelope("one@example.net") + bdat(head + b"one\r\n", last=True))
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
        # Many chunks and a zero-length LAST, all in one write.
        body = b"".join(b"line %d\r\n" % i for i in range(2000))
        chunks = [head + body[:5], *(body[i:i + 997] for i in range(5, len(body), 997))]
        c.send(envelope("many@example.net") + b"".join(map(bdat, chunks))
               + bdat(b"", last=True))
        replies = [c.reply() for _ in range(len(chunks) + 3)]
        assert [code for code, _ in replies] == [250] * (len(chunks) + 3)
        assert replies[3] == (250, b"2.0.0 997 octets received")
        assert replies[-1][1].startswith(b"2.0.0 Ok: queued as ")
        # Bare LFs, and lines that are only dots, cut anywhere.
        c.send(envelope("dots@example.net") + bdat(dots[:27]) + bdat(dots[27:49])
               + bdat(dots[49:], last=True))
        assert [c.reply()[0] for _ in range(5)] == [250] * 5
        assert c.cmd(b"QUIT")[0] == 221
    assert arrived(relay, "one@example.net").endswith(b"\r\n" + head + b"one\r\n")
    assert arrived(relay, "many@example.net").endswith(b"\r\n" + head + body)
    assert arrived(relay, "dots@example.net").endswith(
        b"\r\nFrom: a@doe.test\r\nSubject: bare LF\r\n\r\nfirst\r\n.\r\n..\r\n.\r\n\r\n.\r\n"
        b"last line\r\n")


def test_long_lines_are_re_encoded_as_with_data(relay):
    html = ("<div>" + "<span>ünïcödé text, </span>" * 700 + "</div>").encode()
    content = (b"From: a@doe.test\nSubject: long lines\nMIME-Version: 1.0\n"
               b"Content-Type: text/html; charset=utf-8\n\n" + html + b"\n.\n")
    with login(relay) as c:
        c.send(envelope("long@example.net") + bdat(content[:10000]) + bdat(content[10000:],
                                                                            last=True))
        assert [c.reply()[0] for _ in range(4)] == [250] * 4
    received = arrived(relay, "long@example.net")
    assert all(len(line) <= 998 for line in received.split(b"\r\n"))
    msg = email.message_from_bytes(received, policy=email.policy.compat32)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_payload(decode=True) == html + b"\r\n.\r\n"


def test_bdat_and_data_in_one_session(relay):
    message = b"From: a@doe.test\r\nSubject: mixed\r\n\r\nbody\r\n"
    with login(relay) as c:
        c.send(envelope("mixed1@example.net") + bdat(message[:10]))
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
        assert c.cmd(b"DATA") == (503, b"5.5.1 DATA not allowed after BDAT")
        assert c.cmd(b"RSET")[0] == 250
        c.send(envelope("mixed2@example.net") + b"DATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        assert c.cmd(message + b".")[0] == 250
        c.send(envelope("mixed3@example.net") + bdat(message, last=True))
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
    assert arrived(relay, "mixed2@example.net").endswith(b"\r\n" + message)
    assert arrived(relay, "mixed3@example.net").endswith(b"\r\n" + message)
    assert not [m for m in relay.sink.messages() if "mixed1@example.net" in m[0]["recipients"]]


def test_a_count_larger_than_what_is_sent_times_out_and_keeps_nothing(relay):
    with login(relay) as c:
        c.send(envelope("short@example.net") + b"BDAT 5000 LAST\r\nFrom: a@doe.test\r\n\r\nx")
        assert [c.reply()[0] for _ in range(2)] == [250, 250]
        received = c.read_to_end(timeout=20)
    assert received.endswith(b"421 4.4.2 relay.test Error: timeout exceeded\r\n")
    wait_for(lambda: "disconnected during BDAT" in relay.log(), timeout=10,
             what="the discarded message in the log")
    assert list((relay.data / "spool" / "tmp").iterdir()) == []


def test_client_killed_mid_chunk_leaves_nothing(relay):
    before = relay.log().count("disconnected during BDAT")
    c = login(relay)
    c.send(envelope("killed@example.net") + b"BDAT 150000 LAST\r\nSubject: half\r\n\r\n"
           + b"partial line\r\n" * 8000)
    assert [c.reply()[0] for _ in range(2)] == [250, 250]
    c.close()
    wait_for(lambda: relay.log().count("disconnected during BDAT") > before
             and not list((relay.data / "spool" / "tmp").iterdir()), timeout=10,
             what="tmp/ to be empty")


def test_a_chunk_over_the_size_limit_is_read_then_refused(relay):
    with login(relay) as c:
        c.send(envelope("big@example.net") + bdat(b"From: a@doe.test\r\n\r\n")
               + bdat(b"y" * 300_000, last=True))
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
        assert c.reply() == (552, b"5.3.4 Message size exceeds fixed limit of 204800 bytes")
        assert c.cmd(b"NOOP")[0] == 250  # the chunk's octets were not read as commands


@pytest.mark.parametrize("variant,accepted", [
    (b"\n.\n", True), (b"\r\n.\n", True), (b"\n.\r\n", True), (b"\r\n.\r\n", True),
    (b"\r.\r", False), (b"\r.\r\n", False), (b"\n.\r", False),
])
def test_smuggling_in_a_chunk_never_makes_a_second_message(relay, variant, accepted):
    to = f"smuggle{len(relay.sink.messages())}-{variant.hex()}@example.net"
    content = (b"From: a@doe.test\r\nSubject: s\r\n\r\nfirst body" + variant
               + b"MAIL FROM:<ceo@doe.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
               + b"From: <ceo@doe.test>\r\n\r\nSMUGGLED\r\n.\r\n")
    with login(relay) as c:
        c.send(envelope(to) + bdat(content, last=True) + b"NOOP\r\n")
        codes = [c.reply()[0] for _ in range(4)]
    assert codes == [250, 250, 250 if accepted else 550, 250]
    if accepted:  # one message, the smuggled part its content, line ends made CRLF
        data = arrived(relay, to)
        assert data.endswith(b"first body\r\n.\r\nMAIL FROM:<ceo@doe.test>\r\n"
                             b"RCPT TO:<victim@example.net>\r\nDATA\r\n"
                             b"From: <ceo@doe.test>\r\n\r\nSMUGGLED\r\n.\r\n")
    assert not [m for m in relay.sink.messages() if m[0]["sender"] == "ceo@doe.test"]
    assert not [p for p in relay.spool_files()
                if json.loads(p.read_bytes().partition(b"\n")[0])["sender"] != "a@doe.test"]
