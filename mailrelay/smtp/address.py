"""MAIL FROM / RCPT TO arguments: the path and its ESMTP parameters, checked strictly.

Twisted's Address class strips source routes, qualifies bare names with the server's own
hostname and accepts control characters inside quoted local parts; this parser does none of
that. An address is a dot-atom or quoted-string local part, ``@``, and a domain name in
ASCII (no address literals, no unqualified names); RFC 5321 4.5.3.1 length limits apply,
in octets.

With SMTPUTF8 (RFC 6531: the MAIL command's parameter, for MAIL and the transaction's
RCPTs) an address may also hold UTF-8: in the local part (RFC 6532's UTF8-non-ascii in
atext and qtext) and as U-labels in the domain, which must convert to A-labels (IDNA 2008,
scope.to_ascii_domain). The address is kept as the client wrote it (the domain
lower-cased; nothing is NFC-normalized: the local part is the receiving mailbox's to
interpret). Without SMTPUTF8 a non-ASCII address gets ``553 5.6.7`` (RFC 6531 3.5), and
bytes that are not UTF-8 are a syntax error either way.
"""

from __future__ import annotations

import re

from mailrelay.reply import Reply
from mailrelay.scope import ScopeError, is_domain, to_ascii_domain

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets

_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rb"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)
# qtext and quoted-pair, printable ASCII only (no CR, LF, NUL, tab or other controls).
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_MAILBOX = re.compile(rb"(?P<local>%s|%s)@(?P<domain>[^@<>\s]+)" % (_DOT_ATOM, _QUOTED))
# The same with UTF8-non-ascii (any byte >= 0x80; the whole is checked to be UTF-8 first).
_ATEXT_UTF8 = rb"(?:%s|[\x80-\xff])" % _ATEXT
_DOT_ATOM_UTF8 = rb"%s+(?:\.%s+)*" % (_ATEXT_UTF8, _ATEXT_UTF8)
_QUOTED_UTF8 = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"'
_MAILBOX_UTF8 = re.compile(rb"(?P<local>%s|%s)@(?P<domain>[^@<>\s]+)"
                           % (_DOT_ATOM_UTF8, _QUOTED_UTF8))
# "FROM:" / "TO:", optional blanks, then <path> (or a bare path), then parameters.
_ARG = re.compile(
    rb"(?P<key>FROM|TO):[ \t]*(?P<path><[^<>]*>|[^<>\s]+)(?P<params>(?:[ \t].*)?)", re.I
)
_PARAM = re.compile(rb"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")


def parse_mail(arg: bytes) -> tuple[str, dict[str, str | None]]:
    """``FROM:<a@b.example> SIZE=10`` -> ("a@b.example", {"SIZE": "10"}); "" is the null
    sender; with an SMTPUTF8 parameter the address may be UTF-8. Raises Reply (501 5.5.4
    syntax, 501 5.1.7 bad address, 553 5.6.7 UTF-8 without SMTPUTF8)."""
    return _parse(arg, b"FROM", "5.1.7", "sender", null_ok=True, utf8=None)


def parse_rcpt(arg: bytes, utf8: bool = False) -> tuple[str, dict[str, str | None]]:
    """``TO:<a@b.example>`` -> ("a@b.example", {}); ``utf8``: the transaction's MAIL had
    SMTPUTF8. Raises Reply (501 5.5.4, 501 5.1.3, 553 5.6.7)."""
    return _parse(arg, b"TO", "5.1.3", "recipient", null_ok=False, utf8=utf8)


def _parse(
    arg: bytes, key: bytes, status: str, what: str, null_ok: bool, utf8: bool | None
) -> tuple[str, dict[str, str | None]]:
    m = _ARG.fullmatch(arg.strip(b" \t"))
    if m is None or m.group("key").upper() != key:
        verb = "MAIL FROM" if key == b"FROM" else "RCPT TO"
        raise Reply(501, "5.5.4", f"Syntax: {verb}:<address>")
    path = m.group("path")
    if path.startswith(b"<"):
        path = path[1:-1]
    params = _params(m.group("params"))
    if utf8 is None:  # MAIL: its own parameter says
        utf8 = "SMTPUTF8" in params
    address = _address(path, status, what, null_ok, utf8)
    return address, params


def _address(path: bytes, status: str, what: str, null_ok: bool, utf8: bool = False) -> str:
    def bad(reason: str) -> Reply:
        return Reply(501, status, f"Bad {what} address syntax: {reason}")

    if not path:
        if null_ok:
            return ""
        raise bad("empty address")
    if len(path) + 2 > MAX_PATH:
        raise bad(f"longer than {MAX_PATH} characters")
    if any(b < 0x20 or b == 0x7F for b in path):
        raise bad("control characters")
    if not path.isascii():
        _utf8_allowed(path, what, utf8, bad)
    if path.startswith(b"@"):
        raise bad("source routes are not accepted")
    if b"@" not in path:
        raise bad("the address must be fully qualified (user@domain)")
    m = (_MAILBOX_UTF8 if utf8 else _MAILBOX).fullmatch(path)
    if m is None:
        raise bad("not a valid address")
    local, domain = m.group("local"), m.group("domain").decode("utf-8").lower()
    if len(local) > MAX_LOCAL:
        raise bad(f"local part longer than {MAX_LOCAL} octets")
    if len(domain.encode("utf-8")) > MAX_DOMAIN or not is_domain(_a_labels(domain)):
        raise bad(f"{domain} is not a fully qualified domain name")
    return f"{local.decode('utf-8')}@{domain}"


def _utf8_allowed(path: bytes, what: str, utf8: bool, bad) -> None:
    """A non-ASCII path needs SMTPUTF8 and must be UTF-8 without C1 controls."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not valid UTF-8")
    if not utf8:
        raise Reply(553, "5.6.7", f"Non-ASCII {what} address needs SMTPUTF8 (RFC 6531)")
    if any(not c.isprintable() or (c.isspace() and c != " ") for c in text):
        raise bad("control or space characters")


def _a_labels(domain: str) -> str:
    """The domain's A-label form ("" when it is not a valid IDNA name)."""
    try:
        return to_ascii_domain(domain)
    except ScopeError:
        return ""


def _params(text: bytes) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        m = _PARAM.fullmatch(item)
        if m is None:
            raise Reply(501, "5.5.4", "Bad parameter syntax")
        name = m.group("key").decode("ascii").upper()
        if name in params:
            raise Reply(501, "5.5.4", f"Parameter {name} given twice")
        value = m.group("value")
        params[name] = None if value is None else value.decode("ascii")
    return params
