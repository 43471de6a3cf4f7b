"""The session's input and output: CRLF command lines in, replies out, one command at a
time.

Twisted's line receivers let a bare LF or an over-long line bend the framing; here
commands end at CRLF only, and a line that has none after ``max_line`` octets is refused
(``lineTooLong``). While a command waits on a Deferred (``wait``: the portal, the policy,
the spool) nothing further is run: the commands already read behind it wait in memory,
input that arrives meanwhile is held too and pauses the transport, and more than
``max_pending`` octets of it is a flood (``inputFlooded``). So pipelined commands run
strictly in order, and message data can never run as commands.

In DATA (``readMessage``) the bytes go to a data.DataReader a chunk at a time, with no
copy when nothing is held before them; its end, or a refusal it finds on the way, is
handed back (``messageReceived``, ``messageRefused``). A BDAT chunk is read the same way
by a chunking.Chunk, which ends after its count of octets.

Replies (``write``) written while input is being read are held and leave together once
that input is done: the replies to a pipelined group go in one write, one TLS record, one
segment (RFC 2920), and a reply to a lone command leaves at once. The reply of a command
that was waited for (a MAIL asking Redis) leaves with those of the commands pipelined
behind it, run as soon as it is answered.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailrelay.smtp.data import DataReader


class CommandStream(Protocol, TimeoutMixin):
    """The framing a session builds on; it overrides the hooks at the end."""

    max_line = 12288  # octets held waiting for a CRLF (the longest AUTH line)
    max_pending = 256 * 1024  # input held while a command waits; more is a flood

    def __init__(self) -> None:
        self._inbuf = bytearray()
        self._outbuf: list[bytes] = []  # replies held until the input read so far is done
        self._reader: DataReader | None = None  # the message being read, in DATA
        self._waiting: Deferred | None = None  # the command being waited for
        self._paused = False  # input arrived while waiting: the transport stopped reading
        self._processing = False
        self._closing = False  # closed, or closing: nothing more is read
        self._lost = False  # the connection is gone: nothing more is written

    # -- input

    @property
    def buffered(self) -> int:
        """Bytes of client input held in memory (bounded by the limits above)."""
        return len(self._inbuf) + (self._reader.buffered if self._reader else 0)

    @property
    def pending(self) -> int:
        """Bytes the client sent after the line being handled."""
        return len(self._inbuf)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._reader is not None:
            self.resetTimeout()  # in DATA any bytes count as activity
            if not self._inbuf and self._waiting is None:
                data = data[self._feed(data):]
                if not data:
                    return
        self._inbuf += data
        if self._waiting is not None:
            if len(self._inbuf) > self.max_pending:
                self.inputFlooded(len(self._inbuf))
            else:
                self._hold_input()
            return
        self._process()

    def _process(self) -> None:
        if self._processing:
            return  # a Deferred fired synchronously inside the loop below
        self._processing = True
        try:
            while self._inbuf and self._waiting is None and not self._closing:
                if self._reader is not None:
                    data = bytes(self._inbuf)
                    self._inbuf.clear()
                    self._inbuf += data[self._feed(data):]
                    continue
                end = self._inbuf.find(b"\r\n")
                if end < 0:
                    if len(self._inbuf) > self.max_line:
                        self.lineTooLong()
                    break
                line = bytes(self._inbuf[:end])
                del self._inbuf[: end + 2]
                self.resetTimeout()
                self.lineReceived(line)
        finally:
            # Commands read behind one that waits stay in _inbuf without pausing the
            # transport (two epoll_ctl calls per pipelined MAIL that asks Redis): a
            # client that sends more before its replies is paused in dataReceived.
            self._processing = False
            self.flush()

    def readMessage(self, reader: DataReader) -> None:
        """Hand the input after the current line to ``reader`` until the data's end."""
        self._reader = reader

    def _feed(self, data: bytes) -> int:
        """Message data; returns how many bytes of ``data`` it used."""
        reader = self._reader
        had_error = reader.error is not None
        end = reader.feed(data)
        if end < 0:
            if reader.endless or (reader.error is not None and not had_error):
                self.messageRefused(reader)
            return len(data)
        self._reader = None
        self.messageReceived(reader)
        return end

    def _hold_input(self) -> None:
        """Input waits behind a command in progress: read no more until it is done."""
        if not self._paused and not self._closing:
            self._paused = True
            self.transport.pauseProducing()

    def wait(self, d: Deferred) -> None:
        """Read no further command until ``d`` fires. Input that arrives meanwhile is held
        (dataReceived then pauses the transport); a client that sends nothing while it
        waits for a reply, the usual case, costs no epoll_ctl call and no timer change."""
        d.addErrback(self.waitFailed)
        if not d.called:
            self._waiting = d
            d.addBoth(self._resume)

    def _resume(self, _) -> None:
        self._waiting = None
        if self._closing:
            self.flush()
            return
        self.commandFinished()
        if self._closing:
            self.flush()
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self.resetTimeout()
        self._process()

    # -- output

    def write(self, data: bytes) -> None:
        """A reply: sent at once, or with the others once the input read so far is done.
        Nothing is written after close(): its last reply (a 421) stays the last."""
        if self._closing:
            return
        self._outbuf.append(data)
        if not self._processing and self._waiting is None:
            self.flush()  # else at the end of _process, run once the wait is over

    def flush(self) -> None:
        """Write the replies held while reading: the replies to pipelined commands leave
        in one write (one TLS record, one segment)."""
        if self._outbuf and not self._lost:
            self.transport.write(b"".join(self._outbuf))
        self._outbuf.clear()

    def close(self) -> None:
        """Send what is held and close; read and write nothing more."""
        self._closing = True
        self._inbuf.clear()
        self.flush()
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._lost = self._closing = True
        self.setTimeout(None)

    # -- hooks

    def lineReceived(self, line: bytes) -> None:
        """A line, without its CRLF (it may hold a bare CR or LF, or a NUL)."""
        raise NotImplementedError

    def lineTooLong(self) -> None:
        """``max_line`` octets without a CRLF."""
        self.close()

    def inputFlooded(self, size: int) -> None:
        """``size`` octets arrived while a command waited, over ``max_pending``."""
        self.close()

    def messageRefused(self, reader: DataReader) -> None:
        """The reader found a refusal (``reader.error``) before the data's end, or gave up
        on finding that end (``reader.endless``)."""

    def messageReceived(self, reader: DataReader) -> None:
        """The data ended; the reader holds what it found."""

    def commandFinished(self) -> None:
        """A Deferred given to wait() fired; input is read again after this returns,
        unless it closed the connection."""

    def waitFailed(self, failure: Failure) -> None:
        """A Deferred given to wait() failed."""
