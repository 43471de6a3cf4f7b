"""STARTTLS, implicit TLS and AUTH over real loopback sockets with real certificates."""

from __future__ import annotations

import smtplib

from test_smtp_support import (
    PASSWORD,
    LineClient,
    LoopbackCase,
    b64,
    message,
    plain,
    tls_files,
)
from twisted.internet import defer
from twisted.internet.threads import deferToThread


def features(client: smtplib.SMTP) -> set[str]:
    return set(client.esmtp_features)


def try_starttls_then_send(c: smtplib.SMTP, login: str, sender: str):
    """EHLO, then STARTTLS (which these listeners refuse), then log in and send one message;
    the extensions offered and the reply to STARTTLS."""
    c.ehlo()
    ext = features(c)
    starttls = c.docmd("STARTTLS")
    c.login(login, PASSWORD)
    c.sendmail(sender, ["r@example.net"], message(sender))
    return ext, starttls


class StartTLSTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_ehlo_before_and_after_starttls(self):
        port = self.listen("starttls")

        def talk():
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                              timeout=20) as c:
                c.ehlo()
                before = features(c), c.docmd("AUTH", "PLAIN " + plain("doe.test").decode())
                c.starttls(context=tls_files().client)
                c.ehlo()
                after = features(c), c.esmtp_features["auth"]
                c.login("doe.test", PASSWORD)
                c.sendmail("a@doe.test", ["r@example.net"], message("a@doe.test"))
                return before, after

        (before_ext, auth_reply), (after_ext, mechanisms) = yield deferToThread(talk)
        self.assertIn("starttls", before_ext)
        self.assertNotIn("auth", before_ext)
        self.assertEqual(
            auth_reply,
            (538, b"5.7.11 Encryption required for requested authentication mechanism"),
        )
        self.assertNotIn("starttls", after_ext)
        self.assertEqual(mechanisms.split(), ["PLAIN", "LOGIN"])
        for name in ("size", "pipelining", "8bitmime", "enhancedstatuscodes"):
            self.assertIn(name, before_ext)
            self.assertIn(name, after_ext)
        self.assertEqual(self.checker.seen, [("doe.test", "127.0.0.1", True)])
        queued = self.files("queue")
        self.assertEqual(len(queued), 1)
        self.assertIn(b"with ESMTPSA id " + queued[0].encode(), self.body(queued[0]))

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        port = self.listen("implicit")

        def talk():
            with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test",
                                  context=tls_files().client, timeout=20) as c:
                return try_starttls_then_send(c, "john@shop.test", "john@shop.test")

        ext, starttls = yield deferToThread(talk)
        self.assertIn("auth", ext)
        self.assertNotIn("starttls", ext)
        self.assertEqual(starttls, (503, b"5.5.1 TLS already active"))
        queued = self.files("queue")
        self.assertEqual(len(queued), 1)
        self.assertTrue(self.spool.envelope(queued[0]).tls)

    @defer.inlineCallbacks
    def test_plain_listener_without_tls(self):
        port = self.listen("none", plaintext_auth=True)

        def talk():
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                              timeout=20) as c:
                return try_starttls_then_send(c, "doe.test", "a@doe.test")

        ext, starttls = yield deferToThread(talk)
        self.assertIn("auth", ext)
        self.assertNotIn("starttls", ext)
        self.assertEqual(starttls, (502, b"5.5.1 STARTTLS not available on this port"))
        queued = self.files("queue")
        self.assertIn(b"with ESMTPA id", self.body(queued[0]))
        self.assertFalse(self.spool.envelope(queued[0]).tls)

    @defer.inlineCallbacks
    def test_starttls_arguments_and_repeat(self):
        port = self.listen("starttls")

        def talk():
            c = LineClient(port)
            c.cmd("EHLO client.test")
            args = c.cmd("STARTTLS now")
            c.starttls()
            c.cmd("EHLO client.test")
            again = c.cmd("STARTTLS")
            c.close()
            return args, again

        args, again = yield deferToThread(talk)
        self.assertEqual(args, (501, ["5.5.4 Syntax: STARTTLS"]))
        self.assertEqual(again, (503, ["5.5.1 TLS already active"]))

    @defer.inlineCallbacks
    def test_starttls_needs_ehlo_first(self):
        # RFC 3207 has the client send EHLO first; Postfix answers as here.
        port = self.listen("starttls")

        def talk():
            c = LineClient(port)
            early = c.cmd("STARTTLS")
            c.cmd("HELO client.test")
            c.starttls()  # after HELO, as Postfix allows
            ehlo = c.cmd("EHLO client.test")[0]
            c.close()
            return early, ehlo

        early, ehlo = yield deferToThread(talk)
        self.assertEqual(early, (503, ["5.5.1 Error: send HELO/EHLO first"]))
        self.assertEqual(ehlo, 250)


class NoDelayTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_every_listener_kind_sets_tcp_nodelay(self):
        # Nagle plus the client's delayed ACK would hold back replies (40 ms each).
        for mode in ("none", "starttls", "implicit"):
            port = self.listen(mode, plaintext_auth=True)

            def talk(port=port, mode=mode):
                c = LineClient(port, implicit_tls=mode == "implicit")
                c.cmd("EHLO client.test")
                if mode == "starttls":
                    c.starttls()
                    c.cmd("EHLO client.test")
                return c

            client = yield deferToThread(talk)
            session = self.factories[-1].sessions[0]
            self.assertTrue(session.transport.getTcpNoDelay(), mode)
            client.close()


class InjectionTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_command_pipelined_after_starttls_is_never_run(self):
        port = self.listen("starttls", plaintext_auth=True)

        def talk(tail: bytes):
            c = LineClient(port, timeout=5)
            c.cmd("EHLO client.test")
            assert c.cmd(b"AUTH PLAIN " + plain("doe.test"))[0] == 235
            c.send(b"STARTTLS\r\n" + tail)
            reply = c.reply()
            closed = c.eof()
            c.close()
            return reply, closed

        for tail in (b"MAIL FROM:<a@doe.test>\r\n", b"MAIL FROM:<a@doe", b"\r\n"):
            reply, closed = yield deferToThread(talk, tail)
            self.assertIsNone(reply, tail)  # no 220, no 250: the connection is dropped
            self.assertTrue(closed, tail)
        self.assertEqual(self.files("tmp") + self.files("queue"), [])

    @defer.inlineCallbacks
    def test_state_is_reset_after_starttls(self):
        port = self.listen("starttls", plaintext_auth=True)

        def talk():
            c = LineClient(port)
            c.cmd("EHLO client.test")
            steps = [c.cmd(b"AUTH PLAIN " + plain("doe.test"))[0],
                     c.cmd("MAIL FROM:<a@doe.test>")[0]]
            c.starttls()
            for line in ["RCPT TO:<r@example.net>", "MAIL FROM:<a@doe.test>",
                         "EHLO client.test", "MAIL FROM:<a@doe.test>"]:
                steps.append(c.cmd(line)[0])
            steps.append(c.cmd(b"AUTH PLAIN " + plain("doe.test"))[0])
            steps.append(c.cmd("MAIL FROM:<a@doe.test>")[0])
            c.cmd("QUIT")
            c.close()
            return steps

        steps = yield deferToThread(talk)
        # AUTH, MAIL in plaintext; then RCPT: no login; MAIL: no EHLO; EHLO; MAIL: no
        # login; AUTH again inside TLS; MAIL.
        self.assertEqual(steps, [235, 250, 530, 503, 250, 530, 235, 250])
        self.assertTrue((yield self.sessions_ended()))
        self.assertEqual(self.realm.logouts, 2)  # at STARTTLS, and at the end
        self.assertEqual(self.checker.seen, [("doe.test", "127.0.0.1", False),
                                             ("doe.test", "127.0.0.1", True)])


class AuthTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_plain_and_login_good_and_bad(self):
        port = self.listen("starttls")

        def attempt(username, password, mechanism):
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                              timeout=20) as c:
                c.starttls(context=tls_files().client)
                c.ehlo()
                c.user, c.password = username, password
                try:
                    return c.auth(mechanism, getattr(c, "auth_" + mechanism.lower()),
                                  initial_response_ok=mechanism == "PLAIN")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error

        results = {}
        for mechanism in ("PLAIN", "LOGIN"):
            for username, password in [("doe.test", PASSWORD), ("doe.test", "wrong"),
                                       ("nobody.test", PASSWORD), ("webapp", PASSWORD)]:
                results[mechanism, username, password] = yield deferToThread(
                    attempt, username, password, mechanism)
        invalid = (535, b"5.7.8 Authentication credentials invalid")
        for mechanism in ("PLAIN", "LOGIN"):
            self.assertEqual(results[mechanism, "doe.test", PASSWORD][0], 235)
            self.assertEqual(results[mechanism, "webapp", PASSWORD][0], 235)
            self.assertEqual(results[mechanism, "doe.test", "wrong"], invalid)
            self.assertEqual(results[mechanism, "nobody.test", PASSWORD], invalid)

    @defer.inlineCallbacks
    def test_malformed_auth_over_tls_never_drops(self):
        port = self.listen("implicit")

        def talk():
            c = LineClient(port, implicit_tls=True)
            c.cmd("EHLO client.test")
            out = [c.cmd(line)[0] for line in [
                b"AUTH", b"AUTH PLAIN =", b"AUTH PLAIN AGFsaWNl", b"AUTH PLAIN AGFs!*~aWNl$",
                b"AUTH CRAM-MD5", b"AUTH PLAIN " + plain("doe.test", authzid="john@shop.test"),
            ]]
            out.append(c.cmd(b"AUTH LOGIN")[0])
            out.append(c.cmd(b64("doe.test"))[0])
            out.append(c.cmd(b"%%%")[0])
            out.append(c.cmd(b"AUTH PLAIN " + plain("doe.test"))[0])
            c.close()
            return out

        out = yield deferToThread(talk)
        self.assertEqual(out, [501, 501, 501, 501, 504, 535, 334, 334, 501, 235])
        self.assertEqual(self.checker.seen, [("doe.test", "127.0.0.1", True)])

    @defer.inlineCallbacks
    def test_unauthenticated_relay_refused(self):
        port = self.listen("implicit")

        def talk():
            c = LineClient(port, implicit_tls=True)
            c.cmd("EHLO client.test")
            out = [c.cmd("RCPT TO:<victim@example.net>"), c.cmd("MAIL FROM:<a@doe.test>"),
                   c.cmd("RCPT TO:<victim@example.net>"), c.cmd("DATA")]
            c.close()
            return out

        out = yield deferToThread(talk)
        self.assertEqual([r[0] for r in out], [530, 530, 530, 530])
        self.assertEqual(out[0][1], ["5.7.0 Authentication required"])
        self.assertEqual(self.files("tmp") + self.files("queue"), [])

