"""The From: header of a submitted message, read as conservatively as a mail reader would.

Mail readers differ in how they parse a broken header, so anything that could be read two
ways is refused rather than guessed at: a message must have exactly one From: field, and
its value must parse without defects into at least one address. Every line of the header
section (up to the first empty line) that names a From field counts, also the obsolete
``From :`` spelling and lines a lenient parser would treat as the start of the body.

Bytes that are not UTF-8 are read as U+FFFD: an address with one is never in a scope, and
what the refusal's log line and the sender notification show can always be written. Line
breaks, controls and whitespace other than space and tab (the email parser drops
``x@doe\u00a0.com`` to ``x@doe.com``, which a mail reader shows otherwise) are refused.

A local part in UTF-8 (``jöhn@doe.com``) is an address only in an SMTPUTF8 message (RFC
6532); in any other it is malformed.
"""

from __future__ import annotations

import re
from email import errors
from email.policy import default as email_policy

_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Defects that do not make the address ambiguous: 8-bit bytes in a display name,
# obsolete but well-defined syntax (a source route, a comment between words).
_HARMLESS = (errors.UndecodableBytesDefect, errors.ObsoleteHeaderDefect)
_HARMLESS_UTF8 = (*_HARMLESS, errors.NonASCIILocalPartDefect)
# The usual forms, ``a@b.c``, ``<a@b.c>`` and ``Some Name <a@b.c>``, in characters the
# email parser takes verbatim (and never quotes): read without it, which is most of the
# cost of a small message's header check. Anything else goes through the parser.
_WORD = r"[A-Za-z0-9_+-]+"
_ADDR = rf"({_WORD}(?:\.{_WORD})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_SIMPLE = re.compile(rf"{_ADDR}|(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*)?<{_ADDR}>")
# Whitespace other than space and tab, and controls: read differently by different readers.
_ODD = re.compile(r"[^\S \t]|[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class HeaderError(ValueError):
    """The From: header cannot be read unambiguously; the text says why."""


def from_addresses(header: bytes, utf8: bool = False) -> list[str]:
    """The addresses of the From: field in ``header`` (CRLF lines, the header section of
    a message, without the empty line that ends it); ``utf8``: the message came with
    SMTPUTF8. Raises HeaderError."""
    values = []
    current: list[bytes] | None = None
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        m = _FIELD.match(line)
        if m and m.group(1).lower() == b"from":
            current = [line[m.end():]]
            values.append(current)
        else:
            current = None
    if not values:
        raise HeaderError("Message has no From: header")
    if len(values) > 1:
        raise HeaderError("Message has more than one From: header")
    text = b"".join(values[0]).decode("utf-8", "replace").strip(" \t")
    simple = _SIMPLE.fullmatch(text)
    if simple:
        return [simple.group(1) or simple.group(2)]
    if _ODD.search(text):
        raise HeaderError("Malformed From: header")
    return _parse(text, _HARMLESS_UTF8 if utf8 else _HARMLESS)


def _parse(text: str, harmless: tuple = _HARMLESS) -> list[str]:
    """The addresses of a From: value, by the email package's parser."""
    try:
        field = email_policy.header_factory("From", text)
        defects = [d for d in field.defects if not isinstance(d, harmless)]
        parsed = [(a.addr_spec, a.username, a.domain) for a in field.addresses]
    except Exception:  # the email package raises assorted errors on garbage
        raise HeaderError("Malformed From: header")
    if defects or not parsed or any(not user or not domain for _, user, domain in parsed):
        raise HeaderError("Malformed From: header")
    return [spec for spec, _, _ in parsed]
