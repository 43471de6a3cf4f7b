"""The DATA phase, read one network chunk at a time.

Decisions (RFC 5321 2.3.8, 4.1.1.4, 4.5.2, 4.5.3.1.6):

- Only ``CRLF . CRLF`` ends the data; the CRLF of the DATA command counts, so a first
  line of ``.`` ends it too. Leading dots are unstuffed.
- A bare CR or bare LF anywhere, or a NUL, refuses the message (``550 5.6.0``) once the end
  arrives: nothing is kept, because a server further along could read such a byte as a line
  end and find a second message in this one (SMTP smuggling).
- A line over 1000 octets with its CRLF refuses the message (``500 5.5.2``) once the end
  arrives; the rest is read and discarded, never taken for commands. Only the start of an
  unfinished line is held, and never more than one line's worth, so an endless line does
  not grow memory.
- Over ``max_size`` bytes (as received, after unstuffing) the message is refused
  (``552 5.3.4``) and nothing more is written.
- The header section (up to the first empty line, at most MAX_HEADER bytes) is collected
  as it streams and handed to ``check_headers`` once complete.

The first refusal found wins; after it the data is only scanned for its end.
All work is per chunk (``bytes.find``/``count``/``replace``/``split``), none per line in
Python.
"""

from __future__ import annotations

from collections.abc import Callable

from mailrelay.smtp.reply import Reply

MAX_LINE = 1000  # octets, including the CRLF
MAX_HEADER = 256 * 1024
_END = b"\r\n.\r\n"

BARE_NEWLINE = Reply(550, "5.6.0", "Message refused: bare CR or LF (lines must end in CRLF)")
NUL = Reply(550, "5.6.0", "Message refused: NUL character in the data")
LINE_TOO_LONG = Reply(500, "5.5.2", f"Message refused: line longer than {MAX_LINE} octets")
HEADER_TOO_LONG = Reply(552, "5.3.4", f"Message header section longer than {MAX_HEADER} bytes")


def _lines_fit(lines: bytes) -> bool:
    """No line of ``lines`` (complete CRLF lines, from a line start) is over MAX_LINE: each
    window of MAX_LINE bytes from a line start holds the LF that ends that line, and the
    next window starts after the last LF found (a few steps for a whole chunk)."""
    start, end = 0, len(lines)
    while start < end:
        last = lines.rfind(b"\n", start, start + MAX_LINE)
        if last < 0:
            return False
        start = last + 1
    return True


class DataReader:
    """Finds the end of the data, checks it, and passes the message on to ``write``.

    ``write(bytes)`` receives the message as CRLF lines, unstuffed, while no refusal has
    been found; ``check_headers(bytes)`` gets the header section (CRLF lines, without the
    empty line ending it) and returns a Reply to refuse the message, or None.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        max_size: int,
        check_headers: Callable[[bytes], Reply | None],
    ) -> None:
        self._write = write
        self._max_size = max_size
        self._check_headers = check_headers
        self.size = 0  # message bytes received, unstuffed
        self.error: Reply | None = None
        self._tail = b""  # the unfinished line: starts a line unless _midline
        self._midline = False  # the start of the current line was discarded (too long)
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
        if self.error is None:
            self._lines(lines)
        if end < 0:
            if len(self._tail) > MAX_LINE:
                self._refuse(LINE_TOO_LONG)
                self._drop_tail()
            elif lines:
                self._midline = False
            return -1
        self._tail, self._midline = b"", False
        if self.error is None and self._head is not None:
            self._headers_done(bytes(self._head))
        return end - tail

    def _lines(self, lines: bytes) -> None:
        """Complete CRLF lines, starting at a line start unless _midline."""
        if not lines:
            return
        crlf = lines.count(b"\r\n")
        if lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
            return self._refuse(BARE_NEWLINE)
        if b"\0" in lines:
            return self._refuse(NUL)
        if not _lines_fit(lines):
            return self._refuse(LINE_TOO_LONG)
        if not self._midline and lines.startswith(b"."):
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", b"\r\n")
        self.size += len(lines)
        if self.size > self._max_size:
            return self._refuse(
                Reply(552, "5.3.4", f"Message size exceeds fixed limit of {self._max_size} bytes")
            )
        if self._head is not None:
            self._collect_header(lines)
            if self.error is not None:
                return
        self._write(lines)

    def _collect_header(self, lines: bytes) -> None:
        head = self._head
        start = max(0, len(head) - 2)
        head += lines
        if head.startswith(b"\r\n"):
            end = 0
        else:
            end = head.find(b"\r\n\r\n", start)
            if end < 0:
                if len(head) > MAX_HEADER:
                    self._refuse(HEADER_TOO_LONG)
                return
        self._headers_done(bytes(head[:end]))

    def _headers_done(self, header: bytes) -> None:
        self._head = None
        refusal = self._check_headers(header)
        if refusal is not None:
            self._refuse(refusal)

    def _drop_tail(self) -> None:
        """Forget the start of an over-long line, keeping a final CR that may begin the
        line's CRLF, and check what is dropped for bare CR/LF and NUL."""
        dropped, keep = self._tail, self._tail[-1:] == b"\r"
        if keep:
            dropped = dropped[:-1]
        if b"\r" in dropped or b"\n" in dropped:
            self._refuse(BARE_NEWLINE)
        elif b"\0" in dropped:
            self._refuse(NUL)
        self._tail = b"\r" if keep else b""
        self._midline = True

    def _refuse(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply
            self._head = None
