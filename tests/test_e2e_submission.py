"""End to end through the real twistd process: authenticated submission (issue 2)."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest
from harness import Relay, Sink, message, wait_for

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    # Delivery is off: these tests look at what is accepted into the spool.
    r = Relay(tmp_path_factory.mktemp("relay"), config="[delivery]\nenabled = no\n")
    r.admin("account", "set", "default", "--domains", "doe.test;shop.test;other.test;blocked.test")
    r.add_user("doe.test", PASSWORD)  # domain-level
    r.add_user("john@shop.test", PASSWORD)  # user-level
    r.add_user("webapp", PASSWORD, "--domains", "other.test", "--addresses", "news@shop.test")
    r.add_user("blocked.test", PASSWORD, "--status", "blocked")
    r.start()
    yield r
    r.stop()


def send(relay, login, sender, to="someone@example.net", header_from=None, implicit=False):
    client = relay.smtps(login) if implicit else relay.smtp(login=login)
    try:
        data = message(header_from or sender, to)
        client.sendmail(sender, [to], data)
        return client
    finally:
        client.quit()


def test_ehlo_advertises_extensions(relay):
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, local_hostname="client.test") as c:
        code, text = c.ehlo()
        assert code == 250
        for ext in ("size", "pipelining", "8bitmime", "enhancedstatuscodes", "starttls"):
            assert c.has_extn(ext), ext
        assert c.esmtp_features["size"] == str(50 * 2**20)
        assert not c.has_extn("auth"), "AUTH must not be offered before TLS"
        c.starttls(context=relay.tls_context())
        c.ehlo()
        assert not c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


def test_implicit_tls_listener_offers_auth_and_no_starttls(relay):
    with relay.smtps() as c:
        assert c.has_extn("auth")
        assert not c.has_extn("starttls")


def test_auth_before_tls_refused(relay):
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, local_hostname="client.test") as c:
        c.ehlo()
        code, text = c.docmd("AUTH", "PLAIN AGRvZS50ZXN0AGNvcnJlY3Q=")
        assert code == 538 and b"5.7.11" in text


def test_unauthenticated_relay_refused(relay):
    for tls in (False, True):
        with relay.smtp(starttls=tls) as c:
            code, text = c.docmd("MAIL", "FROM:<anyone@doe.test>")
            assert code == 530 and b"5.7.0" in text
            code, text = c.docmd("RCPT", "TO:<victim@example.net>")
            assert code in (503, 530, 550)


def test_wrong_password_and_unknown_user_look_the_same(relay):
    replies = []
    for user in ("doe.test", "nobody.test"):
        with relay.smtp() as c:
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                c.login(user, "wrong password")
            replies.append((e.value.smtp_code, e.value.smtp_error))
    assert replies[0] == replies[1]
    assert replies[0][0] == 535 and b"5.7.8" in replies[0][1]


@pytest.mark.parametrize(
    "login,sender",
    [
        ("doe.test", "anyone@doe.test"),
        ("doe.test", "Mixed.Case@DOE.test"),
        ("john@shop.test", "john@shop.test"),
        ("webapp", "x@other.test"),
        ("webapp", "news@shop.test"),
    ],
)
def test_sender_in_scope_is_queued(relay, login, sender):
    before = len(relay.spool_files())
    with relay.smtp(login=(login, PASSWORD)) as c:
        c.mail(sender)
        c.rcpt("someone@example.net")
        code, text = c.data(message(sender, "someone@example.net"))
    assert code == 250 and b"2.0.0" in text
    queue_id = text.decode().rsplit(" ", 1)[-1]
    names = [p.name for p in relay.spool_files()] + [p.name for p in relay.spool_files("hold")]
    assert queue_id in names
    assert len(relay.spool_files()) >= before  # delivery may already be working on others


@pytest.mark.parametrize(
    "login,sender",
    [
        ("doe.test", "someone@sub.doe.test"),
        ("doe.test", "someone@shop.test"),
        ("john@shop.test", "jane@shop.test"),
        ("webapp", "other@shop.test"),
        ("webapp", "x@doe.test"),
    ],
)
def test_envelope_sender_out_of_scope_refused(relay, login, sender):
    with relay.smtp(login=(login, PASSWORD)) as c:
        code, text = c.docmd("MAIL", f"FROM:<{sender}>")
        assert code == 550 and b"5.7.1" in text


def test_spoofed_header_from_refused_and_nothing_kept(relay):
    before = {p.name for p in relay.spool_files()}
    with relay.smtp(login=("john@shop.test", PASSWORD)) as c:
        c.mail("john@shop.test")
        c.rcpt("someone@example.net")
        code, text = c.data(message("ceo@shop.test", "someone@example.net"))
    assert code == 550 and b"5.7.1" in text
    assert {p.name for p in relay.spool_files()} <= before | set()
    assert not list((relay.data / "spool" / "tmp").iterdir())


def test_implicit_tls_submission(relay):
    with relay.smtps(("doe.test", PASSWORD)) as c:
        c.mail("a@doe.test")
        c.rcpt("b@example.net")
        code, _ = c.data(message("a@doe.test", "b@example.net"))
        assert code == 250


def test_blocked_user_refused(relay):
    with relay.smtp(login=("blocked.test", PASSWORD)) as c:
        code, text = c.docmd("MAIL", "FROM:<a@blocked.test>")
        assert code == 550 and b"5.7.1" in text and b"blocked" in text


def test_too_many_recipients(relay):
    with relay.smtp(login=("doe.test", PASSWORD)) as c:
        c.mail("a@doe.test")
        for i in range(400):
            code, _ = c.rcpt(f"r{i}@example.net")
            assert code == 250
        code, text = c.rcpt("one-too-many@example.net")
        assert code == 452 and b"4.5.3" in text


def test_oversize_message_refused_and_nothing_kept(tmp_path):
    r = Relay(tmp_path, config="[limits]\nmax_message_size = 64k\n[delivery]\nenabled = no\n")
    r.domain_login("doe.test", PASSWORD)
    r.start()
    try:
        with r.smtp(login=("doe.test", PASSWORD)) as c:
            code, text = c.docmd("MAIL", "FROM:<a@doe.test> SIZE=999999")
            assert code == 552 and b"5.3.4" in text
            c.rset()
            c.mail("a@doe.test")
            c.rcpt("b@example.net")
            body = ("z" * 998 + "\r\n") * 80  # about 80 KB
            code, text = c.data(message("a@doe.test", "b@example.net", body=body))
            assert code == 552 and b"5.3.4" in text
        assert r.spool_files() == [] and r.spool_files("hold") == []
        assert list((r.data / "spool" / "tmp").iterdir()) == []
    finally:
        r.stop()


def test_long_lines_are_re_encoded_and_sent_on_conforming(tmp_path):
    # An HTML generator's lines (one of 20 kB here), a header that is one long line, and a
    # line no client should send: what a real server receives has no line over 998
    # octets, and the reader decodes exactly what was submitted.
    sink = Sink(tmp_path / "sink")
    r = Relay(tmp_path / "relay", config=(
        f"[delivery]\nport = {sink.port}\nmx_tls = none\nretry_first = 1s\n"
        f"[routes]\nexample.net = 127.0.0.1:{sink.port}\n"))
    r.domain_login("doe.test", PASSWORD)
    r.start()
    try:
        html = ("<div>" + "<span>ünïcödé text, </span>" * 700 + "</div>").encode()
        to = ", ".join(f"r{i}@example.net" for i in range(60))
        data = (f"From: a@doe.test\r\nTo: {to}\r\nSubject: long lines\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + html + b"\r\n.\r\n"
        with r.smtp(login=("doe.test", PASSWORD)) as c:
            c.mail("a@doe.test")
            c.rcpt("r0@example.net")
            assert c.data(data)[0] == 250
            c.mail("a@doe.test")
            c.rcpt("r0@example.net")
            code, text = c.data(b"From: a@doe.test\r\n\r\n" + b"x" * 70000 + b"\r\n")
            assert (code, text) == (500, b"5.5.2 Message refused: line longer than 65536 octets")
        ((_, received),) = sink.wait(1)
        assert all(len(line) <= 998 for line in received.split(b"\r\n"))
        msg = email.message_from_bytes(received, policy=email.policy.compat32)
        assert msg["Content-Transfer-Encoding"] == "quoted-printable"
        assert msg.get_payload(decode=True) == html + b"\r\n.\r\n"
        assert msg["To"].replace("\r\n", "") == to
        assert "re-encoded" in r.log()
    finally:
        r.stop()
        sink.stop()


def test_starttls_injection_is_not_executed(relay):
    s = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO client.test\r\n")
    while True:
        line = f.readline()
        if line[3:4] == b" ":
            break
    s.sendall(b"STARTTLS\r\nMAIL FROM:<injected@doe.test>\r\n")
    reply = f.readline()
    if not reply.startswith(b"220"):
        # Refused outright: an error reply or none, then the connection is closed.
        assert reply == b"" or reply[:1] == b"5", reply
        assert f.read() == b""
        s.close()
        return
    try:
        tls = relay.tls_context().wrap_socket(s, server_hostname="127.0.0.1")
        tls.settimeout(5)
        data = tls.recv(4096)  # an injected "250" would show up here
    except (ssl.SSLError, OSError):
        data = b""
    assert not data.startswith(b"250")
    s.close()


@pytest.mark.parametrize(
    "variant", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\n.\r"]
)
def test_smuggling_never_makes_a_second_message(relay, variant):
    before = {p.name for p in relay.spool_files()} | {p.name for p in relay.spool_files("hold")}
    with relay.smtp(login=("doe.test", PASSWORD)) as c:
        c.mail("a@doe.test")
        c.rcpt("b@example.net")
        payload = (
            message("a@doe.test", "b@example.net", body="first body")
            + variant
            + b"MAIL FROM:<ceo@doe.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            + b"From: <ceo@doe.test>\r\n\r\nSMUGGLED\r\n"
        )
        c.putcmd("data")
        code, _ = c.getreply()
        assert code == 354
        c.send(payload + b"\r\n.\r\n")
        code, text = c.getreply()
        c.rset()
    after = {p.name for p in relay.spool_files()} | {p.name for p in relay.spool_files("hold")}
    # One DATA phase makes at most one message, and never one from the smuggled envelope.
    assert len(after - before) <= 1
    for name in after - before:
        path = relay.data / "spool" / "queue" / name
        if path.exists():
            assert json.loads(path.read_bytes().partition(b"\n")[0])["sender"] == "a@doe.test"
    assert code in (250, 550, 554), text


def test_client_killed_mid_data_leaves_nothing(relay):
    before = {p.name for p in relay.spool_files()}
    c = relay.smtp(login=("doe.test", PASSWORD))
    c.mail("a@doe.test")
    c.rcpt("b@example.net")
    c.putcmd("data")
    assert c.getreply()[0] == 354
    c.send(b"Subject: half\r\n\r\n" + b"partial line\r\n" * 1000)
    c.sock.close()
    wait_for(lambda: not list((relay.data / "spool" / "tmp").iterdir()), timeout=10,
             what="tmp/ to be empty")
    assert {p.name for p in relay.spool_files()} - before == set()


def test_swaks_submission(relay):
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by test.sh"
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{relay.smtp_port}", "--tls", "--tls-verify",
         "--tls-ca-path", str(relay.data / "tls" / "cert.pem"),
         "--auth", "PLAIN", "--auth-user", "doe.test", "--auth-password", PASSWORD,
         "--from", "swaks@doe.test", "--to", "rcpt@example.net", "--helo", "client.test",
         "--h-From", "<swaks@doe.test>"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued as" in result.stdout


def test_kill9_after_250_keeps_the_message(tmp_path):
    r = Relay(tmp_path, config="[delivery]\nenabled = no\n")
    r.domain_login("doe.test", PASSWORD)
    r.start()
    with r.smtp(login=("doe.test", PASSWORD)) as c:
        c.mail("a@doe.test")
        c.rcpt("b@example.net")
        code, text = c.data(message("a@doe.test", "b@example.net", body="durable\r\n"))
        assert code == 250
        r.kill9()
    queue_id = text.decode().rsplit(" ", 1)[-1]
    path = r.data / "spool" / "queue" / queue_id
    assert path.exists()
    envelope_line, _, body = path.read_bytes().partition(b"\n")
    envelope = json.loads(envelope_line)
    assert envelope["sender"] == "a@doe.test" and envelope["recipients"] == ["b@example.net"]
    assert envelope["user"] == "doe.test" and envelope["client_ip"] == "127.0.0.1"
    assert body.startswith(b"Received: ") and b"ESMTPSA" in body and queue_id.encode() in body
    assert body.endswith(b"durable\r\n")
    r.start()  # the queue is picked up again after a restart
    assert path.exists()
    r.stop()


def test_admin_list_json(relay):
    users = json.loads(relay.admin("user", "list", "--json").stdout)
    names = {u["username"] for u in users}
    assert {"doe.test", "john@shop.test", "webapp"} <= names
    assert all("password" not in json.dumps(u).lower() or "hash" not in u for u in users)
