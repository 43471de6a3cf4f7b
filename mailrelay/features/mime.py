"""Where a per-recipient transform may write in a message, and how to write there.

``prepare()`` parses a message once: the email package (compat32) gives content types,
parameters and defects; the entities' byte ranges are located here, so that
``Prepared.render()`` splices new bytes into the text parts it changes and leaves every
other byte as it was (headers, attachments, preamble, boundaries, epilogue). A message
that cannot be changed safely raises ``Unsafe`` with the reason, for the caller's log.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from email import message_from_bytes
from email.message import Message
from email.policy import compat32

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF

# A signature or an encryption covers the bytes we would change.
_SEALED = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
        "application/pgp-encrypted",
        "application/pgp-signature",
    }
)
_INLINE_PGP = "-----BEGIN PGP "
_IDENTITY = frozenset({"7bit", "8bit", "binary"})
_FIELD = re.compile(rb"[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


class Unsafe(Exception):
    """The message must go out unchanged; ``str(e)`` says why."""


@dataclass
class _Entity:
    msg: Message  # the email package's view: headers, content type, defects
    start: int  # first byte of the header block
    body: int  # first byte of the body (after the blank line)
    end: int  # one past the body's last byte (a boundary's leading CRLF excluded)
    children: list[_Entity] = field(default_factory=list)

    @property
    def ctype(self) -> str:
        return self.msg.get_content_type()

    @property
    def header_end(self) -> int:
        """One past the last header line's CRLF."""
        return self.body - 2


@dataclass(frozen=True)
class TextPart:
    """A text/plain or text/html body part, decoded, as edit functions see it."""

    subtype: str  # "plain" or "html"
    text: str  # the decoded content
    charset: str  # declared charset, lower case ("us-ascii" when none)
    cte: str  # Content-Transfer-Encoding, lower case
    newline: str  # the line ending the content uses
    entity: _Entity = field(repr=False, compare=False)
    boundaries: tuple[bytes, ...] = field(repr=False, compare=False)  # enclosing multiparts


Edit = Callable[[TextPart], str | None]  # new text, or None to leave the part alone


def chain(*edits: Edit) -> Edit:
    """One edit applying ``edits`` in order, each seeing the text the previous one made."""

    def edit(part: TextPart) -> str | None:
        original = part
        for step in edits:
            text = step(part)
            if text is not None:
                part = replace(part, text=text)
        return None if part is original else part.text

    return edit


class Prepared:
    """A message checked and located once; ``render`` makes each recipient's copy."""

    def __init__(self, raw: bytes, top: _Entity, parts: list[TextPart]) -> None:
        self.raw = raw
        self._top = top
        self.parts = parts

    def render(
        self,
        edit: Edit,
        add_headers: Sequence[tuple[str, str]] = (),
        drop_headers: Collection[str] = (),
    ) -> bytes:
        """The message with ``edit`` applied to each body part and the top-level header
        fields named in ``drop_headers`` (lower case) replaced by ``add_headers``.
        Raises Unsafe if a new part would collide with a boundary."""
        return b"".join(self.pieces(edit, add_headers, drop_headers))

    def pieces(
        self,
        edit: Edit,
        add_headers: Sequence[tuple[str, str]] = (),
        drop_headers: Collection[str] = (),
    ) -> list[bytes | memoryview]:
        """What ``render`` joins: views of the original bytes and the new ones between
        them, so that a copy costs only what it changes (``[raw]`` when nothing is)."""
        blocks: dict[int, _HeaderEdit] = {}
        splices: list[tuple[int, int, bytes]] = []
        if add_headers or drop_headers:
            top = blocks.setdefault(self._top.start, _HeaderEdit(self._top))
            top.drop.update(drop_headers)
            top.append.extend(_field(name, value) for name, value in add_headers)
        for part in self.parts:
            new_text = edit(part)
            if new_text is None or new_text == part.text:
                continue
            body, content_type, cte = _encode(self.raw, part, new_text)
            splices.append((part.entity.body, part.entity.end, body))
            if content_type is not None or cte is not None:
                block = blocks.setdefault(part.entity.start, _HeaderEdit(part.entity))
                if content_type is not None:
                    block.replace["content-type"] = _field("Content-Type", content_type)
                if cte is not None:
                    block.replace["content-transfer-encoding"] = _field(
                        "Content-Transfer-Encoding", cte
                    )
        for block in blocks.values():
            splices.append(block.splice(self.raw))
        if not splices:
            return [self.raw]
        splices.sort()
        raw = memoryview(self.raw)
        out: list[bytes | memoryview] = []
        pos = 0
        for start, end, data in splices:
            out.append(raw[pos:start])
            out.append(data)
            pos = end
        out.append(raw[pos:])
        return out


def prepare(raw: bytes) -> Prepared:
    """Check ``raw`` (CRLF lines, as in the spool) and find its body parts; raises Unsafe."""
    if raw.count(b"\n") != raw.count(CRLF) or raw.count(b"\r") != raw.count(CRLF):
        raise Unsafe("bare CR or LF in the message")
    msg = message_from_bytes(raw, policy=compat32)
    top = _locate(raw, msg, 0, len(raw))
    for entity in _walk(top):
        if entity.ctype in _SEALED:
            raise Unsafe(f"signed or encrypted ({entity.ctype})")
        if entity.msg.defects:
            raise Unsafe(f"parse defect: {type(entity.msg.defects[0]).__name__}")
    targets = _targets(top, ())
    if not targets:
        raise Unsafe("no text or HTML body part")
    return Prepared(raw, top, [_decode(raw, entity, bounds) for entity, bounds in targets])


def _locate(raw: bytes, msg: Message, start: int, end: int) -> _Entity:
    if raw.startswith(CRLF, start):
        body = start + 2
    else:
        blank = raw.find(b"\r\n\r\n", start, end)
        if blank < 0:
            raise Unsafe("no blank line after the headers")
        body = blank + 4
    entity = _Entity(msg, start, body, end)
    if msg.get_content_maintype() != "multipart":
        return entity
    boundary = msg.get_boundary()
    if not boundary:
        raise Unsafe("multipart without a boundary")
    try:
        bound = boundary.encode("ascii")
    except UnicodeEncodeError:
        raise Unsafe("non-ASCII boundary")
    # The CRLF before a delimiter belongs to it (RFC 2046 5.1.1); the body starts right
    # after the blank line's CRLF, so a delimiter on the first line is found too.
    delimiter = re.compile(rb"\r\n--" + re.escape(bound) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    spans: list[tuple[int, int]] = []
    part_start = None
    for m in delimiter.finditer(raw, body - 2, end):
        if part_start is not None:
            spans.append((part_start, m.start()))
        if m.group(1):
            break
        if not raw.startswith(CRLF, m.end()):
            raise Unsafe("boundary at the end of the message")
        part_start = m.end() + 2
    else:
        raise Unsafe("multipart without its closing boundary")
    payload = msg.get_payload()
    if not isinstance(payload, list) or len(payload) != len(spans):
        raise Unsafe("MIME structure does not match the parser's")
    entity.children = [
        _locate(raw, child, s, e) for child, (s, e) in zip(payload, spans, strict=True)
    ]
    return entity


def _walk(entity: _Entity):
    yield entity
    for child in entity.children:
        yield from _walk(child)


def _is_attachment(msg: Message) -> bool:
    disposition = (msg.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disposition == "attachment" or bool(msg.get_filename() or msg.get_param("name"))


def _targets(entity: _Entity, bounds: tuple[bytes, ...]) -> list[tuple[_Entity, tuple]]:
    """The parts that make up the message body as the reader sees it."""
    ctype = entity.ctype
    if _is_attachment(entity.msg):
        return []
    if ctype in ("text/plain", "text/html"):
        return [(entity, bounds)]
    if not entity.children:
        return []
    inner = (*bounds, entity.msg.get_boundary().encode("ascii"))
    if ctype == "multipart/alternative":  # every alternative is the whole body
        return [t for child in entity.children for t in _targets(child, inner)]
    if ctype == "multipart/related":  # the root part (RFC 2387: "start", else the first)
        start = entity.msg.get_param("start")
        roots = [c for c in entity.children if start and c.msg.get("Content-ID") == start]
        return _targets((roots or entity.children)[0], inner)
    if ctype == "multipart/mixed":  # the last body-like part: where the reader ends
        for child in reversed(entity.children):
            found = _targets(child, inner)
            if found:
                return found
        return []
    raise Unsafe(f"unknown structure ({ctype})")


def _decode(raw: bytes, entity: _Entity, bounds: tuple[bytes, ...]) -> TextPart:
    msg = entity.msg
    cte = (msg.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    region = raw[entity.body : entity.end]
    try:
        if cte in _IDENTITY:
            data = region
        elif cte == "quoted-printable":
            data = binascii.a2b_qp(region)
        elif cte == "base64":
            data = binascii.a2b_base64(region)
        else:
            raise Unsafe(f"unknown transfer encoding {cte!r}")
    except binascii.Error as e:
        raise Unsafe(f"bad {cte} content: {e}")
    charset = msg.get_content_charset() or "us-ascii"
    try:
        text = data.decode(codecs.lookup(charset).name)
    except LookupError:
        raise Unsafe(f"unknown charset {charset!r}")
    except UnicodeDecodeError:
        raise Unsafe(f"{msg.get_content_type()} part is not valid {charset}")
    if _INLINE_PGP in text:
        raise Unsafe("inline PGP")
    newline = "\n" if "\n" in text and "\r\n" not in text else "\r\n"
    return TextPart(msg.get_content_subtype(), text, charset, cte, newline, entity, bounds)


def _encode(raw: bytes, part: TextPart, text: str) -> tuple[bytes, str | None, str | None]:
    """The new body bytes, and the new Content-Type / Content-Transfer-Encoding if they
    change: the part keeps its charset when the text fits, else becomes UTF-8; it keeps its
    encoding unless 7bit/8bit no longer hold (then quoted-printable)."""
    charset, content_type = part.charset, None
    try:
        data = text.encode(codecs.lookup(charset).name)
    except UnicodeEncodeError:
        charset = "utf-8"
        data = text.encode(charset)
        holder = Message()
        holder["Content-Type"] = _unfold(part.entity.msg.get("Content-Type") or "text/plain")
        holder.set_param("charset", charset)
        content_type = holder["Content-Type"]
    cte = part.cte
    if cte in _IDENTITY:
        too_long = any(len(line) > MAX_LINE for line in data.split(b"\n"))
        if (cte == "7bit" and not data.isascii()) or (too_long and cte != "binary"):
            cte = "quoted-printable"
    if cte == "quoted-printable":
        lf = binascii.b2a_qp(data.replace(CRLF, b"\n"), istext=True)
        body = lf.replace(b"\r", b"=0D").replace(b"\n", CRLF)  # b2a_qp keeps a bare CR
    elif cte == "base64":
        body = base64.encodebytes(data).replace(b"\n", CRLF)
    else:
        body = data
    original = raw[part.entity.body : part.entity.end]
    body = body.rstrip(CRLF) + original[len(original.rstrip(CRLF)) :]
    for bound in part.boundaries:
        if (CRLF + body).find(CRLF + b"--" + bound) >= 0:
            raise Unsafe("the new text would contain a MIME boundary")
    return body, content_type, (cte if cte != part.cte else None)


class _HeaderEdit:
    """Changes to one header block: fields replaced or dropped, fields appended."""

    def __init__(self, entity: _Entity) -> None:
        self.entity = entity
        self.replace: dict[str, bytes] = {}
        self.drop: set[str] = set()
        self.append: list[bytes] = []

    def splice(self, raw: bytes) -> tuple[int, int, bytes]:
        start, end = self.entity.start, self.entity.header_end
        out, pos, done = [], start, set()
        while pos < end:
            m = _FIELD.match(raw, pos, end)
            if m is None:
                raise Unsafe("malformed header field")
            name = m.group().split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            if name in self.replace:
                if name not in done:
                    out.append(self.replace[name])
                    done.add(name)
            elif name not in self.drop:
                out.append(m.group())
            pos = m.end()
        out.extend(v for k, v in self.replace.items() if k not in done)
        out.extend(self.append)
        return start, end, b"".join(out)


def _field(name: str, value: str) -> bytes:
    try:
        return f"{name}: {value}".encode("ascii") + CRLF
    except UnicodeEncodeError:
        raise Unsafe(f"non-ASCII {name} header")


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


# ---- helpers for edit functions ----

_BODY_END = re.compile(r"</body\s*>", re.I)
_HTML_END = re.compile(r"</html\s*>", re.I)


def insert_html(html: str, snippet: str) -> str:
    """``snippet`` before the last ``</body>`` (else ``</html>``, else at the end)."""
    for pattern in (_BODY_END, _HTML_END):
        found = None
        for found in pattern.finditer(html):  # noqa: B007 - the last match is wanted
            pass
        if found is not None:
            return html[: found.start()] + snippet + html[found.start() :]
    content = html.rstrip("\r\n")
    return content + snippet + html[len(content) :]


def append_text(text: str, block: str, newline: str) -> str:
    """``block`` after the text, separated by an empty line, keeping the final line ends."""
    content = text.rstrip("\r\n")
    block = newline.join(block.strip("\r\n").splitlines())
    tail = text[len(content) :] or ""
    return f"{content}{newline}{newline}{block}{tail}" if content else f"{block}{tail}"
