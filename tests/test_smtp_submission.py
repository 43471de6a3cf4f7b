"""Submitting mail over loopback TLS into the real spool: sender scopes, blocked and
sandboxed users, smuggling, line and size limits, a client killed mid-DATA, pipelining,
and what the spool receives."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import socket
import struct

from test_smtp_support import (
    PASSWORD,
    LineClient,
    LoopbackCase,
    message,
    plain,
    tls_files,
)
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy


def submit(port, login, sender, header_from=None, to=("rcpt@example.net",)):
    """Send one message over implicit TLS; the (code, text) of MAIL or of the end of DATA."""
    with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test",
                          context=tls_files().client, timeout=20) as c:
        c.login(login, PASSWORD)
        code, text = c.mail(sender)
        if code != 250:
            return code, text.decode()
        for rcpt in to:
            c.rcpt(rcpt)
        code, text = c.data(message(header_from or sender, to[0]))
        return code, text.decode()


def authenticated(port, login="doe.test") -> LineClient:
    c = LineClient(port, implicit_tls=True)
    c.cmd("EHLO client.test")
    assert c.cmd(b"AUTH PLAIN " + plain(login))[0] == 235
    return c


def in_body(port) -> LineClient:
    """A client that has logged in, been let into DATA for a@doe.test -> r@example.net and
    sent the header: what it sends now is the body."""
    c = authenticated(port)
    c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(b"From: a@doe.test\r\n\r\n")
    return c


class ScopeTests(LoopbackCase):
    @defer.inlineCallbacks
    def check(self, login, allowed, refused_envelope, refused_header):
        port = self.listen("implicit")
        for sender in allowed:
            code, text = yield deferToThread(submit, port, login, sender)
            self.assertEqual(code, 250, (login, sender, text))
        for sender in refused_envelope:
            code, text = yield deferToThread(submit, port, login, sender)
            self.assertEqual((code, text),
                             (550, f"5.7.1 Sender address <{sender}> not allowed for user "
                                   f"{login}"))
        for header in refused_header:
            code, text = yield deferToThread(submit, port, login, allowed[0], header)
            self.assertEqual((code, text),
                             (550, f"5.7.1 From: header address {header} not allowed for "
                                   f"user {login}"))
        self.assertEqual(len(self.files("queue")), len(allowed))
        self.assertEqual(self.files("tmp"), [])

    def test_domain_level(self):
        return self.check(
            "doe.test",
            allowed=["john@doe.test", "Mary.Smith@DOE.TEST", "x+tag@doe.test"],
            refused_envelope=["a@sub.doe.test", "a@doe.test.evil.example", "a@xdoe.test",
                              "john@shop.test"],
            refused_header=["ceo@victim.example", "a@sub.doe.test"],
        )

    def test_user_level(self):
        return self.check(
            "john@shop.test",
            allowed=["john@shop.test", "JOHN@Shop.Test"],
            refused_envelope=["mary@shop.test", "john@sub.shop.test", "john+x@shop.test"],
            refused_header=["mary@shop.test", "john@doe.test"],
        )

    def test_named_user(self):
        return self.check(
            "webapp",
            allowed=["anyone@other.test", "news@shop.test", "NEWS@SHOP.TEST"],
            refused_envelope=["john@shop.test", "a@sub.other.test", "webapp@doe.test"],
            refused_header=["john@shop.test", "x@evil.example"],
        )

    @defer.inlineCallbacks
    def test_blocked_and_sandboxed(self):
        port = self.listen("implicit")
        blocked = yield deferToThread(submit, port, "blocked.test", "a@blocked.test")
        self.assertEqual(blocked, (550, "5.7.1 user blocked.test is blocked"))
        sandboxed = yield deferToThread(submit, port, "sandbox.test", "a@sandbox.test")
        self.assertEqual(sandboxed[0], 250)
        held = self.files("hold")
        self.assertEqual(self.files("queue"), [])
        self.assertEqual(len(held), 1)
        self.assertTrue(self.spool.envelope(held[0]).sandboxed)


SMUGGLED = (b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<target@example.net>\r\nDATA\r\n"
            b"From: ceo@victim.example\r\n\r\nsmuggled\r\n")


class DataTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_smuggling_payloads_give_no_second_envelope(self):
        port = self.listen("implicit")
        variants = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r\n",
                    b"\n.\r", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]

        def talk(variant):
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            assert c.replies(3) == [250, 250, 354]
            c.send(b"From: a@doe.test\r\n\r\nfirst body" + variant + SMUGGLED + b".\r\n")
            end = c.reply()
            after = c.cmd("QUIT")
            c.close()
            return end, after

        for variant in variants:
            end, after = yield deferToThread(talk, variant)
            # One reply for the whole data, then QUIT: the smuggled commands never ran.
            self.assertEqual(end[0], 550, variant)
            self.assertTrue(end[1][0].startswith("5.6.0 Message refused"), end)
            self.assertEqual(after[0], 221, variant)
        self.assertEqual(self.files("queue") + self.files("tmp"), [])

        def dot_space():  # ". " is not the end; the message is kept whole
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                   b"From: a@doe.test\r\n\r\nfirst\r\n. \r\n" + SMUGGLED + b".\r\n")
            out = c.replies(4)
            c.close()
            return out

        self.assertEqual((yield deferToThread(dot_space)), [250, 250, 354, 250])
        queued = self.files("queue")
        self.assertEqual(len(queued), 1)
        self.assertEqual(self.spool.envelope(queued[0]).recipients, ["r@example.net"])
        self.assertIn(b"\r\n \r\nMAIL FROM:<ceo@victim.example>\r\n", self.body(queued[0]))

    @defer.inlineCallbacks
    def test_long_line_then_commands_are_not_run(self):
        port = self.listen("implicit")

        def talk():
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                   b"From: a@doe.test\r\n\r\n" + b"x" * 70000 + b"\r\n" + SMUGGLED
                   + b"QUIT\r\n.\r\nNOOP\r\n")
            out = c.replies(5)
            c.close()
            return out

        self.assertEqual((yield deferToThread(talk)), [250, 250, 354, 500, 250])
        self.assertEqual(self.files("queue") + self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_unterminated_line_does_not_grow_memory(self):
        port = self.listen("implicit")
        factory = self.factories[0]

        def talk():
            c = in_body(port)
            chunk = b"y" * 2**20
            for _ in range(24):  # 24 MiB without a line end
                c.send(chunk)
            end = c.cmd(b"\r\n.")
            c.close()
            return end

        end = yield deferToThread(talk)
        self.assertEqual(end, (500, ["5.5.2 Message refused: line longer than 65536 octets"]))
        self.assertLess(factory.max_buffered, 2 * 64 * 1024)  # LONG_LINE and a chunk
        self.assertEqual(self.files("queue") + self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_a_line_longer_than_the_size_limit_ends_the_session(self):
        port = self.listen("implicit", max_message_size=300_000)
        factory = self.factories[0]

        def talk():
            c = in_body(port)
            try:  # never a line end: the reply comes without one
                for _ in range(100):  # 6.4 MB at most; the relay stops reading at 300 kB
                    c.send(b"y" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
            end = c.reply()
            closed = c.eof()
            c.close()
            return end, closed

        end, closed = yield deferToThread(talk)
        self.assertEqual(end, (552, ["5.3.4 Message size exceeds fixed limit of 300000 bytes"]))
        self.assertTrue(closed)
        self.assertLess(factory.max_buffered, 2 * 64 * 1024)
        self.assertEqual(self.files("queue") + self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_long_lines_are_accepted_and_stored_conforming(self):
        port = self.listen("implicit")
        html = ("<table>" + "<tr><td>Zeile mit Umlauten: äöü</td></tr>" * 400
                + "</table>").encode()  # one line of 17 kB
        small = (b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
                 b"Subject: " + b"word " * 300 + b"\r\n\r\n" + html + b"\r\n..dot\r\n")
        # Over 64 KiB: received into tmp/ before it is re-encoded.
        large = small.replace(html, (html + b"\r\n") * 8)

        def send(data):
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            assert c.replies(3) == [250, 250, 354]
            c.send(b"From: a@doe.test\r\n" + data + b".\r\n")
            end = c.reply()
            c.close()
            return end

        for data in (small, large):
            end = yield deferToThread(send, data)
            self.assertEqual(end[0], 250, end)
            queue_id = end[1][0].rsplit(" ", 1)[-1]
            stored = self.body(queue_id)
            self.assertTrue(all(len(line) <= 998 for line in stored.split(b"\r\n")))
            msg = email.message_from_bytes(stored, policy=email.policy.compat32)
            self.assertEqual(msg["Content-Transfer-Encoding"], "quoted-printable")
            self.assertEqual(msg.get_payload(decode=True),
                             data.split(b"\r\n\r\n", 1)[1].replace(b"\n..", b"\n."))
            self.assertEqual(msg["Subject"].replace("\r\n", ""), "word " * 300)
        self.assertEqual(self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_a_long_line_that_cannot_be_re_encoded_is_refused(self):
        port = self.listen("implicit")

        def talk():
            c = in_body(port)  # the header is sent: this is the body
            c.send(b"x\r\n.\r\n")
            assert c.reply()[0] == 250
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            assert c.replies(3) == [250, 250, 354]
            c.send(b"From: a@doe.test\r\nMIME-Version: 1.0\r\n"
                   b'Content-Type: multipart/signed; boundary="s"\r\n\r\n'
                   b"--s\r\n\r\n" + b"signed " * 200 + b"\r\n--s\r\n\r\nsig\r\n"
                   b"--s--\r\n.\r\n")
            end = c.reply()
            after = c.cmd("NOOP")
            c.close()
            return end, after

        end, after = yield deferToThread(talk)
        self.assertEqual(end[0], 550)
        self.assertTrue(end[1][0].startswith("5.6.3 Message refused: a line longer than 998 "
                                             "octets in signed content"), end)
        self.assertEqual(after[0], 250)
        self.assertEqual(len(self.files("queue")), 1)  # the first message only
        self.assertEqual(self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_large_message_streams_to_disk(self):
        port = self.listen("implicit")
        factory = self.factories[0]
        line = b"m" * 998 + b"\r\n"

        def talk():
            c = in_body(port)
            for _ in range(20):  # 20 MB
                c.send(line * 1000)
            end = c.cmd(b".")
            c.close()
            return end

        end = yield deferToThread(talk)
        self.assertEqual(end[0], 250)
        self.assertLess(factory.max_buffered, 64 * 1024)
        (queue_id,) = self.files("queue")
        with self.spool.open_body(queue_id) as f:
            received = f.read(1024).index(b"From: a@doe.test")  # the relay's header
        self.assertEqual(self.spool.snapshot(queue_id).size - received,
                         len(b"From: a@doe.test\r\n\r\n") + 20 * 1000 * len(line))

    @defer.inlineCallbacks
    def test_over_size(self):
        port = self.listen("implicit", max_message_size=100_000)

        def with_size():  # smtplib declares SIZE: refused at MAIL
            try:
                submit_big(port)
            except smtplib.SMTPSenderRefused as e:
                return e.smtp_code, e.smtp_error.decode()

        def without_size():  # found out while reading the data, which is discarded
            c = in_body(port)
            c.send((b"z" * 998 + b"\r\n") * 300 + b".\r\n")
            end = c.reply()
            after = c.cmd("NOOP")
            c.close()
            return end, after

        self.assertEqual((yield deferToThread(with_size)),
                         (552, "5.3.4 Message size exceeds fixed limit of 100000 bytes"))
        end, after = yield deferToThread(without_size)
        self.assertEqual(end, (552, ["5.3.4 Message size exceeds fixed limit of 100000 bytes"]))
        self.assertEqual(after[0], 250)
        self.assertEqual(self.files("queue") + self.files("tmp"), [])

    @defer.inlineCallbacks
    def test_recipient_limit(self):
        port = self.listen("implicit")

        def talk():
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\n" + b"".join(
                b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(401)))
            codes = c.replies(402)
            last = (c.buf, c.cmd("RSET"))
            c.close()
            return codes, last

        codes, (_, rset) = yield deferToThread(talk)
        self.assertEqual(codes, [250] * 401 + [452])
        self.assertEqual(rset[0], 250)

    @defer.inlineCallbacks
    def test_client_killed_mid_data_leaves_nothing(self):
        port = self.listen("implicit")
        factory = self.factories[0]

        def talk():
            c = in_body(port)
            c.send(b"partial body line\r\n" * 5000)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.sock.close()  # a reset, mid-DATA

        yield deferToThread(talk)
        self.assertTrue((yield self.sessions_ended()))
        self.assertEqual(len(factory.sessions), 1)
        self.assertEqual(self.files("tmp") + self.files("queue"), [])

    @defer.inlineCallbacks
    def test_pipelined_transaction_in_one_write(self):
        port = self.listen("implicit")

        def talk():
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r1@example.net>\r\n"
                   b"RCPT TO:<r2@example.net>\r\nDATA\r\nFrom: a@doe.test\r\n\r\n"
                   b"body\r\n.\r\nMAIL FROM:<a@doe.test>\r\nRCPT TO:<r3@example.net>\r\n"
                   b"DATA\r\nFrom: a@doe.test\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
            out = [c.reply() for _ in range(9)]
            closed = c.eof()
            c.close()
            return out, closed

        out, closed = yield deferToThread(talk)
        self.assertEqual([r[0] for r in out], [250, 250, 250, 354, 250, 250, 250, 354, 250])
        self.assertTrue(closed)
        queued = self.files("queue")
        self.assertEqual(len(queued), 2)
        self.assertEqual(sorted(r for q in queued for r in self.spool.envelope(q).recipients),
                         ["r1@example.net", "r2@example.net", "r3@example.net"])


def submit_big(port):
    with smtplib.SMTP_SSL("127.0.0.1", port, context=tls_files().client, timeout=20) as c:
        c.login("doe.test", PASSWORD)
        c.sendmail("a@doe.test", ["r@example.net"], message("a@doe.test", body="x" * 200_000))


class SpoolTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_queue_id_envelope_and_received_header(self):
        port = self.listen("implicit")

        def talk():
            c = LineClient(port, implicit_tls=True)
            injected = c.cmd(b"EHLO evil\nBcc: injected@evil.example")
            c.cmd("EHLO evil(comment);x")
            c.cmd(b"AUTH PLAIN " + plain("john@shop.test"))
            c.send(b"MAIL FROM:<john@shop.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                   b"From: John <john@shop.test>\r\nSubject: hi\r\n\r\n..dot\r\n.\r\n")
            out = [c.reply() for _ in range(4)]
            c.send(b"MAIL FROM:<john@shop.test>\r\nRCPT TO:<a@example.net>\r\n"
                   b"RCPT TO:<b@example.net>\r\nDATA\r\nFrom: john@shop.test\r\n\r\nx\r\n.\r\n")
            out += [c.reply() for _ in range(5)]
            c.close()
            return injected, out

        injected, out = yield deferToThread(talk)
        self.assertEqual(injected[0], 500)
        first = re.fullmatch(r"2\.0\.0 Ok: queued as (\w+)", out[3][1][0]).group(1)
        second = re.fullmatch(r"2\.0\.0 Ok: queued as (\w+)", out[8][1][0]).group(1)
        self.assertEqual(self.files("queue"), sorted([first, second]))
        env = self.spool.envelope(first)
        self.assertEqual(
            (env.id, env.sender, env.recipients, env.user, env.account, env.client_ip,
             env.helo, env.tls, env.priority, env.sandboxed),
            (first, "john@shop.test", ["r@example.net"], "john@shop.test", "default",
             "127.0.0.1", "evil(comment);x", True, 2, False),
        )
        self.assertTrue(first.startswith("2"))  # the user's priority leads the queue id
        body = self.body(first)
        self.assertRegex(body, re.compile(
            rb"\AReceived: from evil_comment__x \(\[127\.0\.0\.1\]\)\r\n"
            rb"\tby relay\.test \(mailrelay\) with ESMTPSA id " + first.encode() + rb"\r\n"
            rb"\tfor <r@example\.net>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
            rb"From: John <john@shop\.test>\r\nSubject: hi\r\n\r\n\.dot\r\n\Z"))
        self.assertNotIn(b"injected", body)
        other = self.body(second)
        self.assertIn(b"with ESMTPSA id " + second.encode() + b";\r\n\t", other)
        self.assertNotIn(b"for <", other)


class DeferredPolicyTests(LoopbackCase):
    """Policy answers that take real time: pipelined commands still run in order."""

    @defer.inlineCallbacks
    def test_pipelining_with_slow_policy(self):
        policy = SlowPolicy()
        port = self.listen("implicit", policy=policy)

        def talk():
            c = authenticated(port)
            c.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r1@example.net>\r\n"
                   b"RCPT TO:<r2@example.net>\r\nDATA\r\nFrom: a@doe.test\r\n\r\n"
                   b"MAIL FROM:<ceo@victim.example>\r\nQUIT\r\n.\r\nQUIT\r\n")
            out = c.replies(6)
            c.close()
            return out

        self.assertEqual((yield deferToThread(talk)), [250, 250, 250, 354, 250, 221])
        self.assertTrue((yield self.sessions_ended()))
        queued = self.files("queue")
        self.assertEqual(len(queued), 1)
        self.assertIn(b"\r\nMAIL FROM:<ceo@victim.example>\r\nQUIT\r\n", self.body(queued[0]))
        self.assertEqual(policy.calls, ["connect", "authAttempt", "authSucceeded", "mailFrom",
                                        "rcptTo", "rcptTo", "data", "accepted", "disconnect"])


@implementer(ISubmissionPolicy)
class SlowPolicy:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def connect(self, client_ip):
        self.calls.append("connect")
        return deferLater(reactor, 0.01, lambda: SlowSession(self.calls))


@implementer(ISessionPolicy)
class SlowSession:
    """Every check answers 10 ms later; the notices (whose outcome the session does not
    wait for) answer at once, so none is left running when the test ends."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def _slow(self, name: str):
        self.calls.append(name)
        return deferLater(reactor, 0.01, lambda: None)

    def authAttempt(self, username):
        return self._slow("authAttempt")

    def authFailed(self, username):
        return self._slow("authFailed")

    def authSucceeded(self, avatar):
        return self._slow("authSucceeded")

    def mailFrom(self, avatar, sender):
        return self._slow("mailFrom")

    def rcptTo(self, avatar, recipient, count):
        return self._slow("rcptTo")

    def data(self, avatar, envelope):
        return self._slow("data")

    def senderRefused(self, avatar, address, header):
        self.calls.append("senderRefused")

    def accepted(self, avatar, envelope):
        self.calls.append("accepted")

    def reset(self):
        self.calls.append("reset")

    def disconnect(self):
        self.calls.append("disconnect")
