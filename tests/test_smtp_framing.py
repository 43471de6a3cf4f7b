"""The session's framing (smtp/framing.py) over StringTransport, without SMTP: lines on
CRLF only, replies gathered per chunk, nothing read while a command waits, and the DATA
hand-off to data.DataReader."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailrelay.smtp.data import DataReader
from mailrelay.smtp.framing import CommandStream


class Echo(CommandStream):
    """Answers each line with ``ok <line>``; ``WAIT`` waits on a Deferred the test fires,
    ``DATA`` reads a message into ``messages``."""

    max_line = 64
    max_pending = 200

    def __init__(self) -> None:
        super().__init__()
        self.callLater = Clock().callLater
        self.lines: list[bytes] = []
        self.pending_commands: list[Deferred] = []
        self.events: list = []
        self.messages: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if line == b"WAIT":
            d = Deferred()
            d.addCallback(lambda text: self.write(text + b"\r\n"))
            self.pending_commands.append(d)
            self.wait(d)
        elif line == b"DATA":
            self._body = bytearray()
            self.readMessage(DataReader(self._body.extend, 100, lambda header: None))
            self.write(b"354 go\r\n")
        else:
            self.write(b"ok " + line + b"\r\n")

    def lineTooLong(self) -> None:
        self.events.append("too long")
        super().lineTooLong()

    def inputFlooded(self, size: int) -> None:
        self.events.append(("flooded", size))
        super().inputFlooded(size)

    def messageRefused(self, reader: DataReader) -> None:
        self.events.append(("refused", reader.error.code, reader.endless))

    def messageReceived(self, reader: DataReader) -> None:
        self.messages.append(bytes(self._body))
        self.write(b"250 %d\r\n" % reader.size if reader.error is None else b"%d refused\r\n"
                   % reader.error.code)

    def commandFinished(self) -> None:
        self.events.append("finished")

    def waitFailed(self, failure) -> None:
        self.events.append(("failed", failure.getErrorMessage()))


def connect() -> tuple[Echo, StringTransport, list[bytes]]:
    stream, transport = Echo(), StringTransport()
    writes: list[bytes] = []
    transport.write = writes.append
    stream.makeConnection(transport)
    return stream, transport, writes


def test_lines_end_at_crlf_only_and_may_span_chunks():
    stream, _, writes = connect()
    stream.dataReceived(b"a\nb\r\nc\rd\r\nsplit")
    stream.dataReceived(b" line\r")
    stream.dataReceived(b"\n")
    assert stream.lines == [b"a\nb", b"c\rd", b"split line"]
    # The replies to one chunk leave in one write; a lone line's reply at once.
    assert writes == [b"ok a\nb\r\nok c\rd\r\n", b"ok split line\r\n"]


def test_nothing_is_read_while_a_command_waits():
    stream, transport, writes = connect()
    stream.dataReceived(b"WAIT\r\nNOOP\r\n")
    assert stream.lines == [b"WAIT"]
    # The NOOP read with it waits in memory; the transport reads on until more comes.
    assert transport.producerState == "producing"
    stream.dataReceived(b"MORE\r\n")
    assert transport.producerState == "paused"
    assert stream.lines == [b"WAIT"] and stream.pending == len(b"NOOP\r\nMORE\r\n")
    stream.pending_commands[0].callback(b"250 waited")
    assert stream.lines == [b"WAIT", b"NOOP", b"MORE"]
    assert transport.producerState == "producing"
    assert stream.events == ["finished"]
    # The waited command's reply leaves with those of the commands behind it.
    assert writes == [b"250 waited\r\nok NOOP\r\nok MORE\r\n"]


def test_a_pipelined_group_behind_a_wait_costs_no_pause_and_one_write():
    """What a pipelined MAIL, RCPT, DATA does when MAIL asks Redis: no pause and resume
    of the transport, and the three replies in one write (one segment, RFC 2920)."""
    stream, transport, writes = connect()
    paused = []
    transport.pauseProducing = lambda: paused.append("pause")
    stream.dataReceived(b"WAIT\r\nRCPT\r\nDATA\r\n")
    stream.pending_commands[0].callback(b"250 mail")
    assert paused == []
    assert writes == [b"250 mail\r\nok RCPT\r\n354 go\r\n"]
    stream.dataReceived(b"body\r\n.\r\n")
    assert writes[1:] == [b"250 6\r\n"]


def test_a_client_that_waits_costs_no_pause():
    stream, transport, writes = connect()
    stream.dataReceived(b"WAIT\r\n")
    stream.pending_commands[0].callback(b"250 done")
    assert transport.producerState == "producing"
    assert writes == [b"250 done\r\n"]


def test_a_failed_wait_is_handed_back():
    stream, _, _ = connect()
    stream.dataReceived(b"WAIT\r\nNOOP\r\n")
    stream.pending_commands[0].errback(RuntimeError("disk gone"))
    assert stream.events == [("failed", "disk gone"), "finished"]
    assert stream.lines == [b"WAIT", b"NOOP"]


def test_a_flood_while_waiting_closes():
    stream, transport, _ = connect()
    stream.dataReceived(b"WAIT\r\n")
    stream.dataReceived(b"x" * 150)
    stream.dataReceived(b"x" * 100)
    assert stream.events == [("flooded", 250)]
    assert transport.disconnecting
    stream.dataReceived(b"NOOP\r\n")  # closing: nothing more is read
    assert stream.lines == [b"WAIT"]


def test_a_line_without_its_end_past_max_line():
    stream, transport, _ = connect()
    stream.dataReceived(b"y" * 64)
    assert stream.events == []  # at the limit: it may still end
    stream.dataReceived(b"y")
    assert stream.events == ["too long"]
    assert transport.disconnecting and stream.buffered == 0


def test_data_hand_off_and_the_commands_after_it():
    stream, _, writes = connect()
    stream.dataReceived(b"DATA\r\nSubject: s\r\n\r\n..dot\r\n")
    assert stream.messages == []
    stream.dataReceived(b"body\r\n.\r\nNOOP\r\n")
    assert stream.messages == [b"Subject: s\r\n\r\n.dot\r\nbody\r\n"]  # unstuffed
    assert stream.lines == [b"DATA", b"NOOP"]
    # The message's reply leaves as soon as it is made (a commit is waited for).
    assert writes == [b"354 go\r\n", b"250 26\r\n", b"ok NOOP\r\n"]


def test_a_refusal_found_before_the_end_is_handed_back_once():
    stream, _, writes = connect()
    stream.dataReceived(b"DATA\r\n")
    stream.dataReceived(b"bare\nLF\r\n")
    stream.dataReceived(b"more\r\n")
    assert stream.events == [("refused", 550, False)]
    stream.dataReceived(b".\r\n")
    assert writes[-1] == b"550 refused\r\n"


def test_an_endless_line_is_given_up_on():
    stream, _, _ = connect()
    stream.dataReceived(b"DATA\r\n")
    for _ in range(3):
        stream.dataReceived(b"z" * 40000)  # past what a line may hold (data.LONG_LINE)
    assert stream.events[-1] == ("refused", 552, True)


def test_replies_after_the_connection_is_lost_go_nowhere():
    stream, _, writes = connect()
    stream.connectionLost(None)
    stream.write(b"421 late\r\n")
    assert writes == []
