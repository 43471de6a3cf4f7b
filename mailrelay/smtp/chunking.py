"""CHUNKING (RFC 3030): a message sent as ``BDAT <octets> [LAST]`` chunks.

A chunk is exactly its announced number of octets, read whatever they hold: nothing in
it is a command, a dot or an end of data. What the chunks carry goes through the DATA
path's reader (data.DataReader) and the session's end of data, so a message sent with
BDAT gets every check a message sent with DATA gets (size, bare CR, NUL, long lines, the
header section and its ``From:`` scope), the same Received header, and the same durable
commit before the ``250`` of its LAST chunk.

Decisions:

- Line ends. A chunk's lines may end in a bare LF (Microsoft 365 and Exchange send such
  messages with BDAT, and refuse to send them with DATA): each bare LF is stored as CRLF.
  The spool holds canonical CRLF lines, as for DATA, and a next hop that speaks only DATA
  gets them dot-stuffed by the delivery client like any other message. A bare CR or a NUL
  is refused (``550 5.6.0``), as in DATA. A message whose last line has no line end gets
  one. The size limit applies to the message as stored (a bare LF counts as CRLF).
- Order. BDAT needs a login, MAIL and RCPT (else ``530``/``503 5.5.1``); until the LAST
  chunk only BDAT, RSET, NOOP and QUIT may follow (anything else gets ``503 5.5.1``;
  DATA too, and a pipelined message after it is not read as commands: the connection is
  dropped, as after any refused DATA). RSET discards the chunks received so far.
- Refusals. Every BDAT whose count can be read has its octets read and discarded before
  it is answered, refused or not: a chunk over ``max_message_size`` (``552 5.3.4``, the
  announced octets of the message counted; nothing of it is kept in memory), a BDAT
  without a transaction, one after a failed chunk or after the LAST one (``503 5.5.1``,
  RFC 3030 section 2: chunks already pipelined are discarded). A refused BDAT, or a
  refusal found in a chunk's content (the reply to that chunk), ends the transaction:
  a later chunk never becomes the start of a message. A BDAT whose count cannot be
  read (``BDAT x``) gets ``501 5.5.4`` and the connection is closed: no one knows where
  its chunk ends.
- Time. ``idle_timeout`` applies to each chunk as to DATA (any octet counts as
  activity), and ``data_timeout`` runs from the first BDAT of a message to its LAST (or
  from a discarded chunk's BDAT to its end). A client that announces more than it sends
  gets ``421 4.4.2`` and nothing of its message is kept.
- ``BINARYMIME`` is not offered (``BODY=BINARYMIME`` is refused at MAIL).
"""

from __future__ import annotations

from twisted.logger import Logger

from mailrelay.reply import Reply
from mailrelay.smtp.data import DataReader, too_big

log = Logger()

# What a client may send between two chunks of a message; DATA is refused by its own
# handler, which knows what to do with a message pipelined after it.
BETWEEN_CHUNKS = frozenset((b"BDAT", b"DATA", b"RSET", b"NOOP", b"QUIT"))
SYNTAX = (501, "5.5.4", "Syntax: BDAT octets [LAST]")


class ChunkedMessage:
    """A BDAT message's content, handed to the DATA reader as DATA would carry it: bare
    LFs get their CR and lines starting with a dot are stuffed. So the reader's checks
    apply unchanged, and no content can look like the end of data to it."""

    def __init__(self, reader: DataReader) -> None:
        self.reader = reader
        self.octets = 0  # announced by the message's chunks so far
        self._cr = False  # held back: the CR that ended the last write (its LF may follow)
        self._line_start = True  # the next octet starts a line

    def write(self, data: bytes) -> None:
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        if not data:
            return
        # A bare LF gets its CR; a bare CR stays bare (and refuses the message). Counting
        # single octets is cheap, and as many CRs as LFs means no bare LF, or a bare CR.
        if data.count(b"\n") != data.count(b"\r"):
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        self._line_start = data.endswith(b"\r\n")  # (a bare LF left: refused anyway)
        self._feed(data, end=False)

    def finish(self) -> None:
        """The LAST chunk is in: end the data (with a line end for an unfinished line)."""
        ending = b"\r" if self._cr else b""  # a CR at the very end is a bare CR
        if ending or not self._line_start:
            ending += b"\r\n"
        self._feed(ending + b".\r\n", end=True)

    def _feed(self, data: bytes, end: bool) -> None:
        if (self.reader.feed(data) >= 0) != end:
            raise RuntimeError("BDAT content out of step with the end of data")


class Chunk:
    """The octets of one BDAT chunk: exactly ``count``, however the network cuts them,
    written to ``message`` or, when the chunk is refused (``refusal``), dropped. The
    framing reads it as it reads a DataReader (framing.CommandStream.readMessage)."""

    endless = False  # the end is always known
    buffered = 0  # nothing is held: every octet goes on at once

    def __init__(self, count: int, last: bool, message: ChunkedMessage | None,
                 refusal: Reply | None = None) -> None:
        self.count = count
        self.last = last
        self.message = message
        self.refusal = refusal
        self._left = count

    @property
    def error(self) -> Reply | None:
        """A refusal found in the message so far (the session stops storing it)."""
        return self.message.reader.error if self.message is not None else None

    def feed(self, data: bytes) -> int:
        """Returns -1 when all of ``data`` belongs to the chunk, else how many octets do."""
        used = min(len(data), self._left)
        self._left -= used
        if self.message is not None and used:
            self.message.write(data if used == len(data) else data[:used])
        return -1 if self._left else used


def parse_bdat(arg: bytes) -> tuple[int | None, bool, Reply | None]:
    """(count, last, syntax error); count is None when it cannot be read."""
    parts = arg.split()
    if not parts or not (parts[0].isdigit() and parts[0].isascii()):
        return None, False, Reply(*SYNTAX)
    count = int(parts[0])
    if len(parts) == 1:
        return count, False, None
    last = parts[1].upper() == b"LAST"
    return count, last, (None if last and len(parts) == 2 else Reply(*SYNTAX))


class Chunking:
    """BDAT, for server.SubmissionServer (mixed into it). It opens the message the way
    DATA does (``_open_message``) and ends it through the session's end of data
    (``messageReceived``); ``_chunk_read`` is called by the session for each chunk read."""

    _chunks: ChunkedMessage | None = None  # the message of the BDAT chunks so far

    def smtp_BDAT(self, arg: bytes) -> None:
        count, last, syntax = parse_bdat(arg)
        if count is None:
            log.warn("session {session}: {client_ip} sent BDAT without a chunk size; "
                     "dropping the connection", session=self.session_id,
                     client_ip=self.client_ip)
            self._send(syntax)
            self.close()
            return
        message = self._chunks
        try:
            if syntax is not None:
                raise syntax
            if message is None:
                self._may_send_chunks()
            octets = count + (message.octets if message is not None else 0)
            if octets > self.factory.max_message_size:
                raise too_big(self.factory.max_message_size)
            if message is None:
                message = self._chunks = ChunkedMessage(self._open_message())
        except Reply as refusal:
            # A failed BDAT fails the transaction: chunks pipelined after it are discarded
            # (RFC 3030 section 2), never taken for the start of a message.
            self._end_transaction(accepted=False)
            self._read_chunk(Chunk(count, last, None, refusal))
            return
        message.octets = octets
        self._read_chunk(Chunk(count, last, message))

    def _may_send_chunks(self) -> None:
        self._need_login()
        if self._sender is None:
            raise Reply(503, "5.5.1", "Need MAIL command")
        if not self._recipients:
            raise Reply(503, "5.5.1", "Need RCPT command")

    def _read_chunk(self, chunk: Chunk) -> None:
        if self._data_deadline is None:  # a chunk discarded outside a message
            self._data_deadline = self.callLater(self.factory.data_timeout,
                                                 self._data_timeout)
        if chunk.count:
            self.readMessage(chunk)
        else:
            self._chunk_read(chunk)

    def _chunk_read(self, chunk: Chunk) -> None:
        """All of a chunk's octets are in: answer it."""
        message = chunk.message
        if message is None:  # refused, the transaction ended: its deadline was the chunk's
            self._cancel_data_deadline()
            self._send(chunk.refusal)
        elif chunk.last or message.reader.error is not None:
            self._chunks = None
            if chunk.last:
                message.finish()
            self.messageReceived(message.reader)  # DATA's end: refusal, or commit and 250
        else:
            self._reply(250, "2.0.0", f"{chunk.count} octets received")
