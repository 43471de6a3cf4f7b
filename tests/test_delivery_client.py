"""The outbound ESMTP client against real SMTP servers on loopback."""

from __future__ import annotations

import io
import random
import socket

import certs
from harness import TempPaths
from smtp_sink import SMTPSink
from twisted.internet import defer, protocol, reactor, task
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from mailrelay.delivery.client import SMALL_BODY, Courier, Job
from mailrelay.delivery.router import Hop
from mailrelay.delivery.wire import DotStuffer, address_problem, stuff

CHUNK = 2**14  # twisted.protocols.basic.FileSender.CHUNK_SIZE


def unstuff(wire: bytes) -> tuple[bytes, bytes]:
    """What a strict receiver makes of DATA: (the message, what follows the terminator)."""
    lines, rest = [], wire
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "no terminator"
        if line == b".":
            return b"".join(lines), rest
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


class DotStufferTests(unittest.TestCase):
    def test_first_line_dot_and_boundaries(self):
        body = b".\r\n..\r\nx\r\n.\r\n"
        self.assertEqual(stuff(body), b"..\r\n...\r\nx\r\n..\r\n.\r\n")

    def test_any_chunking_gives_the_same_wire(self):
        rng = random.Random(3)
        for _ in range(300):
            body = bytes(rng.choice(b".\r\nab") for _ in range(rng.randrange(0, 40)))
            whole = stuff(body)
            stuffer, out, i = DotStuffer(), b"", 0
            while i < len(body):
                n = rng.randrange(1, 6)
                out += stuffer.feed(body[i:i + n])
                i += n
            out += stuffer.end()
            self.assertEqual(out, whole, body)
            message, after = unstuff(whole)
            self.assertEqual(after, b"")
            # bare CR and LF became CRLF; nothing else changed
            normalized = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n",
                                                                                  b"\r\n")
            if normalized and not normalized.endswith(b"\r\n"):
                normalized += b"\r\n"
            self.assertEqual(message, normalized)

    def test_bare_cr_dot_cannot_end_data(self):
        self.assertEqual(stuff(b"a\r.\rb\r\n"), b"a\r\n..\r\nb\r\n.\r\n")

    def test_addresses_with_controls_refused(self):
        self.assertIsNone(address_problem("a@b.test"))
        self.assertIsNone(address_problem(""))
        for bad in ("a\r\nRCPT TO:<x@evil>@b", "a\n@b", "a\x00@b", "a>@b", "a\x7f@b"):
            self.assertIsNotNone(address_problem(bad), bad)


def job(queue_id: str, recipients: list[str], body: bytes, sender: str = "s@a.test") -> Job:
    return Job(queue_id, sender, recipients, lambda: io.BytesIO(body))


class Run:
    """One Courier.send over a list of jobs, collecting the reports."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = iter(jobs)
        self.reports: dict[str, dict[str, tuple[int, str, bool]]] = {}

    def next_job(self):
        return next(self.jobs, None)

    def report(self, job: Job, results) -> None:
        assert job.queue_id not in self.reports, "reported twice"
        self.reports[job.queue_id] = {r.recipient: (r.code, r.text, r.tls) for r in results}

    def send(self, hops: list[Hop], courier: Courier | None = None):
        courier = courier or Courier(reactor, "relay.test", connect_timeout=5,
                                     command_timeout=10)
        return courier.send(hops, self.next_job, self.report)


class Scripted(LineReceiver):
    """A misbehaving server: replies from ``script`` by command verb (250 by default, None
    to close the connection instead; the reply to the end of data is ``script[b"."]``,
    none without it; the greeting is ``script[b"GREETING"]``, 220 by default).

    It records the commands (``factory.commands``) and each DATA's lines as they came
    (``factory.data``, still dot-stuffed). With ``factory.batch`` it holds its replies to
    MAIL and RCPT until DATA arrives, which only a pipelining client lives through; with
    ``factory.delay`` every reply waits that long, and a line that arrives meanwhile is
    recorded in ``factory.early``.
    """

    in_data = False

    def connectionMade(self):
        self.held: list[bytes] = []
        self.pending: list = []  # delayed replies not yet sent
        self.transport.write(self.factory.script.get(b"GREETING", b"220 scripted ESMTP\r\n"))

    def connectionLost(self, reason):
        for call in self.pending:
            if call.active():
                call.cancel()
        if not self.factory.closed.called:
            self.factory.closed.callback(None)

    def lineReceived(self, line):
        f = self.factory
        if any(call.active() for call in self.pending):
            f.early.append(line)
        if self.in_data:
            self.in_data = line != b"."
            if self.in_data:
                f.data[-1] += line + b"\r\n"
            elif f.script.get(b".", b"") is None:
                self.transport.loseConnection()
            elif b"." in f.script:  # a reply to the data
                self.reply(f.script[b"."])
            return
        f.commands.append(line)
        verb = line.split(b" ", 1)[0].upper()
        reply = f.script.get(verb, b"250 ok\r\n")
        if reply is None:
            self.transport.loseConnection()
        elif f.batch and verb in (b"MAIL", b"RCPT"):
            self.held.append(reply)
        else:
            self.in_data = verb == b"DATA" and reply.startswith(b"354")
            if self.in_data:
                f.data.append(b"")
            reply, self.held = b"".join(self.held) + reply, []
            self.reply(reply)

    def reply(self, data: bytes) -> None:
        if self.factory.delay:
            self.pending.append(reactor.callLater(self.factory.delay, self.transport.write,
                                                  data))
        else:
            self.transport.write(data)


class ClientTests(TempPaths, unittest.TestCase):
    def sink(self, **kw) -> tuple[SMTPSink, Hop]:
        sink = SMTPSink(**kw)
        port = sink.listen()
        self.addCleanup(sink.stop)
        return sink, Hop("127.0.0.1", port, tls=kw.pop("hop_tls", "opportunistic"),
                         address="127.0.0.1")

    def scripted(self, script: dict[bytes, bytes | None], batch: bool = False,
                 delay: float = 0.0) -> Hop:
        """A Scripted server, as ``self.server``; ``self.closed`` fires when its (first)
        connection ends."""
        factory = self.server = protocol.ServerFactory.forProtocol(Scripted)
        factory.script = script
        factory.batch, factory.delay = batch, delay
        factory.commands, factory.data, factory.early = [], [], []
        factory.closed = self.closed = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return Hop("127.0.0.1", port.getHost().port, address="127.0.0.1")

    @defer.inlineCallbacks
    def check_smuggling_body(self, pipelining: bool, streamed: bool):
        """Dot lines first, at a 16 KiB chunk boundary and before a smuggled transaction
        arrive as one message, in one write (small) or streamed from the file (large)."""
        sink, hop = self.sink(pipelining=pipelining)
        head = b".\r\nSubject: dots\r\n\r\n"
        filler = b"x" * (CHUNK - len(head) - 2) + b"\r\n"  # the "\n" is the chunk's last byte
        smuggled = (b".\r\nMAIL FROM:<ceo@victim.test>\r\nRCPT TO:<x@victim.test>\r\nDATA\r\n"
                    b"SMUGGLED\r\n")
        tail = (b"y" * 998 + b"\r\n") * (4 * CHUNK // 1000 if streamed else 1)
        body = head + filler + smuggled + tail + b".\r\n..\r\nend\r\n"
        self.assertEqual(body[CHUNK - 1:CHUNK + 1], b"\n.")
        self.assertEqual(len(body) > SMALL_BODY, streamed)
        bare_cr = b"a\r.\rMAIL FROM:<x@victim.test>\r\n"  # goes out as CRLF line ends
        run = Run([job("q1", ["r@b.test"], body),
                   job("q2", ["r@b.test", "s@b.test"], b".\r\n" + bare_cr + b".")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 2)
        self.assertEqual(run.reports["q1"]["r@b.test"][0], 250)
        self.assertEqual([v[0] for v in run.reports["q2"].values()], [250, 250])
        self.assertEqual(sink.transactions, 2)
        self.assertEqual([m.data for m in sink.messages],
                         [body, b".\r\na\r\n.\r\nMAIL FROM:<x@victim.test>\r\n.\r\n"])
        self.assertEqual(sink.connections, 1)

    def test_smuggling_body_in_one_write(self):
        return self.check_smuggling_body(pipelining=False, streamed=False)

    def test_smuggling_body_in_one_write_pipelined(self):
        return self.check_smuggling_body(pipelining=True, streamed=False)

    def test_smuggling_body_streamed(self):
        return self.check_smuggling_body(pipelining=False, streamed=True)

    def test_smuggling_body_streamed_pipelined(self):
        return self.check_smuggling_body(pipelining=True, streamed=True)

    @defer.inlineCallbacks
    def test_pipelining_sends_the_group_at_once(self):
        """A server that answers MAIL and RCPT only once it has DATA: the group went out
        without waiting, and each reply is matched to its command."""
        hop = self.scripted({b"EHLO": b"250-scripted\r\n250 PIPELINING\r\n",
                             b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n",
                             b".": b"250 2.0.0 queued\r\n"}, batch=True)
        run = Run([job("q", ["a@b.test", "c@b.test"], b"one\r\n"),
                   job("r", ["d@b.test"], b"two\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 2)
        self.assertEqual(run.reports, {
            "q": {"a@b.test": (250, "2.0.0 queued", False),
                  "c@b.test": (250, "2.0.0 queued", False)},
            "r": {"d@b.test": (250, "2.0.0 queued", False)}})
        self.assertEqual(self.server.commands[1:], [
            b"MAIL FROM:<s@a.test>", b"RCPT TO:<a@b.test>", b"RCPT TO:<c@b.test>", b"DATA",
            b"MAIL FROM:<s@a.test>", b"RCPT TO:<d@b.test>", b"DATA", b"QUIT"])
        self.assertEqual(self.server.data, [b"one\r\n", b"two\r\n"])

    @defer.inlineCallbacks
    def test_no_pipelining_unless_offered(self):
        """Without PIPELINING each command waits for the reply to the one before."""
        hop = self.scripted({b"DATA": b"354 go\r\n", b".": b"250 ok\r\n"}, delay=0.002)
        run = Run([job("q", ["a@b.test", "c@b.test"], b"one\r\n"),
                   job("r", ["d@b.test"], b"two\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 2)
        self.assertEqual({r: v[0] for rs in run.reports.values() for r, v in rs.items()},
                         {"a@b.test": 250, "c@b.test": 250, "d@b.test": 250})
        self.assertEqual(self.server.early, [])
        self.assertEqual(self.server.data, [b"one\r\n", b"two\r\n"])

    @defer.inlineCallbacks
    def test_pipelined_recipients_refused_some_or_all(self):
        sink, hop = self.sink(pipelining=True, rules={
            "later@b.test": (451, "4.2.0 greylisted"), "gone@b.test": (550, "5.1.1 no user")})
        run = Run([job("some", ["ok@b.test", "later@b.test", "gone@b.test"], b"x\r\n"),
                   job("none", ["gone@b.test", "later@b.test"], b"y\r\n"),
                   job("after", ["ok@b.test"], b"after\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 3)
        self.assertEqual(run.reports["some"], {
            "ok@b.test": (250, "Delivery in progress", False),
            "later@b.test": (451, "4.2.0 greylisted", False),
            "gone@b.test": (550, "5.1.1 no user", False)})
        self.assertEqual(run.reports["none"], {
            "gone@b.test": (550, "5.1.1 no user", False),
            "later@b.test": (451, "4.2.0 greylisted", False)})
        self.assertEqual(run.reports["after"]["ok@b.test"][0], 250)
        # the DATA of "none" was refused (no recipient): no message, and the connection
        # went on after RSET
        self.assertEqual([(m.recipients, m.data) for m in sink.messages],
                         [(["ok@b.test"], b"x\r\n"), (["ok@b.test"], b"after\r\n")])
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_pipelined_data_accepted_without_recipients_sends_no_message(self):
        """RFC 2920 3.1: a 354 although every RCPT was refused gets a lone dot."""
        hop = self.scripted({b"EHLO": b"250-scripted\r\n250 PIPELINING\r\n",
                             b"RCPT": b"550 5.1.1 no such user\r\n",
                             b"DATA": b"354 go\r\n", b".": b"554 5.5.1 no valid recipients\r\n"})
        run = Run([job("q", ["a@b.test", "c@b.test"], b"secret\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 1)
        self.assertEqual(run.reports["q"], {"a@b.test": (550, "5.1.1 no such user", False),
                                            "c@b.test": (550, "5.1.1 no such user", False)})
        self.assertEqual(self.server.data, [b""])
        self.assertEqual(self.server.commands[-2:], [b"DATA", b"QUIT"])

    @defer.inlineCallbacks
    def test_pipelined_sender_refused(self):
        hop = self.scripted({b"EHLO": b"250-scripted\r\n250 PIPELINING\r\n",
                             b"MAIL": b"451 4.3.0 try later\r\n",
                             b"RCPT": b"503 5.5.1 sender first\r\n",
                             b"DATA": b"503 5.5.1 no recipients\r\n"})
        run = Run([job("q", ["a@b.test", "c@b.test"], b"x\r\n"),
                   job("r", ["d@b.test"], b"x\r\n")])
        yield run.send([hop])
        self.assertEqual(run.reports["q"], {"a@b.test": (451, "4.3.0 try later", False),
                                            "c@b.test": (451, "4.3.0 try later", False)})
        self.assertEqual(run.reports["r"]["d@b.test"][0], 451)
        self.assertEqual(self.server.data, [])
        self.assertEqual(self.server.commands[5:7], [b"RSET", b"MAIL FROM:<s@a.test>"])

    @defer.inlineCallbacks
    def test_pipelined_server_closing_mid_group(self):
        hop = self.scripted({b"EHLO": b"250-scripted\r\n250 PIPELINING\r\n",
                             b"RCPT": b"421 4.3.2 shutting down\r\n"})
        run = Run([job("q", ["a@b.test", "c@b.test"], b"x\r\n"),
                   job("r", ["d@b.test"], b"x\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 1)  # r waits for another connection
        self.assertEqual(run.reports, {"q": {"a@b.test": (421, "4.3.2 shutting down", False),
                                             "c@b.test": (421, "4.3.2 shutting down", False)}})
        self.assertEqual(self.server.commands[1:], [  # then it closed the connection
            b"MAIL FROM:<s@a.test>", b"RCPT TO:<a@b.test>", b"RCPT TO:<c@b.test>", b"DATA"])

    @defer.inlineCallbacks
    def test_pipelined_data_refused(self):
        sink, hop = self.sink(pipelining=True)
        sink.data_reply = (554, "5.7.1 content refused")
        run = Run([job("q", ["a@b.test", "c@b.test"], b"x\r\n")])
        yield run.send([hop])
        self.assertEqual({r: v[:2] for r, v in run.reports["q"].items()},
                         {"a@b.test": (554, "5.7.1 content refused"),
                          "c@b.test": (554, "5.7.1 content refused")})

    @defer.inlineCallbacks
    def test_a_held_report_holds_the_connection(self):
        """A Deferred from the report: the next job is taken (and its MAIL sent) only
        once it fires, and send() fires only after the last one."""
        sink, hop = self.sink()
        run = Run([job(f"q{i}", [f"r{i}@b.test"], b"Subject: x\r\n\r\nbody\r\n")
                   for i in range(3)])
        settled: list[str] = []
        taken: list[tuple[int, int]] = []  # (reports settled, MAILs seen) at each pull
        next_job, report = run.next_job, run.report

        def pull():
            taken.append((len(settled), sink.transactions))
            return next_job()

        def held(job, results):
            report(job, results)
            return task.deferLater(reactor, 0.01, settled.append, job.queue_id)

        outcome = yield Courier(reactor, "relay.test", connect_timeout=5,
                                command_timeout=10).send([hop], pull, held)
        self.assertEqual(outcome.jobs, 3)
        self.assertEqual(settled, ["q0", "q1", "q2"])
        self.assertEqual(taken, [(0, 0), (1, 1), (2, 2), (3, 3)])
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_no_nagle_delay(self):
        _, hop = self.sink()
        courier = Courier(reactor, "relay.test", connect_timeout=5, command_timeout=10)
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        nodelay = []

        def report(job, results):
            run.report(job, results)
            [client] = courier._live
            nodelay.append(client.transport.getHandle().getsockopt(socket.IPPROTO_TCP,
                                                                   socket.TCP_NODELAY))

        yield courier.send([hop], run.next_job, report)
        self.assertEqual(len(nodelay), 1)
        self.assertTrue(nodelay[0])

    @defer.inlineCallbacks
    def test_server_leaving_while_a_report_is_held(self):
        """The server says 421 right behind its 250 to the data, while the report of that
        message holds the connection: the connection closes at once and r is never
        taken."""
        hop = self.scripted({b"DATA": b"354 go\r\n",
                             b".": b"250 ok\r\n421 4.3.2 shutting down\r\n"})
        run = Run([job("q", ["a@b.test"], b"x\r\n"), job("r", ["a@b.test"], b"x\r\n")])
        held: defer.Deferred = defer.Deferred()

        def report(job, results):
            run.report(job, results)
            return held

        sending = Courier(reactor, "relay.test", connect_timeout=5,
                          command_timeout=10).send([hop], run.next_job, report)
        yield self.closed  # our side closed the connection on the 421
        self.assertFalse(sending.called)  # its place is kept until the report settles
        held.callback(None)
        outcome = yield sending
        self.assertEqual(outcome.jobs, 1)  # r was never taken
        self.assertEqual(run.reports, {"q": {"a@b.test": (250, "ok", False)}})
        self.assertEqual(self.server.data, [b"x\r\n"])

    @defer.inlineCallbacks
    def test_many_messages_one_connection(self):
        sink, hop = self.sink()
        bodies = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(12)]
        run = Run([job(f"q{i}", [f"r{i}@b.test"], b) for i, b in enumerate(bodies)])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 12)
        self.assertEqual(sink.connections, 1)
        self.assertEqual([m.data for m in sink.messages], bodies)
        self.assertEqual([m.recipients for m in sink.messages],
                         [[f"r{i}@b.test"] for i in range(12)])

    @defer.inlineCallbacks
    def test_per_recipient_results(self):
        sink, hop = self.sink(rules={"later@b.test": (451, "4.2.0 greylisted"),
                                     "gone@b.test": (550, "5.1.1 no such user")})
        run = Run([job("q", ["ok@b.test", "later@b.test", "gone@b.test"], b"x\r\n"),
                   job("none", ["gone@b.test"], b"x\r\n"),
                   job("after", ["ok@b.test"], b"after\r\n")])
        yield run.send([hop])
        self.assertEqual(run.reports["q"], {
            "ok@b.test": (250, "Delivery in progress", False),
            "later@b.test": (451, "4.2.0 greylisted", False),
            "gone@b.test": (550, "5.1.1 no such user", False)})
        self.assertEqual(run.reports["none"]["gone@b.test"][0], 550)
        self.assertEqual([m.recipients for m in sink.messages], [["ok@b.test"], ["ok@b.test"]])
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_data_refused_applies_to_accepted_recipients(self):
        sink, hop = self.sink()
        sink.data_reply = (554, "5.7.1 content refused")
        run = Run([job("q", ["a@b.test", "c@b.test"], b"x\r\n")])
        yield run.send([hop])
        self.assertEqual({r: v[0] for r, v in run.reports["q"].items()},
                         {"a@b.test": 554, "c@b.test": 554})

    @defer.inlineCallbacks
    def test_addresses_with_line_breaks_never_reach_the_wire(self):
        sink, hop = self.sink()
        evil = "x\r\nRCPT TO:<victim@evil.test>\r\n@b.test"
        run = Run([job("q", [evil, "ok@b.test"], b"x\r\n"),
                   job("s", ["ok@b.test"], b"x\r\n", sender="a\nb@a.test")])
        yield run.send([hop])
        self.assertEqual(run.reports["q"][evil][:1], (550,))
        self.assertIn("5.1.3", run.reports["q"][evil][1])
        self.assertEqual(run.reports["s"]["ok@b.test"][:1], (550,))
        self.assertIn("5.1.7", run.reports["s"]["ok@b.test"][1])
        self.assertEqual([m.recipients for m in sink.messages], [["ok@b.test"]])
        self.assertEqual(sink.transactions, 1)

    @defer.inlineCallbacks
    def test_smtputf8_passed_on_to_a_server_offering_it(self):
        """RFC 6531: the addresses as the client gave them, SMTPUTF8 in MAIL, and
        BODY=8BITMIME (RFC 6152) for the 8-bit message, pipelined or not."""
        for pipelining in (False, True):
            sink, hop = self.sink(smtputf8=True, pipelining=pipelining)
            body = "Subject: hällo\r\n\r\nGrüße\r\n".encode()
            utf8 = Job("u", "jöhn@bücher.test", ["ülla@exämple.test", "x@b.test"],
                       lambda body=body: io.BytesIO(body), smtputf8=True)
            # Asked for by the client, all ASCII: still SMTPUTF8; no BODY= for 7 bits.
            ascii_ = Job("a", "s@a.test", ["x@b.test"], lambda: io.BytesIO(b"x\r\n"),
                         smtputf8=True)
            run = Run([utf8, ascii_, job("p", ["x@b.test"], b"x\r\n")])
            yield run.send([hop])
            self.assertEqual({r: v[0] for rs in run.reports.values() for r, v in rs.items()},
                             {"ülla@exämple.test": 250, "x@b.test": 250})
            self.assertEqual([m.commands for m in sink.messages], [
                ["MAIL FROM:<jöhn@bücher.test> BODY=8BITMIME SMTPUTF8".encode(),
                 "RCPT TO:<ülla@exämple.test>".encode(), b"RCPT TO:<x@b.test>"],
                [b"MAIL FROM:<s@a.test> SMTPUTF8", b"RCPT TO:<x@b.test>"],
                [b"MAIL FROM:<s@a.test>", b"RCPT TO:<x@b.test>"]])
            self.assertEqual(sink.messages[0].data, body)
            self.assertEqual(sink.messages[0].recipients, ["ülla@exämple.test", "x@b.test"])

    @defer.inlineCallbacks
    def test_server_without_smtputf8(self):
        """A domain goes as A-labels (RFC 6531 3.2 allows it); a UTF-8 local part cannot
        go (5.6.7, that recipient only; the whole message for the sender), nor can the
        UTF-8 header of an SMTPUTF8 message (5.6.9)."""
        sink, hop = self.sink()  # Twisted's own: no SMTPUTF8
        seven = b"Subject: hi\r\n\r\nx\r\n"
        utf8_header = "Subject: hällo\r\n\r\nx\r\n".encode()
        run = Run([Job("domains", "x@bücher.test", ["ülla@exämple.test", "y@exämple.test"],
                       lambda: io.BytesIO(seven), smtputf8=True),
                   Job("sender", "jöhn@a.test", ["y@b.test"], lambda: io.BytesIO(seven)),
                   Job("header", "x@a.test", ["y@b.test"], lambda: io.BytesIO(utf8_header),
                       smtputf8=True)])
        yield run.send([hop])
        self.assertEqual(run.reports, {
            "domains": {
                "ülla@exämple.test": (550, "5.6.7 non-ASCII recipient address and the server "
                                      "does not offer SMTPUTF8", False),
                "y@exämple.test": (250, "Delivery in progress", False)},
            "sender": {"y@b.test": (550, "5.6.7 non-ASCII sender address and the server "
                                    "does not offer SMTPUTF8", False)},
            "header": {"y@b.test": (550, "5.6.9 UTF-8 header (SMTPUTF8 message) and the "
                                    "server does not offer SMTPUTF8", False)}})
        self.assertEqual([m.commands for m in sink.messages], [
            [b"MAIL FROM:<x@xn--bcher-kva.test>", b"RCPT TO:<y@xn--exmple-cua.test>"]])
        self.assertEqual(sink.messages[0].data, seven)

    @defer.inlineCallbacks
    def test_8bitmime(self):
        """BODY=8BITMIME for a message with any byte over 0x7F, also at the end of one
        streamed from the file; to a server without 8BITMIME, 7 bits go and 8 bits bounce
        (554 5.6.3, not converted)."""
        small = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
        large = b"Subject: x\r\n\r\n" + (b"y" * 998 + b"\r\n") * (3 * SMALL_BODY // 1000)
        seven, large = large, large + b"\xe9\r\n"
        self.assertGreater(len(seven), SMALL_BODY)
        sink, hop = self.sink()
        run = Run([job("small", ["a@b.test"], small), job("large", ["a@b.test"], large),
                   job("seven", ["a@b.test"], seven)])
        yield run.send([hop])
        self.assertEqual([m.commands[0] for m in sink.messages], [
            b"MAIL FROM:<s@a.test> BODY=8BITMIME", b"MAIL FROM:<s@a.test> BODY=8BITMIME",
            b"MAIL FROM:<s@a.test>"])
        self.assertEqual([m.data for m in sink.messages], [small, large, seven])
        sink, hop = self.sink(eightbitmime=False)
        run = Run([job("small", ["a@b.test"], small), job("large", ["a@b.test"], large),
                   job("seven", ["a@b.test"], b"x\r\n")])
        yield run.send([hop])
        refused = (554, "5.6.3 8-bit message and the server does not offer 8BITMIME; not "
                   "converted to 7 bits", False)
        self.assertEqual(run.reports, {"small": {"a@b.test": refused},
                                       "large": {"a@b.test": refused},
                                       "seven": {"a@b.test": (250, "Delivery in progress",
                                                              False)}})
        self.assertEqual([m.commands[0] for m in sink.messages], [b"MAIL FROM:<s@a.test>"])

    @defer.inlineCallbacks
    def test_size_limit_is_permanent(self):
        sink, hop = self.sink(size=1000)
        run = Run([job("big", ["a@b.test", "c@b.test"], b"x" * 2000 + b"\r\n"),
                   job("small", ["a@b.test"], b"small\r\n")])
        yield run.send([hop])
        for code, text, _ in run.reports["big"].values():
            self.assertEqual(code, 552)
            self.assertTrue(text.startswith("5.3.4"))
        self.assertEqual(run.reports["small"]["a@b.test"][0], 250)
        self.assertEqual(sink.transactions, 1)

    @defer.inlineCallbacks
    def test_next_hop_after_connection_refused(self):
        sink, hop = self.sink()
        port = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        closed = port.getHost().port
        yield port.stopListening()
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([Hop("127.0.0.1", closed, address="127.0.0.1"), hop])
        self.assertEqual(outcome.jobs, 1)
        self.assertIn("connection refused", outcome.error)
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_all_hops_failing_takes_no_job(self):
        greeting_refused = self.scripted({b"EHLO": b"554 go away\r\n", b"HELO": b"554 no\r\n"})
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([greeting_refused])
        self.assertEqual(outcome.jobs, 0)
        self.assertEqual(run.reports, {})
        self.assertIn("554", outcome.error)

    @defer.inlineCallbacks
    def test_connection_lost_in_data_is_temporary(self):
        """Closed right after DATA (in a pipelined group too) or after the end of the data
        without a reply: deferred."""
        pipelining = {b"EHLO": b"250-scripted\r\n250 PIPELINING\r\n"}
        for script in ({b"DATA": None}, {b"DATA": None, **pipelining},
                       {b"DATA": b"354 go\r\n", b".": None}):
            hop = self.scripted(script)
            run = Run([job("q", ["a@b.test"], b"x\r\n"), job("r", ["a@b.test"], b"x\r\n")])
            outcome = yield run.send([hop])
            self.assertEqual(outcome.jobs, 1)
            code, text, _ = run.reports["q"]["a@b.test"]
            self.assertEqual(code, 451)
            self.assertIn("connection lost", text)

    @defer.inlineCallbacks
    def test_reply_before_the_end_of_data(self):
        """A refusal before the end of the data stands; a 250 cannot be the message's (the
        server has not seen it all) and defers it."""
        for reply, result in [
                (b"554 5.3.4 too much", (554, "5.3.4 too much")),
                (b"250 2.0.0 ok",
                 (451, "4.5.0 protocol error: reply before the end of the data: 250 2.0.0 ok"))]:
            hop = self.scripted({b"DATA": b"354 go\r\n" + reply + b"\r\n"})
            run = Run([job("q", ["a@b.test"], b"x" * 1000 + b"\r\n" * 2**20),
                       job("r", ["a@b.test"], b"x\r\n")])
            outcome = yield run.send([hop])
            self.assertEqual(run.reports["q"]["a@b.test"][:2], result)
            self.assertEqual(outcome.jobs, 1)  # the next message waits for a new connection

    @defer.inlineCallbacks
    def check_lies(self, lies: list[tuple[dict[bytes, bytes], str]], pipelining: bool):
        """Each server answers as an honest one would except for one lie in a transaction:
        the message is deferred for every recipient with the reason, and the connection
        closes at once (no RSET, no QUIT, no next message)."""
        for lie, reason in lies:
            script = {b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n", **lie}
            if pipelining:
                script[b"EHLO"] = b"250-scripted\r\n250 PIPELINING\r\n"
            hop = self.scripted(script)
            run = Run([job("q", ["a@b.test", "c@b.test"], b"x\r\n"),
                       job("r", ["d@b.test"], b"y\r\n")])
            outcome = yield run.send([hop])
            yield self.closed
            text = f"4.5.0 protocol error: {reason}"
            self.assertEqual(run.reports, {"q": {"a@b.test": (451, text, False),
                                                 "c@b.test": (451, text, False)}}, lie)
            self.assertEqual(outcome.jobs, 1, lie)  # r waits for another connection
            commands = [c.split(b" ")[0] for c in self.server.commands]
            self.assertEqual((commands.count(b"MAIL"), commands.count(b"RSET"),
                              commands.count(b"QUIT")), (1, 0, 0), lie)
            self.assertEqual(b"".join(self.server.data), b"x\r\n" if b"." in lie else b"",
                             lie)

    # Replies a command cannot have; 4xx and 5xx keep their meaning (tests above).
    LIES = [
        ({b"DATA": b"250 2.0.0 ok\r\n"}, "unexpected reply to DATA: 250 2.0.0 ok"),
        ({b"DATA": b"334 go on\r\n"}, "unexpected reply to DATA: 334 go on"),
        ({b"MAIL": b"220 ok\r\n"}, "unexpected reply to MAIL: 220 ok"),
        ({b"RCPT": b"354 ok\r\n"}, "unexpected reply to RCPT: 354 ok"),
        ({b".": b"354 more\r\n"}, "unexpected reply to the end of the data: 354 more"),
        ({b".": b"220 ok\r\n"}, "unexpected reply to the end of the data: 220 ok"),
        ({b".": b"550-5.7.1 spam\r\n250 2.0.0 ok\r\n"},
         "the lines of a reply have different codes (550 then 250)"),
        ({b".": b"250ok\r\n"}, 'malformed reply "250ok"'),
        ({b"DATA": b"2x0 ok\r\n"}, 'malformed reply "2x0 ok"'),
        ({b"DATA": b"050 hold on\r\n354 go\r\n"}, 'malformed reply "050 hold on"'),
    ]

    def test_unexpected_replies_defer_the_message(self):
        return self.check_lies(self.LIES, pipelining=False)

    def test_unexpected_replies_defer_the_message_pipelined(self):
        return self.check_lies(self.LIES, pipelining=True)

    @defer.inlineCallbacks
    def test_data_answered_250_sends_no_message_and_reports_none_delivered(self):
        """The case that had messages leave the queue unsent: DATA answered 250."""
        hop = self.scripted({b"DATA": b"250 2.0.0 ok\r\n"})
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([hop])
        [(code, text, _)] = run.reports["q"].values()
        self.assertEqual((code, text),
                         (451, "4.5.0 protocol error: unexpected reply to DATA: 250 2.0.0 ok"))
        self.assertEqual(self.server.data, [])
        self.assertEqual(outcome.jobs, 1)

    @defer.inlineCallbacks
    def test_unexpected_reply_to_rset_closes_the_connection(self):
        hop = self.scripted({b"MAIL": b"451 4.3.0 try later\r\n", b"RSET": b"354 go\r\n"})
        run = Run([job("q", ["a@b.test"], b"x\r\n"), job("r", ["d@b.test"], b"y\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(run.reports, {"q": {"a@b.test": (451, "4.3.0 try later", False)}})
        self.assertEqual(outcome.jobs, 1)
        self.assertEqual(self.server.commands[-1], b"RSET")  # no QUIT

    @defer.inlineCallbacks
    def test_unexpected_replies_before_mail_fail_the_hop(self):
        """Greeting, EHLO, HELO, STARTTLS, AUTH: a reply other than the one that lets the
        session go on takes no message, sends no MAIL, and says why."""
        pipelining = b"250-scripted\r\n250 PIPELINING\r\n"
        cases = [
            ({b"GREETING": b"250 scripted\r\n"},
             "4.5.0 protocol error: unexpected reply to the greeting: 250 scripted"),
            ({b"GREETING": b"554-5.7.1 not you\r\n220 welcome\r\n"},
             "4.5.0 protocol error: the lines of a reply have different codes (554 then 220)"),
            ({b"GREETING": b"554 5.7.1 not you\r\n"}, "554 5.7.1 not you"),
            ({b"EHLO": b"220 scripted\r\n"},
             "4.5.0 protocol error: unexpected reply to EHLO: 220 scripted"),
            ({b"EHLO": b"421 4.3.2 busy\r\n"}, "421 4.3.2 busy"),
            ({b"EHLO": b"500 5.5.1 what\r\n", b"HELO": b"220 scripted\r\n"},
             "4.5.0 protocol error: unexpected reply to HELO: 220 scripted"),
            ({b"EHLO": pipelining.replace(b"PIPELINING", b"STARTTLS"),
              b"STARTTLS": b"250 ok\r\n"},
             "4.5.0 protocol error: unexpected reply to STARTTLS: 250 ok"),
            ({b"EHLO": pipelining.replace(b"PIPELINING", b"STARTTLS"),
              b"STARTTLS": b"454 4.7.0 TLS not available\r\n"},
             "454 4.7.0 TLS not available"),
            ({b"EHLO": pipelining.replace(b"PIPELINING", b"AUTH PLAIN"),
              b"AUTH": b"250 ok\r\n"}, "250 ok"),
        ]
        ca = certs.TestCA(self.mktemp())
        for lie, reason in cases:
            hop = self.scripted(lie)
            if b"AUTH" in lie:
                hop = Hop(hop.host, hop.port, address=hop.address, tls="none",
                          username="relay", password="s3cret")
            elif b"STARTTLS" in lie:
                hop = Hop(hop.host, hop.port, address=hop.address, ca_file=str(ca.cert_path))
            run = Run([job("q", ["a@b.test"], b"x\r\n")])
            outcome = yield run.send([hop])
            self.assertEqual((outcome.jobs, run.reports), (0, {}), lie)
            self.assertIn(reason, outcome.error, lie)
            self.assertNotIn(b"MAIL FROM:<s@a.test>", self.server.commands, lie)

    @defer.inlineCallbacks
    def test_auth_login_sends_the_password_once(self):
        """A server that answers the password with another challenge does not get it
        again (and again: each challenge resets the command timeout)."""
        password = b"334 UGFzc3dvcmQ6\r\n"
        hop = self.scripted({b"EHLO": b"250-scripted\r\n250 AUTH LOGIN\r\n",
                             b"AUTH": b"334 VXNlcm5hbWU6\r\n",  # then the name, the password
                             b"cmVsYXk=".upper(): password, b"czNjcmV0".upper(): password})
        hop = Hop(hop.host, hop.port, address=hop.address, tls="none", username="relay",
                  password="s3cret")
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual((outcome.jobs, run.reports), (0, {}))
        self.assertIn("4.5.0 protocol error: unexpected reply to AUTH: 334 UGFzc3dvcmQ6",
                      outcome.error)
        self.assertEqual(self.server.commands[1:], [b"AUTH LOGIN", b"cmVsYXk=", b"czNjcmV0"])

    test_auth_login_sends_the_password_once.timeout = 10  # before the bound: endless

    @defer.inlineCallbacks
    def test_helo_after_ehlo_refused_with_5xx(self):
        """RFC 5321 3.2: an old server says 5xx to EHLO; HELO then, and the mail goes."""
        hop = self.scripted({b"EHLO": b"502 5.5.2 unknown command\r\n",
                             b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n"})
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 1)
        self.assertEqual(run.reports["q"]["a@b.test"][:2], (250, "2.0.0 queued"))
        self.assertEqual([c.split(b" ")[0] for c in self.server.commands],
                         [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"QUIT"])

    @defer.inlineCallbacks
    def test_response_injection_after_starttls_is_refused(self):
        hop = self.scripted({
            b"EHLO": b"250-scripted\r\n250 STARTTLS\r\n",
            b"STARTTLS": b"220 go ahead\r\n250 injected\r\n",
        })
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([hop])
        self.assertEqual(outcome.jobs, 0)
        self.assertIn("injection", outcome.error)


class TLSTests(TempPaths, unittest.TestCase):
    def setUp(self):
        self.ca = certs.TestCA(self.mktemp())
        self.cert, self.key = self.ca.issue("localhost")

    def sink(self, **kw) -> SMTPSink:
        sink = SMTPSink(**kw)
        sink.listen()
        self.addCleanup(sink.stop)
        return sink

    def smarthost(self, sink: SMTPSink, **kw) -> Hop:
        fields = dict(tls="required", verify=True, username="relay", password="s3cret",
                      ca_file=str(self.ca.cert_path))
        fields.update(kw)
        return Hop("localhost", sink.port, **fields)

    @defer.inlineCallbacks
    def test_smarthost_starttls_verified_and_auth(self):
        sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key),
                         auth={"relay": "s3cret"}, require_auth=True)
        run = Run([job("q1", ["a@b.test"], b"one\r\n"), job("q2", ["a@b.test"], b"two\r\n")])
        outcome = yield run.send([self.smarthost(sink)])
        self.assertEqual(outcome.jobs, 2)
        self.assertEqual(run.reports["q1"]["a@b.test"], (250, "Delivery in progress", True))
        self.assertEqual([(m.tls, m.user) for m in sink.messages], [(True, "relay")] * 2)

    @defer.inlineCallbacks
    def test_auth_login_when_plain_is_not_offered(self):
        sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key),
                         auth={"relay": "s3cret"}, require_auth=True, mechanisms=["LOGIN"])
        outcome = yield Run([job("q", ["a@b.test"], b"x\r\n")]).send([self.smarthost(sink)])
        self.assertEqual(outcome.jobs, 1)
        self.assertEqual([m.user for m in sink.messages], ["relay"])

    @defer.inlineCallbacks
    def test_wrong_password_takes_no_job(self):
        sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key),
                         auth={"relay": "s3cret"}, require_auth=True)
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([self.smarthost(sink, password="wrong")])
        self.assertEqual(outcome.jobs, 0)
        self.assertIn("535", outcome.error)

    @defer.inlineCallbacks
    def test_unknown_ca_fails_verification(self):
        sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key))
        other = certs.TestCA(self.mktemp(), name="another CA")
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([self.smarthost(sink, username="", ca_file=str(
            other.cert_path))])
        self.assertEqual(outcome.jobs, 0)
        self.assertIn("certificate verify failed", outcome.error)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_unreadable_ca_file_is_a_hop_failure(self):
        sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key))
        hop = self.smarthost(sink, username="", ca_file=self.mktemp())
        outcome = yield Run([job("q", ["a@b.test"], b"x\r\n")]).send([hop])
        self.assertEqual(outcome.jobs, 0)
        self.assertIn("TLS setup failed", outcome.error)

    @defer.inlineCallbacks
    def test_name_mismatch_fails_verification(self):
        sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key))
        hop = Hop("mx.other.test", sink.port, tls="required", verify=True,
                  ca_file=str(self.ca.cert_path), address="127.0.0.1")
        outcome = yield Run([job("q", ["a@b.test"], b"x\r\n")]).send([hop])
        self.assertIn("does not match", outcome.error)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_tls_required_without_starttls_defers(self):
        sink = self.sink()
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([self.smarthost(sink, username="")])
        self.assertEqual(outcome.jobs, 0)
        self.assertIn("STARTTLS", outcome.error)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_credentials_never_sent_in_plaintext(self):
        sink = self.sink(auth={"relay": "s3cret"})
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        outcome = yield run.send([self.smarthost(sink, tls="opportunistic")])
        self.assertEqual(outcome.jobs, 0)
        self.assertIn("without TLS", outcome.error)
        self.assertEqual(sink.transactions, 0)

    @defer.inlineCallbacks
    def test_opportunistic_encrypts_unverified_or_falls_back_to_plaintext(self):
        tls_sink = self.sink(tls_cert=str(self.cert), tls_key=str(self.key))
        plain_sink = self.sink()
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        yield run.send([Hop("mx.unknown.test", tls_sink.port, address="127.0.0.1")])
        self.assertEqual(run.reports["q"]["a@b.test"][2], True)
        run = Run([job("q", ["a@b.test"], b"x\r\n")])
        yield run.send([Hop("mx.unknown.test", plain_sink.port, address="127.0.0.1")])
        self.assertEqual(run.reports["q"]["a@b.test"][:1] + run.reports["q"]["a@b.test"][2:],
                         (250, False))
        self.assertEqual([m.tls for m in tls_sink.messages + plain_sink.messages],
                         [True, False])
