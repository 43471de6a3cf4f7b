"""What goes on the wire toward the next hop: DATA framing, envelope addresses, and what
the message needs of the next hop (SMTPUTF8, 8BITMIME).

Twisted's SMTPClient.transformChunk dot-stuffs each 16 KiB chunk on its own, so a "\\n."
split across chunks, or a first line of ".", goes out unstuffed and a strict receiver sees
two transactions (SMTP smuggling). DotStuffer keeps state across chunks instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

_LINE_END = re.compile(rb"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f<>]")


class DotStuffer:
    """Turns body bytes into DATA wire form, chunk by chunk.

    Every line ends in CRLF (a bare CR or LF becomes CRLF, so no receiver can read a line
    end where we did not mean one), every line starting with "." gets another ".", and
    end() closes the body with a lone "." line of our own. A CR at the end of a chunk is
    held back until the next byte shows whether it starts a CRLF.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        if not chunk:
            return b""
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            chunk = _LINE_END.sub(b"\r\n", chunk)
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        self._line_start = chunk.endswith(b"\r\n")
        return chunk

    def end(self) -> bytes:
        """The rest of the body and the terminator."""
        if self._held_cr:
            self._held_cr = False
            self._line_start = True
            return b"\r\n.\r\n"
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


def stuff(body: bytes) -> bytes:
    """A whole body in wire form, terminator included."""
    stuffer = DotStuffer()
    return stuffer.feed(body) + stuffer.end()


def address_problem(address: str) -> str | None:
    """Why ``address`` must not go into MAIL FROM/RCPT TO, or None.

    CR, LF and other control characters would let the address end the command line and
    inject new commands at the next hop; angle brackets would end the path early.
    """
    if _CONTROL.search(address):
        return "contains control characters or angle brackets"
    if len(address.encode("utf-8")) > 320:
        return "is too long"
    return None


SCAN_CHUNK = 1 << 20  # bytes read at a time by eight_bit


@dataclass(frozen=True)
class EightBit:
    """Where the message has bytes over 0x7F."""

    header: bool  # in the header section: UTF-8 headers of an SMTPUTF8 message (RFC 6532)
    anywhere: bool  # anywhere: an 8-bit message (RFC 6152)


def eight_bit(f: BinaryIO) -> EightBit:
    """Scan ``f`` from its position (the message: header section, empty line, body) and
    seek back there. Stops at the first 8-bit byte after the header section, so an 8-bit
    message costs little; a 7-bit one is read to its end (from the page cache: the spool
    file was just read or written)."""
    start = f.tell()
    try:
        first = f.read(SCAN_CHUNK)
        end = first.find(b"\r\n\r\n")
        header = not (first if end < 0 else first[:end]).isascii()
        anywhere = header or not first.isascii()
        while not anywhere:
            chunk = f.read(SCAN_CHUNK)
            if not chunk:
                break
            anywhere = not chunk.isascii()
        return EightBit(header, anywhere)
    finally:
        f.seek(start)
