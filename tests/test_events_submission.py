"""What the submission session reports (mailrelay/events.py): each message kept
(message.processed) and each refusal of a logged-in client's MAIL, RCPT, DATA or BDAT
(message.rejected, with the reply), over loopback TLS into the real spool."""

from __future__ import annotations

import smtplib

from event_list import EventList
from test_smtp_support import PASSWORD, LineClient, LoopbackCase, message, plain, tls_files
from twisted.internet import defer
from twisted.internet.threads import deferToThread


def submit(port: int, recipients: list[str]) -> tuple[int, str]:
    with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test",
                          context=tls_files().client, timeout=20) as c:
        c.login("doe.test", PASSWORD)
        c.mail("a@doe.test")
        for rcpt in recipients:
            c.rcpt(rcpt)
        code, text = c.data(message("a@doe.test", recipients[0]))
        return code, text.decode()


def refusals(port: int) -> list:
    """A client refused before it logs in (reported nowhere), then at MAIL, RCPT, the end
    of DATA and the last BDAT chunk; the code of each reply."""
    c = LineClient(port, implicit_tls=True)
    out = [c.cmd("EHLO client.test")[0], c.cmd("MAIL FROM:<a@doe.test>")[0],
           c.cmd(b"AUTH PLAIN " + plain("doe.test", "wrong"))[0],
           c.cmd(b"AUTH PLAIN " + plain("doe.test"))[0]]
    out += [c.cmd("MAIL FROM:<boss@other.test>")[0], c.cmd("MAIL FROM:<a@doe.test>")[0],
            c.cmd("RCPT TO:<r1@example.net>")[0], c.cmd("RCPT TO:<r2@example.net>")[0],
            c.cmd("DATA")[0]]
    c.send(b"From: ceo@victim.example\r\n\r\nhello\r\n.\r\n")
    out.append(c.reply()[0])
    out += [c.cmd("MAIL FROM:<b@doe.test>")[0], c.cmd("RCPT TO:<r3@example.net>")[0]]
    chunk = b"From: ceo@victim.example\r\n\r\nhello\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    out.append(c.reply()[0])
    out.append(c.cmd("QUIT")[0])
    c.close()
    return out


class SubmissionEventTests(LoopbackCase):
    @defer.inlineCallbacks
    def test_processed_once_the_message_is_kept(self):
        events = EventList()
        port = self.listen("implicit")
        self.factories[-1].events = events  # as service.py gives it
        code, text = yield deferToThread(submit, port, ["r1@example.net", "r2@example.net"])
        self.assertEqual(code, 250, text)
        queue_id = text.rsplit(" ", 1)[1]
        self.assertEqual(self.files("queue"), [queue_id])
        [(kind, account, user, data)] = events
        self.assertEqual((kind, account, user), ("message.processed", "default", "doe.test"))
        self.assertEqual(data, {"size": len(message("a@doe.test", "r1@example.net")),
                                "queue_id": queue_id, "sender": "a@doe.test",
                                "recipients": ["r1@example.net", "r2@example.net"],
                                "auth_method": "password", "client_ip": "127.0.0.1",
                                "tls": True, "sandboxed": False})
        # Delivery's events name how it was submitted: the spool keeps it.
        self.assertEqual(self.spool.envelope(queue_id).auth_method, "password")

    @defer.inlineCallbacks
    def test_rejected_with_the_reply_at_each_stage(self):
        events = EventList()
        port = self.listen("implicit", max_recipients=1)
        self.factories[-1].events = events
        codes = yield deferToThread(refusals, port)
        self.assertEqual(codes, [250, 530, 535, 235, 550, 250, 250, 452, 354, 550, 250, 250,
                                 550, 221])
        self.assertEqual(self.files("queue"), [])
        common = {"auth_method": "password", "client_ip": "127.0.0.1"}
        self.assertEqual(events.of("message.rejected"), [
            ("default", "doe.test", {
                "stage": "MAIL", "sender": "boss@other.test", **common,
                "reply": {"code": 550, "status": "5.7.1", "text": "Sender address "
                          "<boss@other.test> not allowed for user doe.test"}}),
            ("default", "doe.test", {
                "stage": "RCPT", "sender": "a@doe.test", "recipient": "r2@example.net",
                **common,
                "reply": {"code": 452, "status": "4.5.3", "text": "Too many recipients"}}),
            ("default", "doe.test", {
                "stage": "DATA", "sender": "a@doe.test", "recipients": ["r1@example.net"],
                **common,
                "reply": {"code": 550, "status": "5.7.1", "text": "From: header address "
                          "ceo@victim.example not allowed for user doe.test"}}),
            ("default", "doe.test", {
                "stage": "BDAT", "sender": "b@doe.test", "recipients": ["r3@example.net"],
                **common,
                "reply": {"code": 550, "status": "5.7.1", "text": "From: header address "
                          "ceo@victim.example not allowed for user doe.test"}}),
        ])
        self.assertEqual(len(events), 4)  # nothing accepted, nothing else reported
