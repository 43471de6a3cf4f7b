"""MAIL FROM / RCPT TO arguments: the path and its ESMTP parameters, checked strictly.

Twisted's Address class strips source routes, qualifies bare names with the server's own
hostname and accepts control characters inside quoted local parts; this parser does none of
that. An address is a dot-atom or quoted-string local part, ``@``, and a domain name in
ASCII (no address literals, no unqualified names); RFC 5321 4.5.3.1 length limits apply.
"""

from __future__ import annotations

import re

from mailrelay.reply import Reply
from mailrelay.scope import is_domain

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets

_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rb"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)
# qtext and quoted-pair, printable ASCII only (no CR, LF, NUL, tab or other controls).
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_MAILBOX = re.compile(rb"(?P<local>%s|%s)@(?P<domain>[^@<>\s]+)" % (_DOT_ATOM, _QUOTED))
# "FROM:" / "TO:", optional blanks, then <path> (or a bare path), then parameters.
_ARG = re.compile(
    rb"(?P<key>FROM|TO):[ \t]*(?P<path><[^<>]*>|[^<>\s]+)(?P<params>(?:[ \t].*)?)", re.I
)
_PARAM = re.compile(rb"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")


def parse_mail(arg: bytes) -> tuple[str, dict[str, str | None]]:
    """``FROM:<a@b.example> SIZE=10`` -> ("a@b.example", {"SIZE": "10"}); "" is the null
    sender. Raises Reply (501 5.5.4 syntax, 501 5.1.7 bad address)."""
    return _parse(arg, b"FROM", "5.1.7", "sender", null_ok=True)


def parse_rcpt(arg: bytes) -> tuple[str, dict[str, str | None]]:
    """``TO:<a@b.example>`` -> ("a@b.example", {}). Raises Reply (501 5.5.4, 501 5.1.3)."""
    return _parse(arg, b"TO", "5.1.3", "recipient", null_ok=False)


def _parse(
    arg: bytes, key: bytes, status: str, what: str, null_ok: bool
) -> tuple[str, dict[str, str | None]]:
    m = _ARG.fullmatch(arg.strip(b" \t"))
    if m is None or m.group("key").upper() != key:
        verb = "MAIL FROM" if key == b"FROM" else "RCPT TO"
        raise Reply(501, "5.5.4", f"Syntax: {verb}:<address>")
    path = m.group("path")
    if path.startswith(b"<"):
        path = path[1:-1]
    address = _address(path, status, what, null_ok)
    return address, _params(m.group("params"))


def _address(path: bytes, status: str, what: str, null_ok: bool) -> str:
    def bad(reason: str) -> Reply:
        return Reply(501, status, f"Bad {what} address syntax: {reason}")

    if not path:
        if null_ok:
            return ""
        raise bad("empty address")
    if len(path) + 2 > MAX_PATH:
        raise bad(f"longer than {MAX_PATH} characters")
    if any(b < 0x20 or b > 0x7E for b in path):
        raise bad("control or non-ASCII characters")
    if path.startswith(b"@"):
        raise bad("source routes are not accepted")
    if b"@" not in path:
        raise bad("the address must be fully qualified (user@domain)")
    m = _MAILBOX.fullmatch(path)
    if m is None:
        raise bad("not a valid address")
    local, domain = m.group("local").decode("ascii"), m.group("domain").decode("ascii")
    if len(local) > MAX_LOCAL:
        raise bad(f"local part longer than {MAX_LOCAL} characters")
    if len(domain) > MAX_DOMAIN or not is_domain(domain):
        raise bad(f"{domain} is not a fully qualified domain name")
    return f"{local}@{domain.lower()}"


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
