"""What goes on the wire toward the next hop: DATA framing and envelope addresses.

Twisted's SMTPClient.transformChunk dot-stuffs each 16 KiB chunk on its own, so a "\\n."
split across chunks, or a first line of ".", goes out unstuffed and a strict receiver sees
two transactions (SMTP smuggling). DotStuffer keeps state across chunks instead.
"""

from __future__ import annotations

import re

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
