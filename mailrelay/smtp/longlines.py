"""A message with lines longer than RFC 5321 allows, made to conform before it is stored.

The data reader accepts lines of up to data.LONG_LINE octets and notes that it saw one
longer than 1000 (998 and the CRLF); ``conform`` then rewrites the message, so that what is
stored, and later sent on, has no line longer than that. It changes only the parts that
hold a long line, and every part's decoded content stays exactly what the client sent:

- a body part in 7bit, 8bit or binary (or without Content-Transfer-Encoding) becomes
  quoted-printable, long lines continuing after soft line breaks; its header gets
  ``Content-Transfer-Encoding: quoted-printable`` (and ``MIME-Version: 1.0`` when it is
  a message without one);
- a long line of a quoted-printable part gets soft line breaks (never inside an ``=XX``);
  a long line of a base64 part is cut into lines of 76 (decoders skip line breaks);
- a long header line is folded before a space or tab (unfolding gives it back exactly);
- a long line of a multipart's preamble or epilogue (text no reader shows) is cut, the
  rest going on lines that start with a space.

No line it writes can be taken for a MIME boundary: those start with ``--``, and a
quoted-printable line that would start with ``-`` starts with ``=2D`` instead.

What cannot be made to conform without changing what the recipient gets is refused with
``550 5.6.3``: a long line in signed content (multipart/signed: re-encoding would break
the signature), a header line with nowhere to fold it, a long line in a part with another
transfer encoding, or a long boundary line.

The structure is read as the email package reads it (compat32, as features/mime.py does):
a header ends at its empty line or at the first line that is not a header field; a
multipart's parts are delimited by ``--boundary`` lines; a delimiter of any enclosing
multipart ends a part; message/* parts (message/delivery-status aside) hold a message.

Two passes over the stored message, one line in memory at a time: the first finds the
parts to change, the second copies everything else as it is.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import BinaryIO

from mailrelay.reply import Reply

LIMIT = 998  # octets of a line before its CRLF (RFC 5321 4.5.3.1.6)
QP_WIDTH = 76  # octets of a quoted-printable line (RFC 2045 6.7)
B64_WIDTH = 76
MAX_PART_HEADER = 256 * 1024  # of a part's header, read to find its type
CRLF = b"\r\n"
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[ \t]")  # as email.feedparser
_DELIMITER_END = re.compile(rb"(--)?[ \t]*\r\n")
_CHUNK = 64 * 1024


def _refusal(why: str) -> Reply:
    return Reply(550, "5.6.3", f"Message refused: {why}")


@dataclass
class _Edit:
    start: int  # offsets in the old message
    end: int
    kind: str  # "header", "qp", "qpfold", "b64fold", "cut"
    add: bytes = b""  # header fields to add at the end of a header
    drop_cte: bool = False  # drop the header's Content-Transfer-Encoding fields


class _Lines:
    """The old message as CRLF lines, each with its offset."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = f.tell()  # where the next line starts
        self._next: bytes | None = None

    def peek(self) -> bytes:
        if self._next is None:
            self._next = self.f.readline()
        return self._next

    def take(self) -> bytes:
        line = self.peek()
        self._next = None
        self.pos += len(line)
        return line


class _Plan:
    """The first pass: the edits that make the message conform."""

    def __init__(self, f: BinaryIO) -> None:
        self.lines = _Lines(f)
        self.edits: list[_Edit] = []

    def entity(self, bounds: tuple[bytes, ...], sealed: bool, message: bool,
               default: str = "text/plain") -> None:
        """One entity, its header and body, up to the end or a delimiter in ``bounds``."""
        start = self.lines.pos
        fields, header_end, long_header = self.header(bounds)
        msg = BytesHeaderParser(policy=compat32).parsebytes(fields)
        msg.set_default_type(default)
        if long_header and sealed:
            raise _refusal("a header line longer than 998 octets in signed content")
        edit = _Edit(start, header_end, "header") if long_header else None
        if edit is not None:
            self.edits.append(edit)
        ctype, boundary = msg.get_content_type(), msg.get_boundary()
        if msg.get_content_maintype() == "multipart" and boundary is not None:
            try:
                delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
            except UnicodeEncodeError:
                raise _refusal("a MIME boundary that is not ASCII")
            inner = (*bounds, delimiter)
            digest = ctype == "multipart/digest"
            self.text(inner, sealed)  # the preamble
            index = 0
            while True:
                found = _delimiter(self.lines.peek(), inner)
                if found is None or found[0] != delimiter:
                    return  # the end, or an enclosing delimiter: no closing one
                self.lines.take()
                if found[1]:
                    break
                signed = ctype == "multipart/signed" and index == 0
                self.entity(inner, sealed or signed, False,
                            "message/rfc822" if digest else "text/plain")
                index += 1
            self.text(bounds, sealed)  # the epilogue
        elif msg.get_content_maintype() == "message" and ctype != "message/delivery-status":
            self.entity(bounds, sealed, True)
        else:
            self.leaf(msg, bounds, sealed, message, start, header_end, edit)

    def header(self, bounds: tuple[bytes, ...]) -> tuple[bytes, int, bool]:
        """A header's fields (as much as is needed to read them), where they end (before
        the empty line), and whether a line is too long. The empty line is taken."""
        fields, size, long = [], 0, False
        while True:
            line = self.lines.peek()
            if line == CRLF:
                end = self.lines.pos
                self.lines.take()
                return b"".join(fields), end, long
            if not line or _delimiter(line, bounds) or not _HEADER_LINE.match(line):
                return b"".join(fields), self.lines.pos, long
            self.lines.take()
            long = long or len(line) > LIMIT + 2
            if size < MAX_PART_HEADER:
                fields.append(line)
                size += len(line)

    def body(self, bounds: tuple[bytes, ...]) -> tuple[int, int, bool]:
        """Lines up to the end or a delimiter: where they start and end, and whether one
        is too long."""
        start, long = self.lines.pos, False
        while True:
            line = self.lines.peek()
            if not line or (line[:2] == b"--" and _delimiter(line, bounds)):
                return start, self.lines.pos, long
            self.lines.take()
            if len(line) > LIMIT + 2:
                long = True

    def text(self, bounds: tuple[bytes, ...], sealed: bool) -> None:
        """A preamble or an epilogue."""
        start, end, long = self.body(bounds)
        if long:
            if sealed:
                raise _refusal("a line longer than 998 octets in signed content")
            self.edits.append(_Edit(start, end, "cut"))

    def leaf(self, msg: Message, bounds: tuple[bytes, ...], sealed: bool, message: bool,
             header_start: int, header_end: int, edit: _Edit | None) -> None:
        start, end, long = self.body(bounds)
        if not long:
            return
        if sealed:
            raise _refusal("a line longer than 998 octets in signed content (re-encoding "
                           "it would break the signature)")
        cte = (msg.get("Content-Transfer-Encoding") or "7bit").strip().lower()
        if cte == "base64":
            self.edits.append(_Edit(start, end, "b64fold"))
        elif cte == "quoted-printable":
            self.edits.append(_Edit(start, end, "qpfold"))
        elif cte in ("7bit", "8bit", "binary"):
            self.edits.append(_Edit(start, end, "qp"))
            if edit is None:
                edit = _Edit(header_start, header_end, "header")
                self.edits.append(edit)
            edit.drop_cte = True
            edit.add = b"Content-Transfer-Encoding: quoted-printable\r\n"
            if message and msg.get("MIME-Version") is None:
                edit.add = b"MIME-Version: 1.0\r\n" + edit.add
        else:
            raise _refusal(f"a line longer than 998 octets in a part in {cte[:40]!r}")


def _delimiter(line: bytes, bounds: tuple[bytes, ...]) -> tuple[bytes, bool] | None:
    """The delimiter of ``bounds`` that ``line`` is, and whether it is a closing one."""
    if line[:2] != b"--":
        return None
    for delimiter in reversed(bounds):
        if line.startswith(delimiter):
            m = _DELIMITER_END.fullmatch(line, len(delimiter))
            if m is not None:
                if len(line) > LIMIT + 2:
                    raise _refusal("a MIME boundary line longer than 998 octets")
                return delimiter, m.group(1) is not None
    return None


def plan(f: BinaryIO) -> list[_Edit]:
    """The edits for the message read from ``f`` (from where it stands)."""
    p = _Plan(f)
    p.entity((), False, True)
    # A header edit goes before a body edit at the same place (a part with no header).
    return sorted(p.edits, key=lambda e: (e.start, e.kind != "header"))


def conform(old: BinaryIO, write: Callable[[bytes], None]) -> None:
    """Write the message read from ``old`` (a seekable file, from where it stands) to
    ``write`` with every line at most 998 octets long; raises Reply (550 5.6.3) when that
    cannot be done without changing what the recipient gets."""
    base = old.tell()
    edits = plan(old)
    old.seek(base)
    out = _Buffered(write)
    pos = base
    for edit in edits:
        _copy(old, edit.start - pos, out)
        if edit.kind == "header":
            out.write(_header(old.read(edit.end - edit.start), edit))
        else:
            fix = _FIXES[edit.kind]
            left = edit.end - edit.start
            while left > 0:
                line = old.readline()
                left -= len(line)
                out.write(fix(line[:-2]) if len(line) > LIMIT + 2 or edit.kind == "qp"
                          else line)
        pos = edit.end
    _copy(old, -1, out)
    out.flush()


class _Buffered:
    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._write(b"".join(self._parts))
            self._parts, self._size = [], 0


def _copy(f: BinaryIO, size: int, out: _Buffered) -> None:
    """``size`` bytes (all that is left when negative) from ``f`` to ``out``."""
    while size:
        data = f.read(_CHUNK if size < 0 else min(size, _CHUNK))
        if not data:
            return
        out.write(data)
        size -= len(data)


def _header(block: bytes, edit: _Edit) -> bytes:
    """A header's field lines with long ones folded, and the edit's fields changed."""
    out: list[bytes] = []
    dropping = False
    for line in block.split(CRLF)[:-1]:
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().lower()
            dropping = edit.drop_cte and name == b"content-transfer-encoding"
        if not dropping:
            out.extend(_fold(line) if len(line) > LIMIT else [line])
    out.append(b"")
    return CRLF.join(out) + edit.add


def _fold(line: bytes) -> list[bytes]:
    """A header line as lines of at most LIMIT, each after the first starting with the
    space or tab it was folded before."""
    pieces = []
    while len(line) > LIMIT:
        cut = max(line.rfind(b" ", 1, LIMIT + 1), line.rfind(b"\t", 1, LIMIT + 1))
        if cut < 1 or not line[:cut].strip(b" \t"):
            raise _refusal("a header line longer than 998 octets with no space to fold it at")
        pieces.append(line[:cut])
        line = line[cut:]
    pieces.append(line)
    return pieces


def _qp_lines(encoded: bytes) -> bytes:
    """One quoted-printable line as lines of at most QP_WIDTH with soft line breaks, never
    cut inside an ``=XX``, none starting with ``-``."""
    out, pos, n = [], 0, len(encoded)
    while True:
        lead = b""
        if encoded.startswith(b"-", pos):
            lead, pos = b"=2D", pos + 1
        if len(lead) + n - pos <= QP_WIDTH:
            out.append(lead + encoded[pos:] + CRLF)
            return b"".join(out)
        cut = pos + QP_WIDTH - 1 - len(lead)  # room for the soft break's "="
        escape = encoded.rfind(b"=", cut - 2, cut)
        if escape > pos:
            cut = escape
        out.append(lead + encoded[pos:cut] + b"=" + CRLF)
        pos = cut


def _to_qp(line: bytes) -> bytes:
    # b2a_qp encodes "=", controls, 8-bit bytes and a final space or tab; its own soft
    # breaks come out, for _qp_lines to cut where it may.
    return _qp_lines(binascii.b2a_qp(line).replace(b"=\n", b""))


def _b64_lines(line: bytes) -> bytes:
    out, pos = [], 0
    while len(line) - pos > B64_WIDTH:
        cut = pos + B64_WIDTH
        while line[cut:cut + 1] == b"-" and cut > pos + 1:  # not base64: keep it off a line start
            cut -= 1
        out.append(line[pos:cut])
        pos = cut
    out.append(line[pos:])
    return CRLF.join(out) + CRLF


def _cut(line: bytes) -> bytes:
    out = [line[:LIMIT]]
    out += [b" " + line[i:i + LIMIT - 1] for i in range(LIMIT, len(line), LIMIT - 1)]
    return CRLF.join(out) + CRLF


_FIXES = {"qp": _to_qp, "qpfold": _qp_lines, "b64fold": _b64_lines, "cut": _cut}
