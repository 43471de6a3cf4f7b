"""The DATA phase, read one network chunk at a time.

Decisions (RFC 5321 2.3.8, 4.1.1.4, 4.5.2, 4.5.3.1.6):

- Only ``CRLF . CRLF`` ends the data; the CRLF of the DATA command counts, so a first
  line of ``.`` ends it too. Leading dots are unstuffed.
- A bare CR or bare LF anywhere, or a NUL, refuses the message (``550 5.6.0``) once the end
  arrives: nothing is kept, because a server further along could read such a byte as a line
  end and find a second message in this one (SMTP smuggling).
- Lines longer than RFC 5321's 1000 octets (with the CRLF) are accepted up to LONG_LINE
  and noted (``long_lines``): HTML generators and some clients write them, and the
  session has the message made conforming before it is stored (longlines.py). A longer
  line refuses the message (``500 5.5.2``) once the end arrives; the rest is read and
  discarded, never taken for commands. Only the start of an unfinished line is held, and
  never more than LONG_LINE, so an endless line does not grow memory; one that goes on
  past ``max_size`` sets ``endless``: no end is coming, and the session closes.
- Over ``max_size`` bytes (as received, after unstuffing) the message is refused
  (``552 5.3.4``) and nothing more is written. Bytes are counted to the end whatever else
  was found, and this refusal wins over every other: a client that ignores SIZE learns
  what is wrong even when the message is also malformed.
- The header section (up to the first empty line, at most MAX_HEADER bytes) is collected
  as it streams and handed to ``check_headers`` once complete, which may refuse the
  message or have header fields added at its end.

Apart from the size, the first refusal found wins; after it the data is only scanned for
its end. All work is per chunk (``bytes.find``/``count``/``replace``/``split``), none per
line in Python.

Each refusal is a new Reply: an exception kept at module level and raised again would
gather every raise's traceback, and with it every session it refused.
"""

from __future__ import annotations

from collections.abc import Callable

from mailrelay.reply import Reply

MAX_LINE = 1000  # octets, including the CRLF: what RFC 5321 allows and what is stored
LONG_LINE = 64 * 1024  # octets, including the CRLF: the longest line accepted
MAX_HEADER = 256 * 1024
_END = b"\r\n.\r\n"

# The refusals, as Reply(*...) arguments.
BARE_NEWLINE = (550, "5.6.0", "Message refused: bare CR or LF (lines must end in CRLF)")
NUL = (550, "5.6.0", "Message refused: NUL character in the data")
LINE_TOO_LONG = (500, "5.5.2", f"Message refused: line longer than {LONG_LINE} octets")
HEADER_TOO_LONG = (552, "5.3.4", f"Message header section longer than {MAX_HEADER} bytes")


def too_big(max_size: int) -> Reply:
    return Reply(552, "5.3.4", f"Message size exceeds fixed limit of {max_size} bytes")


def _lines_fit(lines: bytes, limit: int) -> bool:
    """No line of ``lines`` (complete CRLF lines, from a line start) is over ``limit``: each
    window of ``limit`` bytes from a line start holds the LF that ends that line, and the
    next window starts after the last LF found (a few steps for a whole chunk)."""
    start, end = 0, len(lines)
    while start < end:
        last = lines.rfind(b"\n", start, start + limit)
        if last < 0:
            return False
        start = last + 1
    return True


class DataReader:
    """Finds the end of the data, checks it, and passes the message on to ``write``.

    ``write(bytes)`` receives the message as CRLF lines, unstuffed, while no refusal has
    been found; ``check_headers(bytes)`` gets the header section (CRLF lines, without the
    empty line ending it) and returns a Reply to refuse the message, header fields (CRLF
    lines) to add at the end of the section, or None.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        max_size: int,
        check_headers: Callable[[bytes], Reply | bytes | None],
    ) -> None:
        self._write = write
        self._max_size = max_size
        self._check_headers = check_headers
        self.size = 0  # message bytes received, unstuffed
        self.error: Reply | None = None
        self.long_lines = False  # a line over MAX_LINE was accepted: make it conform
        self.endless = False  # a line went on past max_size: give up on finding the end
        self._over = False  # over max_size: error is the size refusal, whatever came before
        self._tail = b""  # the unfinished line: starts a line unless _midline
        self._midline = False  # the start of the current line was discarded (too long)
        self._dropped = 0  # bytes discarded of the current (too long) line
        self._head: bytearray | None = bytearray()  # the header section so far; None: done

    @property
    def buffered(self) -> int:
        """Bytes held in memory between chunks."""
        return len(self._tail) + (len(self._head) if self._head is not None else 0)

    def feed(self, data: bytes) -> int:
        """Read a chunk. Returns -1 when all of it belonged to the message, or the number
        of bytes of ``data`` up to and including the final ``.CRLF`` (the rest is the
        client's next commands)."""
        tail = len(self._tail)
        buf = self._tail + data if tail else data
        if not self._midline and buf.startswith(b".\r\n"):
            end, lines = 3, b""
        else:
            found = buf.find(_END)
            if found >= 0:
                end, lines = found + len(_END), buf[: found + 2]
            else:
                end, cut = -1, buf.rfind(b"\r\n") + 2
                if cut < 2:  # no line finished in this chunk
                    cut = 0
                lines, self._tail = buf[:cut], buf[cut:]
        self._lines(lines)
        if end < 0:
            if len(self._tail) > LONG_LINE:
                self._refuse(Reply(*LINE_TOO_LONG))
                self._drop_tail()
            elif lines:
                self._midline, self._dropped = False, 0
            if self._midline and self._dropped + len(self._tail) > self._max_size:
                self.endless = True  # one line longer than the message may be
                self._refuse_size()
            return -1
        self._tail, self._midline, self._dropped = b"", False, 0
        if self.error is None and self._head is not None:
            extra = self._headers_done(bytes(self._head))
            if extra:
                self._write(extra)
        return end - tail

    def _lines(self, lines: bytes) -> None:
        """Complete CRLF lines, starting at a line start unless _midline."""
        if not lines:
            return
        stuffed = not self._midline and lines.startswith(b".")
        self.size += len(lines) - lines.count(b"\r\n.") - stuffed
        if self.size > self._max_size:
            return self._refuse_size()
        if self.error is not None:
            return
        crlf = lines.count(b"\r\n")
        if lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
            return self._refuse(Reply(*BARE_NEWLINE))
        if b"\0" in lines:
            return self._refuse(Reply(*NUL))
        if not _lines_fit(lines, MAX_LINE):
            if not _lines_fit(lines, LONG_LINE):
                return self._refuse(Reply(*LINE_TOO_LONG))
            self.long_lines = True
        if stuffed:
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", b"\r\n")
        if self._head is not None:
            at, extra = self._collect_header(lines)
            if self.error is not None:
                return
            if extra:
                self._write(lines[:at])
                self._write(extra)
                lines = lines[at:]
        self._write(lines)

    def _collect_header(self, lines: bytes) -> tuple[int, bytes]:
        """Add ``lines`` to the header section; once it is complete, where in ``lines`` it
        ends and the fields to add there."""
        head = self._head
        before = len(head)
        head += lines
        if head.startswith(b"\r\n"):
            end = 0
        else:
            end = head.find(b"\r\n\r\n", max(0, before - 2))
            if end < 0:
                if len(head) > MAX_HEADER:
                    self._refuse(Reply(*HEADER_TOO_LONG))
                return 0, b""
            end += 2  # after the last field's CRLF
        if end > MAX_HEADER:  # complete, but too long, whatever the chunks were
            self._refuse(Reply(*HEADER_TOO_LONG))
            return 0, b""
        return end - before, self._headers_done(bytes(head[: max(0, end - 2)]))

    def _headers_done(self, header: bytes) -> bytes:
        self._head = None
        result = self._check_headers(header)
        if isinstance(result, Reply):
            self._refuse(result)
            return b""
        return result or b""

    def _drop_tail(self) -> None:
        """Forget the start of an over-long line, keeping a final CR that may begin the
        line's CRLF."""
        dropped, keep = self._tail, self._tail[-1:] == b"\r"
        if keep:
            dropped = dropped[:-1]
        self._tail = b"\r" if keep else b""
        self._midline = True
        self.size += len(dropped)
        self._dropped += len(dropped)
        if self.size > self._max_size:
            self._refuse_size()

    def _refuse(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply
            self._head = None

    def _refuse_size(self) -> None:
        if not self._over:
            self._over = True
            self.error = too_big(self._max_size)
            self._head = None
