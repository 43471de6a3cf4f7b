"""BDAT (RFC 3030) in the session, over StringTransport with a Clock: chunks of exact
counts however the network cuts them, what is stored, the refusals (each after its chunk's
octets are read), the order of commands, memory and timeouts."""

from __future__ import annotations

import gc
import random
import weakref

from test_smtp_support import HOST, Session, codes
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.errors import StorageError
from mailrelay.smtp.chunking import ChunkedMessage
from mailrelay.smtp.data import DataReader

ENVELOPE = b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<r@example.net>\r\n"
MESSAGE = b"From: a@doe.test\r\nSubject: s\r\n\r\nbody\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def chunked(data: bytes, size: int) -> bytes:
    """``data`` as BDAT chunks of ``size`` octets, then a zero-length LAST."""
    return b"".join(bdat(data[i:i + size]) for i in range(0, len(data), size)) + bdat(
        b"", last=True)


def body(message) -> bytes:
    """What the spool got, without the Received header."""
    data = bytes(message.data)
    return data[data.index(b"\r\n", data.index(b"\tfor <")) + 2:]


class ChunkTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.s = Session(self.clock)
        self.s.login()

    def test_one_chunk(self) -> None:
        s = self.s
        lines = s.send(ENVELOPE + bdat(MESSAGE, last=True) + b"NOOP\r\n")
        message = s.spool.created[0]
        self.assertEqual(lines, ["250 2.1.0 Ok", "250 2.1.5 Ok",
                                 f"250 2.0.0 Ok: queued as {message.id}", "250 2.0.0 Ok"])
        self.assertEqual(body(message), MESSAGE)
        self.assertTrue(bytes(message.data).startswith(b"Received: from client.test"))

    def test_many_chunks_in_one_write_and_byte_by_byte(self) -> None:
        stream = ENVELOPE + chunked(MESSAGE, 7) + b"NOOP\r\n"
        expected = ([250, 250] + [250] * -(-len(MESSAGE) // 7) + [250, 250])
        self.assertEqual(codes(self.s.send(stream)), expected)
        s = Session(self.clock)
        s.login()
        lines = []
        for i in range(len(stream)):
            lines += s.send(stream[i:i + 1])
        self.assertEqual(codes(lines), expected)
        self.assertIn("250 2.0.0 7 octets received", lines)
        for session in (self.s, s):
            self.assertEqual([body(m) for m in session.spool.committed], [MESSAGE])

    def test_zero_length_chunks(self) -> None:
        s = self.s
        lines = s.send(ENVELOPE + bdat(b"") + bdat(MESSAGE) + bdat(b"", last=True))
        self.assertEqual(lines[2:4], ["250 2.0.0 0 octets received",
                                      f"250 2.0.0 {len(MESSAGE)} octets received"])
        self.assertTrue(lines[4].startswith("250 2.0.0 Ok: queued as "))
        self.assertEqual(body(s.spool.committed[0]), MESSAGE)
        # An empty message gets its From: from the envelope, as with DATA.
        s.send(ENVELOPE + bdat(b"", last=True))
        self.assertEqual(body(s.spool.committed[1]), b"From: a@doe.test\r\n")

    def test_bare_lf_dots_and_a_missing_last_line_end(self) -> None:
        s = self.s
        content = (b"From: a@doe.test\nSubject: s\r\n\n.\n..\r\n.leading\nMAIL FROM:<x>\n"
                   b"\r\n.\r\nlast line")
        stream = ENVELOPE + chunked(content, 5)
        self.assertEqual(codes(s.send(stream))[-1], 250)
        self.assertEqual(body(s.spool.committed[0]),
                         b"From: a@doe.test\r\nSubject: s\r\n\r\n.\r\n..\r\n.leading\r\n"
                         b"MAIL FROM:<x>\r\n\r\n.\r\nlast line\r\n")

    def test_crlf_cut_between_chunks_is_one_line_end(self) -> None:
        s = self.s
        s.send(ENVELOPE + bdat(b"From: a@doe.test\r") + bdat(b"\n\r") + bdat(b"\nhi\r")
               + bdat(b"\n", last=True))
        self.assertEqual(body(s.spool.committed[0]), b"From: a@doe.test\r\n\r\nhi\r\n")

    def test_bare_cr_and_nul_are_refused(self) -> None:
        s = self.s
        for content in [b"From: a@doe.test\r\n\r\nx\ry\r\n", b"From: a@doe.test\r\n\r\nx\r",
                        b"From: a@doe.test\r\n\r\nx\r\r\n", b"From: a@doe.test\r\n\r\nx\ry\n",
                        b"From: a@doe.test\r\n\r\nx\0\r\n"]:
            lines = s.send(ENVELOPE + bdat(content, last=True))
            self.assertEqual(lines[-1][:9], "550 5.6.0", content)
        self.assertEqual(s.spool.committed, [])
        self.assertEqual({m.state for m in s.spool.created}, {"aborted"})

    def test_a_line_over_64_kib_answers_its_chunk_and_the_rest_is_not_read_as_commands(self):
        s = self.s
        line = b"MAIL FROM:<ceo@victim.example>\r\n" * 3000  # one line: no LF at all
        lines = s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n\r\n" + line.replace(b"\r\n", b""))
                       + bdat(b"\r\n" + line, last=True) + b"NOOP\r\n")
        self.assertEqual(lines[2:], ["500 5.5.2 Message refused: line longer than 65536 octets",
                                     "503 5.5.1 Need MAIL command", "250 2.0.0 Ok"])
        self.assertEqual(s.spool.created[0].state, "aborted")

    def test_header_refusal_answers_its_chunk_and_later_chunks_are_discarded(self) -> None:
        s = self.s
        lines = s.send(ENVELOPE + bdat(b"From: boss@victim.example\r\n\r\n")
                       + bdat(b"MAIL FROM:<a@doe.test>\r\n") + bdat(b"x\r\n", last=True)
                       + b"NOOP\r\n")
        self.assertEqual(codes(lines), [250, 250, 550, 503, 503, 250])
        self.assertEqual(lines[2][:9], "550 5.7.1")
        self.assertEqual(lines[3], "503 5.5.1 Need MAIL command")
        self.assertEqual(s.spool.created[0].state, "aborted")
        self.assertFalse(s.closed)

    def test_sequence_errors_consume_the_chunk(self) -> None:
        s = Session(self.clock)
        s.replies()
        data = b"MAIL FROM:<a@doe.test>\r\n"
        self.assertEqual(s.send(b"EHLO c.test\r\n" + bdat(data) + b"NOOP\r\n")[-2:],
                         ["530 5.7.0 Authentication required", "250 2.0.0 Ok"])
        s = self.s
        self.assertEqual(s.send(bdat(data, last=True) + b"NOOP\r\n"),
                         ["503 5.5.1 Need MAIL command", "250 2.0.0 Ok"])
        self.assertEqual(s.send(b"MAIL FROM:<a@doe.test>\r\n" + bdat(data) + b"NOOP\r\n"),
                         ["250 2.1.0 Ok", "503 5.5.1 Need RCPT command", "250 2.0.0 Ok"])
        # The failed BDAT ended the transaction: no later chunk starts a message.
        lines = s.send(b"RCPT TO:<r@example.net>\r\n" + bdat(MESSAGE, last=True))
        self.assertEqual(lines, ["503 5.5.1 Need MAIL command"] * 2)
        self.assertEqual(s.spool.created, [])
        # After the LAST one, more chunks are out of sequence too.
        lines = s.send(ENVELOPE + bdat(MESSAGE, last=True) + bdat(data, last=True)
                       + b"NOOP\r\n")
        self.assertEqual(codes(lines), [250, 250, 250, 503, 250])
        self.assertEqual(len(s.spool.created), 1)
        self.assertEqual(body(s.spool.committed[0]), MESSAGE)

    def test_a_spool_that_cannot_take_the_message_fails_the_first_chunk(self) -> None:
        s = self.s
        create = s.spool.create

        def full(envelope):
            s.spool.create = create
            raise StorageError("no space", full=True)

        s.spool.create = full
        lines = s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n\r\n") + bdat(MESSAGE, last=True)
                       + b"NOOP\r\n")
        self.assertEqual(lines[2:], ["452 4.3.1 Insufficient system storage, try again later",
                                     "503 5.5.1 Need MAIL command", "250 2.0.0 Ok"])
        self.assertEqual(s.spool.created, [])

    def test_a_chunk_over_the_size_limit_is_discarded_then_refused(self) -> None:
        s = Session(self.clock, max_message_size=1000)
        s.login()
        lines = s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n\r\n") + bdat(b"x" * 990)
                       + bdat(b"y\r\n", last=True) + b"NOOP\r\n")
        self.assertEqual(lines[2:], ["250 2.0.0 20 octets received",
                                     "552 5.3.4 Message size exceeds fixed limit of 1000 bytes",
                                     "503 5.5.1 Need MAIL command", "250 2.0.0 Ok"])
        self.assertEqual(s.spool.created[0].state, "aborted")
        # The first chunk alone: nothing is opened at all.
        lines = s.send(ENVELOPE + bdat(b"z" * 1001, last=True) + b"NOOP\r\n")
        self.assertEqual(codes(lines), [250, 250, 552, 250])
        self.assertEqual(len(s.spool.created), 1)

    def test_a_huge_count_costs_no_memory(self) -> None:
        s = Session(self.clock, max_message_size=100_000)
        s.login()
        s.send(ENVELOPE + b"BDAT 4194304 LAST\r\n")
        for _ in range(63):  # 4 MB sent, none of it held
            self.assertEqual(s.send(b"x" * 65536), [])
            self.assertEqual(s.proto.buffered, 0)
        self.assertEqual(s.send(b"x" * 65536 + b"NOOP\r\n"), [
            "552 5.3.4 Message size exceeds fixed limit of 100000 bytes", "250 2.0.0 Ok"])
        self.assertEqual(s.spool.created, [])
        s2 = Session(self.clock, max_message_size=10_000_000)
        s2.login()
        s2.send(ENVELOPE + b"BDAT 4000000 LAST\r\nFrom: a@doe.test\r\n\r\n")
        for _ in range(61):
            s2.send(b"x" * 65535 + b"\n")
            self.assertLess(s2.proto.buffered, 70_000)

    def test_syntax(self) -> None:
        s = self.s
        self.assertEqual(s.send(ENVELOPE + b"BDAT 3 LAST EXTRA\r\nabcNOOP\r\n")[2:],
                         ["501 5.5.4 Syntax: BDAT octets [LAST]", "250 2.0.0 Ok"])
        self.assertEqual(s.send(b"BDAT 3 last\r\nabc"), ["503 5.5.1 Need MAIL command"])
        for line in [b"BDAT", b"BDAT x LAST", b"BDAT -1", b"BDAT \xd9\xa3"]:
            s = Session(self.clock)
            s.login()
            self.assertEqual(s.send(line + b"\r\nMAIL FROM:<a@doe.test>\r\n"),
                             ["501 5.5.4 Syntax: BDAT octets [LAST]"])
            self.assertTrue(s.closed)

    def test_only_bdat_rset_noop_quit_between_chunks(self) -> None:
        s = self.s
        s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n"))
        for line in [b"RCPT TO:<x@example.net>", b"MAIL FROM:<a@doe.test>", b"EHLO c.test",
                     b"STARTTLS", b"VRFY x@y.test"]:
            self.assertEqual(s.send(line + b"\r\n"),
                             ["503 5.5.1 Only BDAT, RSET, NOOP or QUIT may follow BDAT"])
        self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(codes(s.send(bdat(b"\r\nx\r\n", last=True))), [250])
        self.assertEqual(s.spool.committed[0].envelope.recipients, ["r@example.net"])

    def test_rset_discards_the_chunks(self) -> None:
        s = self.s
        s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n"))
        self.assertEqual(s.send(b"RSET\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(s.spool.created[0].state, "aborted")
        self.assertEqual(codes(s.send(ENVELOPE + bdat(MESSAGE, last=True))), [250, 250, 250])
        self.assertEqual(body(s.spool.committed[0]), MESSAGE)

    def test_data_after_bdat(self) -> None:
        s = self.s
        s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n"))
        self.assertEqual(s.send(b"DATA\r\n"), ["503 5.5.1 DATA not allowed after BDAT"])
        self.assertFalse(s.closed)
        # With a message pipelined after it, that message must not run as commands.
        s.send(b"DATA\r\nMAIL FROM:<a@doe.test>\r\n")
        self.assertTrue(s.closed)
        s.lose()
        self.assertEqual(s.spool.created[0].state, "aborted")

    def test_bdat_and_data_in_one_session(self) -> None:
        s = self.s
        lines = s.send(ENVELOPE + bdat(MESSAGE, last=True) + ENVELOPE + b"DATA\r\n" + MESSAGE
                       + b".\r\n" + ENVELOPE + bdat(MESSAGE, last=True))
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354, 250, 250, 250, 250])
        self.assertEqual([body(m) for m in s.spool.committed], [MESSAGE] * 3)

    def test_client_vanishing_between_chunks_aborts(self) -> None:
        s = self.s
        s.send(ENVELOPE + bdat(b"From: a@doe.test\r\n"))
        s.lose()
        self.assertEqual(s.spool.created[0].state, "aborted")

    def test_commit_waits_and_pipelined_input_after_last_waits_for_it(self) -> None:
        s = self.s
        s.spool.hold = True
        self.assertEqual(codes(s.send(ENVELOPE + bdat(MESSAGE, last=True) + b"NOOP\r\n")),
                         [250, 250])
        s.spool.created[0].commit_deferred.callback(s.spool.created[0].id)
        self.assertEqual(codes(s.replies()), [250, 250])


class ChunkMemoryTests(unittest.TestCase):
    def test_refused_bdat_sessions_leave_nothing_behind(self) -> None:
        clock = Clock()
        refs = []
        for head, content, code in [
                (b"a@doe.test", b"bare\rCR", 550), (b"a@doe.test", b"NUL\0", 550),
                (b"a@doe.test", b"x" * 70000, 500), (b"boss@victim.example", b"x", 550),
                (b"a@doe.test", b"y" * 100_001, 552)]:
            for _ in range(3):
                s = Session(clock, max_message_size=100_000)
                s.login()
                lines = s.send(ENVELOPE + bdat(b"From: " + head + b"\r\n\r\n")
                               + bdat(content, last=True))
                self.assertIn(code, codes(lines)[2:], lines)
                s.lose()
                refs.append(weakref.ref(s.proto))
                del s
        gc.collect()
        self.assertEqual([r for r in refs if r() is not None], [])


class ChunkTimeoutTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_a_count_larger_than_what_is_sent_times_out_and_keeps_nothing(self) -> None:
        s = Session(self.clock, idle_timeout=300, data_timeout=600)
        s.login()
        s.send(ENVELOPE + b"BDAT 1000 LAST\r\n" + MESSAGE)
        self.clock.advance(300)
        self.assertEqual(s.replies(), [f"421 4.4.2 {HOST} Error: timeout exceeded"])
        self.assertTrue(s.closed)
        s.lose()
        self.assertEqual(s.spool.created[0].state, "aborted")

    def test_data_timeout_covers_all_chunks_of_a_message(self) -> None:
        s = Session(self.clock, idle_timeout=300, data_timeout=600)
        s.login()
        s.send(ENVELOPE)
        for wait in (250, 250, 100):  # a chunk every 250 s keeps it idle-alive
            self.assertEqual(codes(s.send(bdat(b"x"))), [250])
            self.clock.advance(wait)
        self.assertEqual(s.replies(), [f"421 4.4.2 {HOST} Error: DATA timeout exceeded"])
        s.lose()
        self.assertEqual(s.spool.created[0].state, "aborted")
        # A message that ends in time stops its deadline.
        s = Session(self.clock, idle_timeout=300, data_timeout=600)
        s.login()
        s.send(ENVELOPE + bdat(MESSAGE, last=True))
        self.clock.advance(299)
        self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        self.clock.advance(299)
        self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_a_discarded_chunk_is_bounded_by_data_timeout(self) -> None:
        s = Session(self.clock, idle_timeout=300, data_timeout=600)
        s.login()
        s.send(b"BDAT 1000000\r\n")
        lines = []
        for _ in range(3):
            self.clock.advance(250)
            lines += s.send(b"x")
        self.assertEqual(lines, [f"421 4.4.2 {HOST} Error: DATA timeout exceeded"])
        self.assertTrue(s.closed)


def test_chunked_message_reads_as_data_would_carry_it() -> None:
    """The translation to DATA's form, for every cut of a nasty content."""
    good = b"From: a@x.test\n\n.\r\n\r\n.\n\r\n..\n\r\n.\r\nQUIT\r\n.end"
    expected = b"From: a@x.test\r\n\r\n.\r\n\r\n.\r\n\r\n..\r\n\r\n.\r\nQUIT\r\n.end\r\n"
    for content, error in [(good, None), (good + b"\r", "5.6.0")]:  # a CR at the very end
        for cuts in [(i, j) for i in range(len(content) + 1)
                     for j in range(i, len(content) + 1)]:
            out = bytearray()
            message = ChunkedMessage(DataReader(out.extend, 10**6, lambda h: None))
            for a, b in zip((0, *cuts), (*cuts, len(content)), strict=True):
                message.write(content[a:b])
            message.finish()
            got = message.reader.error
            assert (got and got.status) == error, cuts
            if error is None:
                assert bytes(out) == expected, cuts


def test_random_contents_and_cuts_match_the_reference() -> None:
    rng = random.Random(3030)
    for _ in range(3000):
        content = bytes(rng.choice(b"\r\n.x") for _ in range(rng.randrange(12)))
        cuts = sorted(rng.randrange(len(content) + 1) for _ in range(rng.randrange(4)))
        out = bytearray()
        message = ChunkedMessage(DataReader(out.extend, 10**6, lambda h: None))
        for a, b in zip((0, *cuts), (*cuts, len(content)), strict=True):
            message.write(content[a:b])
        message.finish()
        if content.replace(b"\r\n", b"").count(b"\r"):  # a bare CR
            assert message.reader.error.status == "5.6.0", content
            continue
        expected = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        assert (bytes(out), message.reader.error) == (expected, None), (content, cuts)
