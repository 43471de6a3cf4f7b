"""The submission session byte by byte, over StringTransport with a Clock: commands, AUTH,
transactions, policy hooks, pipelining behind Deferreds, limits and timeouts."""

from __future__ import annotations

import base64
import gc
import weakref

from test_smtp_support import (
    HOST,
    MemorySpool,
    Session,
    b64,
    codes,
    make_portal,
    plain,
)
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.errors import StorageError
from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy
from mailrelay.reply import Reply
from mailrelay.smtp.factory import SubmissionFactory

SERVER = "mailrelay.smtp.server"
TRANSACTION = (
    b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
    b"From: a@doe.test\r\nSubject: s\r\n\r\nbody\r\n.\r\n"
)


class CommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.s = Session(self.clock)

    def test_greeting_and_ehlo(self) -> None:
        s = Session(self.clock)
        self.assertEqual(s.replies(), [f"220 {HOST} ESMTP mailrelay"])
        self.assertEqual(s.send(b"EHLO client.test\r\n"), [
            f"250-{HOST} Hello 192.0.2.7", "250-SIZE 52428800", "250-PIPELINING",
            "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250-CHUNKING", "250-DSN",
            "250-SMTPUTF8", "250 AUTH PLAIN LOGIN",
        ])

    def test_ipv4_mapped_peer_is_shown_as_ipv4(self) -> None:
        self.assertEqual(Session(self.clock, ip="::ffff:192.0.2.8").proto.client_ip,
                         "192.0.2.8")
        self.assertEqual(Session(self.clock, ip="2001:db8::1").proto.client_ip, "2001:db8::1")

    def test_no_auth_offered_or_accepted_in_plaintext_by_default(self) -> None:
        s = Session(self.clock, plaintext_auth=False)
        s.replies()
        lines = s.send(b"EHLO client.test\r\n")
        self.assertFalse([x for x in lines if "AUTH" in x])
        self.assertEqual(s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n"), [
            "538 5.7.11 Encryption required for requested authentication mechanism"])
        self.assertEqual(s.checker.seen, [])

    def test_helo_and_simple_commands(self) -> None:
        s = self.s
        s.replies()
        self.assertEqual(s.send(b"HELO client.test\r\n"), [f"250 {HOST} Hello 192.0.2.7"])
        self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(s.send(b"RSET\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(codes(s.send(b"VRFY someone@example.net\r\n")), [252])
        self.assertEqual(codes(s.send(b"VRFY\r\n")), [501])
        self.assertEqual(codes(s.send(b"HELP\r\n")), [214])
        self.assertEqual(codes(s.send(b"EHLO\r\n")), [501])
        self.assertEqual(s.send(b"QUIT\r\n"), ["221 2.0.0 Bye"])
        self.assertTrue(s.closed)

    def test_garbage_verbs_never_crash(self) -> None:
        s = self.s
        s.replies()
        for line in [b"\xc3\xa9HLO x", b"\xff\xfe", b"123", b"MAIL\x01FROM:<a@b.example>",
                     b"DO_MAIL x", b"ext_AUTH PLAIN", b"   "]:
            lines = s.send(line + b"\r\n")
            self.assertEqual(len(lines), 1, line)
            self.assertTrue(lines[0].startswith("500 5.5."), (line, lines))
        self.assertEqual(codes(s.send(b"NOOP\r\n")), [250])
        self.assertFalse(s.closed)

    def test_expn_is_a_known_command(self) -> None:
        s = self.s
        s.replies()
        self.assertEqual(s.send(b"EXPN staff\r\n"), ["502 5.5.1 EXPN not available"])
        self.assertEqual(s.send(b"expn\r\n"), ["502 5.5.1 EXPN not available"])
        self.assertFalse(s.closed)

    def test_bare_newlines_and_nul_in_commands(self) -> None:
        s = self.s
        s.replies()
        for line in [b"EHLO evil\nBcc: x@evil.example", b"EHLO evil\r", b"NOOP\rRSET",
                     b"EHLO a\x00b"]:
            self.assertEqual(s.send(line + b"\r\n"), ["500 5.5.2 Bare CR, LF or NUL in command"])
        self.assertIsNone(s.proto.helo)

    def test_long_command_line(self) -> None:
        s = self.s
        s.replies()
        self.assertEqual(s.send(b"NOOP " + b"x" * 3000 + b"\r\n"), ["500 5.5.2 Line too long"])
        self.assertFalse(s.closed)
        s.send(b"NOOP " + b"x" * 20000)  # unterminated: the buffer is capped, then closed
        self.assertTrue(s.closed)
        self.assertLessEqual(s.proto.buffered, 20005)

    def test_error_limit_closes(self) -> None:
        s = self.s
        s.replies()
        lines = s.send(b"BOGUS\r\n" * 25)
        self.assertEqual(lines[-1], "421 4.7.0 Too many errors, closing connection")
        self.assertEqual(len(lines), 22)
        self.assertTrue(s.closed)

    def test_junk_limit_closes(self) -> None:
        s = self.s
        s.replies()
        lines = s.send(b"NOOP\r\n" * 101)
        self.assertEqual(codes(lines), [250] * 100 + [421])
        self.assertTrue(s.closed)


class MemoryTests(unittest.TestCase):
    def test_refused_sessions_leave_nothing_behind(self) -> None:
        # Each refusal used to be one exception object shared by all sessions; raised
        # again by each, it kept the traceback of every raise, and so every session.
        clock = Clock()
        refs = []
        for head, body in [(b"a@doe.test", b"bare\nLF"), (b"a@doe.test", b"NUL\0"),
                           (b"a@doe.test", b"x" * 70000), (b"boss@victim.example", b"x"),
                           (b"a@doe.test", (b"y" * 900 + b"\r\n") * 200)]:
            for _ in range(3):
                s = Session(clock, max_message_size=100_000)
                s.login()
                lines = s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\n"
                               b"DATA\r\nFrom: " + head + b"\r\n\r\n" + body + b"\r\n.\r\n")
                self.assertIn(codes(lines)[-1], (500, 550, 552), lines)
                s.lose()
                refs.append(weakref.ref(s.proto))
                del s
        gc.collect()
        self.assertEqual([r for r in refs if r() is not None], [])


class AuthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.s = Session(self.clock)
        self.s.send(b"EHLO client.test\r\n")

    def test_plain_initial_response(self) -> None:
        self.assertEqual(self.s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n"),
                         ["235 2.7.0 Authentication successful"])
        self.assertEqual(self.s.checker.seen, [("doe.test", "192.0.2.7", False)])

    def test_plain_continuation(self) -> None:
        self.assertEqual(self.s.send(b"AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(codes(self.s.send(plain("doe.test") + b"\r\n")), [235])

    def test_plain_authzid(self) -> None:
        line = b"AUTH PLAIN " + plain("doe.test", authzid="doe.test") + b"\r\n"
        self.assertEqual(codes(self.s.send(line)), [235])
        s = Session(self.clock)
        s.send(b"EHLO c.test\r\n")
        line = b"AUTH PLAIN " + plain("doe.test", authzid="john@shop.test") + b"\r\n"
        self.assertEqual(s.send(line), ["535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(s.checker.seen, [])

    def test_login_mechanism(self) -> None:
        s = self.s
        self.assertEqual(s.send(b"AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(s.send(b64("john@shop.test") + b"\r\n"), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(codes(s.send(b64("correct horse battery") + b"\r\n")), [235])
        s2 = Session(self.clock)
        s2.send(b"EHLO c.test\r\n")
        self.assertEqual(s2.send(b"AUTH login " + b64("doe.test") + b"\r\n"),
                         ["334 UGFzc3dvcmQ6"])
        self.assertEqual(codes(s2.send(b64("wrong") + b"\r\n")), [535])

    def test_wrong_password_and_unknown_user_read_the_same(self) -> None:
        wrong = self.s.send(b"AUTH PLAIN " + plain("doe.test", "nope") + b"\r\n")
        unknown = self.s.send(b"AUTH PLAIN " + plain("nobody.test") + b"\r\n")
        self.assertEqual(wrong, unknown)
        self.assertEqual(wrong, ["535 5.7.8 Authentication credentials invalid"])

    def test_three_failures_close(self) -> None:
        lines = self.s.send(b"AUTH PLAIN " + plain("doe.test", "x") + b"\r\n" * 1)
        lines += self.s.send(b"AUTH PLAIN " + plain("doe.test", "y") + b"\r\n")
        lines += self.s.send(b"AUTH PLAIN " + plain("doe.test", "z") + b"\r\n")
        self.assertEqual(codes(lines), [535, 535, 535, 421])
        self.assertTrue(self.s.closed)

    def test_malformed_input_is_501_never_a_drop(self) -> None:
        s = self.s
        cases = [
            b"AUTH",
            b"AUTH PLAIN =",
            b"AUTH PLAIN !!!!",
            b"AUTH PLAIN AGFsaWNl",  # 2 parts
            b"AUTH PLAIN AGFs!*~aWNl$",  # junk inside base64
            b"AUTH PLAIN AGFsaWNlA",  # bad padding
            b"AUTH PLAIN " + b64("a\0b\0c\0d"),
            b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0x"),  # not UTF-8
            b"AUTH PLAIN " + b64("\0us\ner\0pw"),
            b"AUTH PLAIN " + b"QUFB" * 2000,
        ]
        for line in cases:
            lines = s.send(line + b"\r\n")
            self.assertEqual(len(lines), 1, line)
            self.assertTrue(lines[0].startswith("501 5.5."), (line, lines))
        self.assertEqual(s.send(b"AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(s.send(b"not base64!\r\n"), ["501 5.5.2 Invalid base64 data"])
        self.assertEqual(s.send(b"AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(s.send(b"*\r\n"), ["501 5.0.0 Authentication cancelled"])
        self.assertEqual(codes(s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")), [235])
        self.assertEqual(s.checker.seen, [("doe.test", "192.0.2.7", False)])

    def test_overlong_auth_line(self) -> None:
        lines = self.s.send(b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")
        self.assertEqual(lines, ["500 5.5.2 Line too long"])

    def test_unknown_mechanism_and_ordering(self) -> None:
        s = self.s
        self.assertEqual(s.send(b"AUTH CRAM-MD5\r\n"),
                         ["504 5.5.4 Unrecognized authentication mechanism"])
        s.login()
        self.assertEqual(s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n"),
                         ["503 5.5.1 Already authenticated"])
        fresh = Session(self.clock)
        fresh.replies()
        self.assertEqual(fresh.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n"),
                         ["503 5.5.1 Send EHLO first"])

    def test_directory_unavailable_is_temporary(self) -> None:
        self.assertEqual(self.s.send(b"AUTH PLAIN " + plain("ldapdown.test") + b"\r\n"),
                         ["454 4.7.0 Temporary authentication failure"])
        self.assertFalse(self.s.closed)


class TransactionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.s = Session(self.clock)
        self.s.replies()

    def test_unauthenticated_mail_rcpt_data(self) -> None:
        s = self.s
        s.send(b"EHLO client.test\r\n")
        self.assertEqual(s.send(b"MAIL FROM:<a@doe.test>\r\n"),
                         ["530 5.7.0 Authentication required"])
        self.assertEqual(s.send(b"RCPT TO:<victim@example.net>\r\n"),
                         ["530 5.7.0 Authentication required"])
        self.assertEqual(codes(s.send(b"DATA\r\n")), [530])
        self.assertEqual(s.spool.created, [])

    def test_accepted_message_and_envelope(self) -> None:
        s = Session(self.clock, ip="192.0.2.9")
        s.login("webapp")
        lines = s.send(b"MAIL FROM:<news@shop.test> BODY=8BITMIME SIZE=300 AUTH=<>\r\n"
                       b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
                       b"RCPT TO:<a@example.net>\r\nDATA\r\n"
                       b"From: News <news@shop.test>\r\n\r\nhi\r\n.\r\n")
        message = s.spool.created[0]
        self.assertEqual(lines[-1], f"250 2.0.0 Ok: queued as {message.id}")
        env = message.envelope
        self.assertEqual((env.sender, env.recipients, env.user, env.account, env.client_ip,
                          env.helo, env.tls, env.received_at, env.priority, env.sandboxed,
                          env.bounce_to),
                         ("news@shop.test", ["a@example.net", "b@example.org"], "webapp",
                          "default", "192.0.2.9", "client.test", False, 1_700_000_000, 3,
                          False, "ops@other.test"))
        self.assertTrue(bytes(message.data).startswith(
            b"Received: from client.test ([192.0.2.9])\r\n"
            b"\tby relay.test (mailrelay) with ESMTPA id " + message.id.encode() + b";\r\n"
            b"\tTue, 14 Nov 2023 22:13:20 +0000\r\nFrom: News <news@shop.test>\r\n"))

    def test_dsn_parameters_kept_in_the_envelope(self) -> None:
        s = Session(self.clock, ip="192.0.2.9")
        s.login("webapp")
        lines = s.send(b"MAIL FROM:<news@shop.test> RET=HDRS ENVID=batch+2B7\r\n"
                       b"RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE "
                       b"ORCPT=rfc822;list+2Btag@lists.test\r\n"
                       b"RCPT TO:<b@example.org>\r\n"
                       b"RCPT TO:<a@example.net> NOTIFY=NEVER\r\n"  # a duplicate: the first
                       b"DATA\r\nFrom: <news@shop.test>\r\n\r\nhi\r\n.\r\n")
        self.assertTrue(lines[-1].startswith("250 2.0.0 Ok: queued as"), lines)
        env = s.spool.created[0].envelope
        self.assertEqual((env.ret, env.envid, env.dsn), ("HDRS", "batch+7", {
            "a@example.net": {"notify": "SUCCESS,FAILURE", "orcpt": "rfc822;list+tag@lists.test"}}))
        # the next transaction starts with nothing asked
        s.send(b"MAIL FROM:<news@shop.test>\r\nRCPT TO:<a@example.net>\r\n"
               b"DATA\r\nFrom: <news@shop.test>\r\n\r\nhi\r\n.\r\n")
        env = s.spool.created[1].envelope
        self.assertEqual((env.ret, env.envid, env.dsn), (None, None, {}))

    def test_dsn_parameter_errors(self) -> None:
        s = self.s
        s.login()
        for line in (b"MAIL FROM:<a@doe.test> RET=HDRS RET=FULL",
                     b"MAIL FROM:<a@doe.test> ENVID=" + b"x" * 101,
                     b"MAIL FROM:<a@doe.test> ENVID=a+2x"):
            self.assertEqual(codes(s.send(line + b"\r\n")), [501], line)
        self.assertEqual(s.send(b"MAIL FROM:<a@doe.test> RET=FULL\r\n"), ["250 2.1.0 Ok"])
        for line in (b"RCPT TO:<x@example.net> NOTIFY=SUCCESS NOTIFY=FAILURE",
                     b"RCPT TO:<x@example.net> NOTIFY=NEVER,FAILURE",
                     b"RCPT TO:<x@example.net> ORCPT=x@example.net",
                     b"RCPT TO:<x@example.net> ORCPT=rfc822;x+2"):
            lines = s.send(line + b"\r\n")
            self.assertEqual(len(lines), 1, line)
            self.assertTrue(lines[0].startswith("501 5.5.4"), (line, lines))
        self.assertEqual(s.send(b"RCPT TO:<x@example.net> NOTIFY=NEVER\r\n"), ["250 2.1.5 Ok"])

    def test_smtputf8_transaction(self) -> None:
        """RFC 6531: UTF-8 in MAIL and RCPT once MAIL says SMTPUTF8; the scope holds the
        domain as A-labels and takes its U-label form, in the envelope and in From:."""
        s = Session(self.clock, ip="192.0.2.9")
        s.login("xn--bcher-kva.test")
        lines = s.send("MAIL FROM:<jöhn@Bücher.test> SMTPUTF8 BODY=8BITMIME\r\n"
                       "RCPT TO:<ülla@exämple.net>\r\nDATA\r\n"
                       "From: Jöhn <jöhn@xn--bcher-kva.test>\r\n\r\nhällo\r\n.\r\n"
                       .encode())
        message = s.spool.created[0]
        self.assertEqual(lines[-1], f"250 2.0.0 Ok: queued as {message.id}")
        env = message.envelope
        self.assertEqual((env.sender, env.recipients, env.smtputf8),
                         ("jöhn@bücher.test", ["ülla@exämple.net"], True))
        self.assertTrue(bytes(message.data).startswith(
            b"Received: from client.test ([192.0.2.9])\r\n"
            b"\tby relay.test (mailrelay) with UTF8SMTPA id " + message.id.encode() + b"\r\n"
            + "\tfor <ülla@exämple.net>; Tue, 14 Nov 2023 22:13:20 +0000\r\n".encode()))
        # Without SMTPUTF8 the A-label form is the address; UTF-8 gets 553 5.6.7.
        lines = s.send("MAIL FROM:<x@xn--bcher-kva.test>\r\nRCPT TO:<ülla@exämple.net>\r\n"
                       "RCPT TO:<u@xn--exmple-cua.net>\r\nDATA\r\n"
                       "From: x@bücher.test\r\n\r\nhi\r\n.\r\n".encode())
        self.assertEqual(lines[:4], ["250 2.1.0 Ok",
                                     "553 5.6.7 Non-ASCII recipient address needs SMTPUTF8 "
                                     "(RFC 6531)", "250 2.1.5 Ok",
                                     "354 End data with <CR><LF>.<CR><LF>"])
        message = s.spool.created[1]
        self.assertEqual(lines[4], f"250 2.0.0 Ok: queued as {message.id}")
        self.assertFalse(message.envelope.smtputf8)
        self.assertIn(b" with ESMTPA id ", bytes(message.data))
        # A UTF-8 local part in From: is an address only in an SMTPUTF8 message.
        lines = s.send("MAIL FROM:<x@bücher.test> SMTPUTF8\r\nRCPT TO:<u@example.net>\r\n"
                       "DATA\r\nFrom: jöhn@doe.test\r\n\r\nhi\r\n.\r\n".encode())
        # (Reply text stays ASCII: what is not, is shown escaped.)
        self.assertEqual(lines[-1], "550 5.7.1 From: header address j\\xf6hn@doe.test not "
                         "allowed for user xn--bcher-kva.test")
        lines = s.send("MAIL FROM:<x@bücher.test>\r\nMAIL FROM:<x@bücher.test> SMTPUTF8\r\n"
                       "RCPT TO:<u@example.net>\r\nDATA\r\n"
                       "From: jöhn@bücher.test\r\n\r\nhi\r\n.\r\n".encode())
        self.assertEqual(lines[0], "553 5.6.7 Non-ASCII sender address needs SMTPUTF8 "
                         "(RFC 6531)")
        self.assertEqual(lines[-1], f"250 2.0.0 Ok: queued as {s.spool.created[-1].id}")
        # A From: made for a message without one names a UTF-8 domain as A-labels.
        for sender, added in [("x@bücher.test", b"From: x@xn--bcher-kva.test\r\n"),
                              ("jö@bücher.test", "From: jö@bücher.test\r\n".encode())]:
            lines = s.send(f"MAIL FROM:<{sender}> SMTPUTF8\r\nRCPT TO:<u@example.net>\r\n"
                           "DATA\r\nSubject: s\r\n\r\nhi\r\n.\r\n".encode())
            message = s.spool.created[-1]
            self.assertEqual(lines[-1], f"250 2.0.0 Ok: queued as {message.id}")
            self.assertIn(b"\r\nSubject: s\r\n" + added + b"\r\nhi\r\n", bytes(message.data))

    def test_mail_parameters(self) -> None:
        s = self.s
        s.login()
        for line, reply in [
            (b"MAIL FROM:<a@doe.test> SIZE=52428801", "552 5.3.4"),
            (b"MAIL FROM:<a@doe.test> SIZE=x", "501 5.5.4"),
            (b"MAIL FROM:<a@doe.test> BODY=BINARYMIME", "501 5.5.4"),
            (b"MAIL FROM:<a@doe.test> SMTPUTF8=yes", "501 5.5.4"),
            (b"MAIL FROM:<a@doe.test> RET=BODY", "501 5.5.4"),
            (b"MAIL FROM:<a@doe.test> SIZE=1 SIZE=2", "501 5.5.4"),
            (b"MAIL FROM:<postmaster>", "501 5.1.7"),
            (b"MAIL FROM:<a@localhost>", "501 5.1.7"),
            (b"MAIL FROM:<a@[127.0.0.1]>", "501 5.1.7"),
            (b"MAIL FROM:<@relay.example:a@doe.test>", "501 5.1.7"),
            (b"MAIL FROM:<" + b"a" * 65 + b"@doe.test>", "501 5.1.7"),
            (b"MAIL FROM:<\"a\tb\"@doe.test>", "501 5.1.7"),
            (b"MAIL FROM:<a\xc3\xa9@doe.test>", "553 5.6.7"),  # UTF-8 without SMTPUTF8
            (b"MAIL FROM:<a\xe9@doe.test> SMTPUTF8", "501 5.1.7"),  # not UTF-8
            (b"MAIL FROM:<a\xc2\x85@doe.test> SMTPUTF8", "501 5.1.7"),  # a C1 control
            (b"MAIL TO:<a@doe.test>", "501 5.5.4"),
            (b"MAIL FROM:<>", "550 5.7.1"),
        ]:
            lines = s.send(line + b"\r\n")
            self.assertEqual(len(lines), 1, line)
            self.assertTrue(lines[0].startswith(reply), (line, lines))
        s = Session(self.clock)  # a fresh one: that many errors end a session (421)
        s.login()
        self.assertEqual(s.send(b"MAIL FROM:<A@Doe.Test> SIZE=52428800\r\n"), ["250 2.1.0 Ok"])
        self.assertEqual(s.send(b"MAIL FROM:<a@doe.test>\r\n"), ["503 5.5.1 Nested MAIL command"])
        for line, reply in [
            (b"RCPT TO:<postmaster>", "501 5.1.3"),
            (b"RCPT TO:<>", "501 5.1.3"),
            (b"RCPT TO:<x@example.net> NOTIFY=NEVER,DELAY", "501 5.5.4"),
            (b"RCPT TO:<x@" + b"d" * 250 + b".net>", "501 5.1.3"),
        ]:
            self.assertTrue(s.send(line + b"\r\n")[0].startswith(reply), line)
        self.assertEqual(codes(s.send(b"DATA\r\n")), [554])
        self.assertEqual(codes(s.send(b"RSET\r\nRCPT TO:<x@example.net>\r\nDATA\r\n")),
                         [250, 503, 503])

    def test_blocked_null_sender_and_scope_replies(self) -> None:
        s = self.s
        s.login("blocked.test")
        self.assertEqual(s.send(b"MAIL FROM:<a@blocked.test>\r\n"),
                         ["550 5.7.1 user blocked.test is blocked"])
        s2 = Session(self.clock)
        s2.login("john@shop.test")
        self.assertEqual(s2.send(b"MAIL FROM:<other@shop.test>\r\n"), [
            "550 5.7.1 Sender address <other@shop.test> not allowed for user john@shop.test"])
        self.assertEqual(s2.send(b"MAIL FROM:<>\r\n"), [
            "550 5.7.1 the null sender <> is not allowed for user john@shop.test"])

    def test_header_from_checked(self) -> None:
        s = self.s
        s.login()
        for header, reply in [
            (b"From: boss@victim.example", "550 5.7.1 From: header address boss@victim.example "
             "not allowed for user doe.test"),
            (b"From: a@doe.test, boss@victim.example", "550 5.7.1 From: header address "
             "boss@victim.example"),
            (b"From: a@doe.test\r\nFrom: boss@victim.example", "550 5.6.0 Message has more"),
            (b"From: a@doe.test <boss@victim.example>", "550 5.6.0 Malformed From: header"),
            (b"From: a@sub.doe.test", "550 5.7.1 From: header address a@sub.doe.test"),
        ]:
            lines = s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                           + header + b"\r\n\r\nbody\r\n.\r\n")
            self.assertTrue(lines[-1].startswith(reply), (header, lines))
            self.assertEqual(s.spool.created[-1].state, "aborted")
        lines = s.send(TRANSACTION.replace(b"From: a@doe.test", b'From: "Boss" <A@DOE.test>'))
        self.assertEqual(codes(lines)[-1], 250)

    def test_message_without_from_gets_one_from_the_envelope_sender(self) -> None:
        s = self.s
        s.login()
        for data, stored in [
            (b"Subject: cron\r\nTo: r@example.net\r\n\r\nbody\r\n",
             b"Subject: cron\r\nTo: r@example.net\r\nFrom: a@doe.test\r\n\r\nbody\r\n"),
            (b"\r\nno header at all\r\n", b"From: a@doe.test\r\n\r\nno header at all\r\n"),
            (b"Subject: header only\r\n", b"Subject: header only\r\nFrom: a@doe.test\r\n"),
        ]:
            lines = s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                           + data + b".\r\n")
            self.assertEqual(codes(lines)[-1], 250, lines)
            message = s.spool.created[-1]
            self.assertEqual(message.state, "committed")
            self.assertTrue(bytes(message.data).endswith(b"\r\n" + stored), message.data)
        # A From: that is there but broken is still refused, not replaced.
        lines = s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                       b"From: <>\r\n\r\nbody\r\n.\r\n")
        self.assertTrue(lines[-1].startswith("550 5.6.0 Malformed From: header"), lines)

    def test_size_refusal_wins_over_a_missing_or_bad_from(self) -> None:
        s = Session(self.clock, max_message_size=5000)
        s.login()
        big = b"z" * 900 + b"\r\n"
        for header in [b"Subject: no from", b"From: boss@victim.example", b"From: <>"]:
            s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                   + header + b"\r\n\r\n")  # the header is refused before the size is known
            lines = s.send(big * 10 + b".\r\n")
            self.assertEqual(lines[-1], "552 5.3.4 Message size exceeds fixed limit of 5000 "
                             "bytes", header)
            self.assertEqual(s.spool.created[-1].state, "aborted")

    def test_quoted_local_part_in_the_login_domain_says_why(self) -> None:
        s = self.s
        s.login()
        self.assertEqual(s.send(b'MAIL FROM:<"john smith"@doe.test>\r\n'), [
            '553 5.1.7 Sender address <"john smith"@doe.test>: quoted local parts are not '
            'accepted, send from the plain address'])
        # Elsewhere it is out of scope like any address there.
        self.assertTrue(s.send(b'MAIL FROM:<"x"@victim.example>\r\n')[0].startswith(
            "550 5.7.1 Sender address <\"x\"@victim.example> not allowed for user doe.test"))
        lines = s.send(TRANSACTION.replace(b"From: a@doe.test", b'From: "j s"@doe.test'))
        self.assertEqual(lines[-1], '550 5.6.0 From: header address "j s"@doe.test: quoted '
                         "local parts are not accepted, use the plain address")

    def test_sandboxed_and_priority(self) -> None:
        s = self.s
        s.login("sandbox.test")
        s.send(TRANSACTION.replace(b"doe.test", b"sandbox.test"))
        self.assertTrue(s.spool.committed[0].envelope.sandboxed)
        s2 = Session(self.clock)
        s2.login("john@shop.test")
        s2.send(TRANSACTION.replace(b"a@doe.test", b"john@shop.test"))
        env = s2.spool.committed[0].envelope
        self.assertEqual((env.priority, env.sandboxed, env.bounce_to), (2, False, None))

    def test_recipient_limit(self) -> None:
        s = Session(self.clock, max_recipients=3)
        s.login()
        lines = s.send(b"MAIL FROM:<a@doe.test>\r\n" + b"".join(
            b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(5)))
        self.assertEqual(codes(lines), [250, 250, 250, 250, 452, 452])
        self.assertEqual(lines[-1], "452 4.5.3 Too many recipients")

    def test_messages_per_connection(self) -> None:
        s = Session(self.clock, max_messages_per_connection=2)
        s.login()
        self.assertEqual(codes(s.send(TRANSACTION * 2))[-1], 250)
        self.assertEqual(s.send(b"MAIL FROM:<a@doe.test>\r\n"), [
            "451 4.7.0 Too many messages on this connection, reconnect and retry"])
        self.assertEqual(len(s.spool.committed), 2)

    def test_refused_data_with_pipelined_body_drops_the_connection(self) -> None:
        s = self.s
        s.login()
        lines = s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<bad>\r\nDATA\r\n"
                       b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<x@example.net>\r\nQUIT\r\n")
        self.assertEqual(codes(lines), [250, 501, 554])
        self.assertTrue(s.closed)
        self.assertEqual(s.spool.created, [])

    def test_commit_failures_are_temporary(self) -> None:
        s = self.s
        s.login()
        s.spool.hold = True
        lines = s.send(TRANSACTION + b"NOOP\r\n")
        self.assertEqual(codes(lines), [250, 250, 354])  # nothing until the commit fires
        s.spool.created[0].commit_deferred.errback(OSError(5, "I/O error"))
        self.assertEqual(s.replies(), [
            "451 4.3.0 Local error in processing, try again later", "250 2.0.0 Ok"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        s.send(TRANSACTION)
        s.spool.created[1].commit_deferred.errback(StorageError("no space", full=True))
        self.assertEqual(s.replies(), ["452 4.3.1 Insufficient system storage, try again later"])
        s.send(TRANSACTION)
        s.spool.created[2].commit_deferred.errback(StorageError("rename failed", full=False))
        self.assertEqual(s.replies(), ["451 4.3.0 Local error in processing, try again later"])

    def test_client_vanishing_mid_data_aborts(self) -> None:
        s = self.s
        s.login()
        s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\nFrom: a@doe")
        s.lose()
        self.assertEqual(s.spool.created[0].state, "aborted")
        self.assertEqual(s.realm.logouts, 1)

    def test_ip_authentication(self) -> None:
        portal, checker, realm = make_portal({"192.0.2.50": "webapp"})
        s = Session(self.clock, portal=portal, ip="192.0.2.50")
        s.send(b"EHLO app.test\r\n")
        lines = s.send(TRANSACTION.replace(b"a@doe.test", b"x@other.test"))
        self.assertEqual(codes(lines)[-1], 250)
        message = s.spool.committed[0]
        self.assertEqual(message.envelope.user, "webapp")
        self.assertIn(b"with ESMTP id", bytes(message.data))
        self.assertEqual(codes(s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")), [235])
        other = Session(self.clock, portal=portal, ip="192.0.2.51")
        other.send(b"EHLO app.test\r\n")
        self.assertEqual(codes(other.send(b"MAIL FROM:<x@other.test>\r\n")), [530])

    def test_ip_session_logs_three_lines(self) -> None:
        # Like Postfix: connect, one line per message, disconnect; the login is named by
        # the other two, not logged on its own.
        portal, checker, realm = make_portal({"192.0.2.50": "webapp"})
        with capturedLogs() as events:
            s = Session(self.clock, portal=portal, ip="192.0.2.50")
            s.send(b"EHLO app.test\r\n")
            s.send(TRANSACTION.replace(b"a@doe.test", b"x@other.test") + b"QUIT\r\n")
            s.lose()
        queue_id, session = s.spool.committed[0].id, s.proto.session_id
        size = len(b"From: x@other.test\r\nSubject: s\r\n\r\nbody\r\n")  # unstuffed data
        self.assertEqual([formatEvent(e) for e in events if e["log_namespace"] == SERVER], [
            f"session {session}: connection from 192.0.2.50 tls=False",
            f"accepted {queue_id}: session={session} user=webapp auth=ip "
            f"client_ip=192.0.2.50 sender=x@other.test recipients=1 size={size} tls=False "
            "sandboxed=False",
            f"session {session}: 192.0.2.50 disconnected after 1 messages user=webapp auth=ip "
            "tls=False",
        ])

    def test_password_session_logs_three_lines(self) -> None:
        with capturedLogs() as events:
            s = Session(self.clock)
            s.login()
            s.send(TRANSACTION + b"QUIT\r\n")
            s.lose()
        queue_id, session = s.spool.committed[0].id, s.proto.session_id
        size = len(b"From: a@doe.test\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual([formatEvent(e) for e in events if e["log_namespace"] == SERVER], [
            f"session {session}: connection from 192.0.2.7 tls=False",
            f"accepted {queue_id}: session={session} user=doe.test auth=password "
            f"client_ip=192.0.2.7 sender=a@doe.test recipients=1 size={size} tls=False "
            "sandboxed=False",
            f"session {session}: 192.0.2.7 disconnected after 1 messages user=doe.test "
            "auth=password tls=False",
        ])

    def test_ip_authentication_by_ipv6_network(self) -> None:
        portal, checker, realm = make_portal({"2001:db8:1::/48": "webapp"})
        s = Session(self.clock, portal=portal, ip="2001:db8:1:2::7")
        s.send(b"EHLO app.test\r\n")
        self.assertEqual(codes(s.send(b"MAIL FROM:<x@other.test>\r\n")), [250])
        self.assertEqual(s.proto.avatar.method, "ip")
        other = Session(self.clock, portal=portal, ip="2001:db8:2::7")
        other.send(b"EHLO app.test\r\n")
        self.assertEqual(codes(other.send(b"MAIL FROM:<x@other.test>\r\n")), [530])

    def test_ip_login_keeps_its_scope_and_status(self) -> None:
        portal, checker, realm = make_portal({"192.0.2.50": "webapp", "192.0.2.60": "blocked.test"})
        s = Session(self.clock, portal=portal, ip="192.0.2.50")
        s.send(b"EHLO app.test\r\n")
        self.assertEqual(s.send(b"MAIL FROM:<x@doe.test>\r\n"),
                         ["550 5.7.1 Sender address <x@doe.test> not allowed for user webapp"])
        blocked = Session(self.clock, portal=portal, ip="192.0.2.60")
        blocked.send(b"EHLO app.test\r\n")
        self.assertEqual(blocked.send(b"MAIL FROM:<x@blocked.test>\r\n"),
                         ["550 5.7.1 user blocked.test is blocked"])

    def test_address_authentication(self) -> None:
        portal, checker, realm = make_portal(addresses="alerts@doe.test;printer@shop.test")
        s = Session(self.clock, portal=portal)
        s.send(b"EHLO printer.test\r\n")
        lines = s.send(TRANSACTION.replace(b"a@doe.test", b"Alerts@doe.test"))
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        message = s.spool.committed[0]
        self.assertEqual((message.envelope.user, message.envelope.sender),
                         ("alerts@doe.test", "Alerts@doe.test"))
        self.assertIn(b"with ESMTP id", bytes(message.data))  # no AUTH: not ESMTPA
        self.assertEqual(s.proto.avatar.method, "address")
        # The login vouches for its one address: another listed one logs in afresh ...
        self.assertEqual(codes(s.send(b"MAIL FROM:<printer@shop.test>\r\nRSET\r\n")),
                         [250, 250])
        self.assertEqual(s.proto.avatar.user.username, "printer@shop.test")
        # ... any other sender finds the session unauthenticated, with no notification.
        self.assertEqual(s.send(b"MAIL FROM:<ceo@doe.test>\r\n"),
                         ["530 5.7.0 Authentication required"])
        self.assertIsNone(s.proto.avatar)
        self.assertEqual(codes(s.send(b"MAIL FROM:<>\r\n")), [530])
        self.assertEqual(codes(s.send(b"MAIL FROM:<alerts@doe.test\r\n")), [530])
        # A password login is still possible and then rules.
        self.assertEqual(codes(s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")), [235])
        self.assertEqual(codes(s.send(b"MAIL FROM:<ceo@doe.test>\r\n")), [250])
        self.assertEqual(realm.logins, realm.logouts + 1)

    def test_address_authentication_is_off_without_a_list(self) -> None:
        s = self.s
        s.send(b"EHLO printer.test\r\n")
        self.assertEqual(codes(s.send(b"MAIL FROM:<alerts@doe.test>\r\n")), [530])


@implementer(ISubmissionPolicy)
class RecordingPolicy:
    """Records every hook. ``refuse[name]`` is a Reply the hook raises, or a callable whose
    result it returns (a delay); with ``delay`` every answer comes that much later."""

    def __init__(self, clock, delay: float = 0.0, refuse: dict | None = None) -> None:
        self.clock = clock
        self.delay = delay
        self.refuse = refuse or {}
        self.calls: list[tuple] = []

    def connect(self, client_ip):
        self.calls.append(("connect", client_ip))
        return self.answer("connect", SessionPolicy(self))

    def answer(self, name, value=None):
        refusal = self.refuse.get(name)

        def result():
            if isinstance(refusal, Reply):
                raise refusal
            return refusal() if callable(refusal) else value

        if not self.delay:
            return result()
        return deferLater(self.clock, self.delay, result)


@implementer(ISessionPolicy)
class SessionPolicy:
    def __init__(self, parent: RecordingPolicy) -> None:
        self.parent = parent

    def _call(self, name, *shown):
        self.parent.calls.append((name, *shown))
        return self.parent.answer(name)

    def authAttempt(self, username):
        return self._call("authAttempt", username)

    def authFailed(self, username):
        return self._call("authFailed", username)

    def authSucceeded(self, avatar):
        return self._call("authSucceeded", avatar.user.username)

    def mailFrom(self, avatar, sender):
        return self._call("mailFrom", sender)

    def senderRefused(self, avatar, address, header):
        return self._call("senderRefused", address, header)

    def rcptTo(self, avatar, recipient, count):
        return self._call("rcptTo", recipient, count)

    def data(self, avatar, envelope):
        return self._call("data", envelope.id)

    def holding(self):  # a question, not a step: not recorded
        return None

    def accepted(self, avatar, envelope):
        return self._call("accepted", envelope.id)

    def reset(self):
        return self._call("reset")

    def disconnect(self):
        return self._call("disconnect")


class PolicyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def session(self, **kw) -> tuple[Session, RecordingPolicy]:
        policy = RecordingPolicy(self.clock, **kw)
        return Session(self.clock, policy=policy), policy

    def test_hooks_in_order(self) -> None:
        s, policy = self.session()
        s.send(b"EHLO c.test\r\nAUTH PLAIN " + plain("doe.test", "bad") + b"\r\n")
        s.login()
        lines = s.send(b"MAIL FROM:<x@evil.example>\r\n" + TRANSACTION +
                       b"MAIL FROM:<a@doe.test>\r\nRSET\r\n")
        self.assertEqual(codes(lines), [550, 250, 250, 354, 250, 250, 250])
        s.lose()
        queue_id = s.spool.created[0].id
        self.assertEqual(policy.calls, [
            ("connect", "192.0.2.7"),
            ("authAttempt", "doe.test"), ("authFailed", "doe.test"),
            ("authAttempt", "doe.test"), ("authSucceeded", "doe.test"),
            ("senderRefused", "x@evil.example", False),
            ("mailFrom", "a@doe.test"), ("rcptTo", "r@example.net", 0),
            ("data", queue_id), ("accepted", queue_id),
            ("mailFrom", "a@doe.test"), ("reset",),
            ("disconnect",),
        ])

    def test_header_refusal_notifies_and_resets(self) -> None:
        s, policy = self.session()
        s.login()
        s.send(TRANSACTION.replace(b"From: a@doe.test", b"From: ceo@victim.example"))
        self.assertIn(("senderRefused", "ceo@victim.example", True), policy.calls)
        self.assertEqual(policy.calls[-1], ("reset",))

    def test_refused_connection(self) -> None:
        s, policy = self.session(refuse={"connect": Reply(421, "4.7.0", "too many")})
        self.assertEqual(s.replies(), ["421 4.7.0 too many"])
        self.assertTrue(s.closed)

    def test_pipelined_transaction_waits_for_each_deferred(self) -> None:
        s, policy = self.session(delay=1.0)
        self.clock.advance(1)  # the greeting waits for connect()
        s.send(b"EHLO c.test\r\n")
        s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")
        self.clock.advance(1)  # authAttempt
        self.clock.advance(1)  # authSucceeded
        s.replies()
        data = (b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r1@example.net>\r\n"
                b"RCPT TO:<r2@example.net>\r\nDATA\r\nFrom: a@doe.test\r\n\r\n"
                b"MAIL FROM:<ceo@victim.example>\r\nQUIT\r\n.\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(s.send(data), [])  # mailFrom is pending: nothing else ran
        self.assertEqual(s.proto.pending, len(data) - len(b"MAIL FROM:<a@doe.test>\r\n"))
        for _ in range(5):
            self.clock.advance(1)
        lines = s.replies()
        self.assertEqual(codes(lines), [250, 250, 250, 354, 250, 250, 221])
        self.assertIn(b"\r\nMAIL FROM:<ceo@victim.example>\r\nQUIT\r\n",
                      bytes(s.spool.committed[0].data))

    def test_replies_to_a_pipelined_group_leave_in_one_write(self) -> None:
        s = Session(self.clock)
        s.login()
        writes: list[bytes] = []
        s.transport.write = writes.append
        s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r1@example.net>\r\n"
               b"RCPT TO:<r2@example.net>\r\nDATA\r\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual(codes(writes[0].decode().splitlines()), [250, 250, 250, 354])
        s.send(b"From: a@doe.test\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual([codes(w.decode().splitlines()) for w in writes[1:]],
                         [[250], [250, 221]])  # the 250 as soon as committed

    def test_auth_delays_and_blocks(self) -> None:
        s, policy = self.session(refuse={"authAttempt": lambda: 5, "authFailed": lambda: 2})
        s.send(b"EHLO c.test\r\n")
        self.assertEqual(s.send(b"AUTH PLAIN " + plain("doe.test", "bad") + b"\r\n"), [])
        self.clock.advance(5)
        self.assertEqual(s.replies(), [])
        self.clock.advance(2)
        self.assertEqual(codes(s.replies()), [535])
        s2, _ = self.session(refuse={"authAttempt": Reply(421, "4.7.0", "blocked")})
        s2.send(b"EHLO c.test\r\n")
        self.assertEqual(s2.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")[-1],
                         "421 4.7.0 blocked")
        self.assertTrue(s2.closed)
        self.assertEqual(s2.checker.seen, [])

    def test_login_refused_by_policy_stays_unauthenticated(self) -> None:
        s, policy = self.session(refuse={"authSucceeded": Reply(454, "4.7.0", "busy")})
        s.send(b"EHLO c.test\r\n")
        self.assertEqual(s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n"),
                         ["454 4.7.0 busy"])
        self.assertEqual(codes(s.send(b"MAIL FROM:<a@doe.test>\r\n")), [530])
        self.assertEqual(s.realm.logouts, 1)

    def test_policy_refusals_at_each_step(self) -> None:
        for step, count in [("mailFrom", 1), ("rcptTo", 2), ("data", 4)]:
            s, policy = self.session(refuse={step: Reply(451, "4.7.1", "rate limit")})
            s.login()
            lines = s.send(TRANSACTION)
            self.assertEqual(lines[count - 1], "451 4.7.1 rate limit", step)
            self.assertEqual(s.spool.committed, [])

    def test_factory_checks_its_collaborators(self) -> None:
        verifyObject(ISubmissionPolicy, RecordingPolicy(self.clock))
        verifyObject(ISessionPolicy, SessionPolicy(RecordingPolicy(self.clock)))
        portal = make_portal()[0]
        with self.assertRaises(TypeError):
            SubmissionFactory(portal, object(), HOST, None, "none", True)
        with self.assertRaises(TypeError):
            SubmissionFactory(portal, MemorySpool(), HOST, None, "none", True, policy=object())
        with self.assertRaises(ValueError):
            SubmissionFactory(portal, MemorySpool(), HOST, None, "starttls", False)
        with self.assertRaises(ValueError):
            SubmissionFactory(portal, MemorySpool(), HOST, None, "tls", False)


class TimeoutTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_idle_timeout(self) -> None:
        s = Session(self.clock, idle_timeout=300)
        s.replies()
        self.clock.advance(299)
        self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        for _ in range(2):  # a partial line is not activity
            self.clock.advance(100)
            self.assertEqual(s.send(b"N"), [])
        self.clock.advance(100)
        self.assertEqual(s.replies(), [f"421 4.4.2 {HOST} Error: timeout exceeded"])
        self.assertTrue(s.closed)

    def test_data_idle_and_total_timeouts(self) -> None:
        s = Session(self.clock, idle_timeout=300, data_timeout=600)
        s.login()
        s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        for _ in range(2):  # slow drip: a byte every 250 s keeps it idle-alive
            self.clock.advance(250)
            s.send(b"x")
        self.assertFalse(s.closed)
        self.clock.advance(100)
        self.assertEqual(s.replies(), [f"421 4.4.2 {HOST} Error: DATA timeout exceeded"])
        self.assertTrue(s.closed)
        s.lose()
        self.assertEqual(s.spool.created[0].state, "aborted")
        s2 = Session(self.clock, idle_timeout=300, data_timeout=600)
        s2.login()
        s2.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\nFrom: a")
        self.clock.advance(300)
        self.assertEqual(codes(s2.replies()), [421])
        s2.lose()
        self.assertEqual(s2.spool.created[0].state, "aborted")

    def test_session_timeout_counts_time_outside_transactions(self) -> None:
        s = Session(self.clock, idle_timeout=300, session_timeout=1000)
        s.login()
        for _ in range(4):  # a NOOP now and then keeps it idle-alive ...
            self.clock.advance(200)
            self.assertEqual(codes(s.send(b"NOOP\r\n")), [250])
        # ... the time inside a transaction does not count ...
        self.assertEqual(codes(s.send(b"MAIL FROM:<a@doe.test>\r\n")), [250])
        for _ in range(3):
            self.clock.advance(250)
            self.assertEqual(codes(s.send(b"RCPT TO:<r@example.net>\r\n")), [250])
        self.assertEqual(codes(s.send(b"DATA\r\n")), [354])
        self.clock.advance(250)
        self.assertEqual(codes(s.send(b"From: a@doe.test\r\n\r\nbody\r\n.\r\n")), [250])
        # ... and what is left of the 1000 s outside them runs out later.
        self.clock.advance(199)
        self.assertEqual(codes(s.send(b"NOOP\r\n")), [250])
        self.clock.advance(1)
        self.assertEqual(s.replies(), [f"421 4.4.2 {HOST} Error: session timeout exceeded"])
        self.assertTrue(s.closed)
        self.assertEqual(len(s.spool.committed), 1)

    def test_session_timeout_never_cuts_off_a_message(self) -> None:
        s = Session(self.clock, idle_timeout=300, session_timeout=600)
        s.login()
        self.clock.advance(299)
        s.send(b"NOOP\r\n")
        self.clock.advance(299)
        s.spool.hold = True
        lines = s.send(TRANSACTION)  # at 598 s, and its commit takes long
        self.clock.advance(1000)
        self.assertFalse(s.closed)
        s.spool.created[0].commit_deferred.callback(s.spool.created[0].id)
        self.assertEqual(codes(lines + s.replies()), [250, 250, 354, 250])
        self.clock.advance(2)
        self.assertEqual(codes(s.replies()), [421])
        self.assertEqual(s.spool.created[0].state, "committed")

    def test_session_timeout_looks_again_when_time_went_to_a_transaction(self) -> None:
        s = Session(self.clock, idle_timeout=300, session_timeout=600)
        s.login()
        self.clock.advance(100)
        s.send(b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        self.clock.advance(250)
        s.send(b"From: a@doe.test\r\n\r\nbody\r\n.\r\n")  # 250 s inside, at 350 s
        s.replies()
        self.clock.advance(250)  # at 600 s, only 350 s were spent outside
        self.assertEqual(codes(s.send(b"NOOP\r\n")), [250])
        self.clock.advance(249)
        self.assertEqual(s.replies(), [])
        self.clock.advance(1)
        self.assertEqual(s.replies(), [f"421 4.4.2 {HOST} Error: session timeout exceeded"])

    def test_session_timeout_waits_for_a_command_in_progress(self) -> None:
        policy = RecordingPolicy(self.clock, refuse={"authAttempt": lambda: 10})
        s = Session(self.clock, idle_timeout=900, session_timeout=600, policy=policy)
        s.send(b"EHLO c.test\r\n")
        self.clock.advance(595)
        s.send(b"AUTH PLAIN " + plain("doe.test") + b"\r\n")  # answered after 10 s
        self.clock.advance(6)
        self.assertFalse(s.closed)
        self.clock.advance(4)
        self.assertEqual(codes(s.replies()), [235, 421])
        self.assertTrue(s.closed)

    def test_session_timeout_off(self) -> None:
        s = Session(self.clock, idle_timeout=300, session_timeout=0)
        s.replies()
        for _ in range(30):
            self.clock.advance(200)
            self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_repeated_recipient_counts_as_junk(self) -> None:
        s = Session(self.clock)
        s.login()
        lines = s.send(b"MAIL FROM:<a@doe.test>\r\n" + b"RCPT TO:<r@example.net>\r\n" * 102)
        self.assertEqual(codes(lines), [250] * 101 + [421])
        self.assertTrue(s.closed)

    def test_no_timeout_while_committing(self) -> None:
        s = Session(self.clock, idle_timeout=300)
        s.login()
        s.spool.hold = True
        s.send(TRANSACTION)
        self.clock.advance(1000)
        self.assertFalse(s.closed)
        # A client waiting for its reply sends nothing: reading goes on, nothing paused.
        self.assertEqual(s.transport.producerState, "producing")
        s.spool.created[0].commit_deferred.callback(s.spool.created[0].id)
        self.assertEqual(codes(s.replies()), [250])
        self.clock.advance(299)
        self.assertFalse(s.closed)  # the idle time counts from the reply
        self.clock.advance(1)
        self.assertTrue(s.closed)

    def test_input_during_a_commit_waits_in_a_paused_transport(self) -> None:
        s = Session(self.clock)
        s.login()
        s.spool.hold = True
        s.send(TRANSACTION)
        self.assertEqual(s.send(b"NOOP\r\n"), [])
        self.assertEqual(s.transport.producerState, "paused")
        s.spool.created[0].commit_deferred.callback(s.spool.created[0].id)
        self.assertEqual(codes(s.replies()), [250, 250])
        self.assertEqual(s.transport.producerState, "producing")
