"""DSN parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.

The session checks them (``take_mail``, ``take_rcpt``: smtp/server.py), the spool keeps
them in the envelope (model.Envelope ``ret``, ``envid`` and ``dsn``, decoded), the
delivery client passes them on, xtext-encoded again, to a next hop that offers DSN
(``mail_params``, ``rcpt_params``), and the delivery manager asks ``wants`` which notices
a recipient asked for. Every stage reads them, so they live here at the package root.

Stored forms: ``ret`` "FULL" or "HDRS"; ``envid`` the decoded text (printable ASCII);
per recipient ``{"notify": "SUCCESS,FAILURE", "orcpt": "rfc822;a@b.example"}``, each key
present only when given, NOTIFY upper-cased in the order given, ORCPT's address decoded
(``utf-8;`` addresses of RFC 6533 decoded to Unicode).
"""

from __future__ import annotations

import re

from mailrelay.reply import Reply

MAX_ENVID = 100  # characters of the ENVID value as sent (RFC 3461 4.4)
MAX_ORCPT = 500  # characters of the ORCPT value as sent: a path and its encoding
NOTIFY_KINDS = ("SUCCESS", "FAILURE", "DELAY")

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# RFC 6533 utf-8-addr-xtext: printable ASCII but "+", "=" and "\\", and \\x{HEX} for a
# Unicode character.
_UNITEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|\\x\{[0-9A-F]{2,6}\})+")
_UNITEXT_ESCAPE = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


def _bad(what: str) -> Reply:
    return Reply(501, "5.5.4", f"Bad {what} parameter")


def xtext_decode(text: str) -> bytes:
    """RFC 3461 4: ``+`` and two upper-case hex digits stand for one octet; every other
    character of ``!``..``~`` but ``+`` and ``=`` stands for itself. ValueError if malformed."""
    if not _XTEXT.fullmatch(text):
        raise ValueError("not xtext")
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1")


def xtext_encode(data: str | bytes) -> str:
    """The xtext form of ``data``: ``+``, ``=``, blanks, controls and 8-bit octets as
    ``+XX`` (a str is taken as UTF-8)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in raw)


def _printable(data: bytes) -> str | None:
    return data.decode("ascii") if all(0x20 <= b <= 0x7E for b in data) else None


def take_mail(params: dict[str, str | None]) -> tuple[dict[str, str], dict[str, str | None]]:
    """RET and ENVID out of MAIL's parameters: ({"ret": ..., "envid": ...} with what was
    given, the other parameters). Raises Reply 501 5.5.4 for a bad value. (A parameter
    given twice is refused by smtp/address.py already.)"""
    rest = dict(params)
    found: dict[str, str] = {}
    if "RET" in rest:
        ret = (rest.pop("RET") or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise Reply(501, "5.5.4", "RET must be FULL or HDRS")
        found["ret"] = ret
    if "ENVID" in rest:
        value = rest.pop("ENVID") or ""
        if not value or len(value) > MAX_ENVID:
            raise Reply(501, "5.5.4", f"ENVID must be 1 to {MAX_ENVID} characters")
        try:
            envid = _printable(xtext_decode(value))
        except ValueError:
            raise _bad("ENVID (not xtext)") from None
        if envid is None:
            raise _bad("ENVID (not printable ASCII)")
        found["envid"] = envid
    return found, rest


def take_rcpt(params: dict[str, str | None]) -> tuple[dict[str, str], dict[str, str | None]]:
    """NOTIFY and ORCPT out of RCPT's parameters: ({"notify": ..., "orcpt": ...} with what
    was given, the other parameters). Raises Reply 501 5.5.4 for a bad value."""
    rest = dict(params)
    found: dict[str, str] = {}
    if "NOTIFY" in rest:
        found["notify"] = _notify(rest.pop("NOTIFY") or "")
    if "ORCPT" in rest:
        found["orcpt"] = _orcpt(rest.pop("ORCPT") or "")
    return found, rest


def _notify(value: str) -> str:
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if "NEVER" in words:
        raise Reply(501, "5.5.4", "NOTIFY=NEVER cannot be combined with other values")
    if not all(w in NOTIFY_KINDS for w in words) or len(set(words)) != len(words):
        raise Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, "
                    "DELAY")
    return ",".join(words)


def _orcpt(value: str) -> str:
    kind, semicolon, encoded = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(kind) or not encoded \
            or len(value) > MAX_ORCPT:
        raise _bad("ORCPT (addr-type;address)")
    kind = kind.lower()
    if kind == "utf-8":
        address = _unitext_decode(encoded)
    else:
        try:
            address = _printable(xtext_decode(encoded))
        except ValueError:
            raise _bad("ORCPT (not xtext)") from None
    if not address:
        raise _bad("ORCPT (not a printable address)")
    return f"{kind};{address}"


def _unitext_decode(text: str) -> str | None:
    """RFC 6533 utf-8-addr-xtext: ``\\x{HEX}`` stands for one Unicode character."""
    if not _UNITEXT.fullmatch(text):
        return None
    try:
        decoded = _UNITEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    except ValueError:  # past U+10FFFF
        return None
    return None if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded) else decoded


def _unitext_encode(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: non-ASCII, ``\\``, ``+``, ``=`` and controls as
    ``\\x{HEX}``; the rest as itself (so valid xtext too)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "\\+=" else f"\\x{{{ord(c):X}}}"
                   for c in address)


def orcpt_value(orcpt: str) -> str:
    """The stored ORCPT as the parameter's value: ``rfc822;a+2Bb@c.example``."""
    kind, _, address = orcpt.partition(";")
    if kind == "utf-8":
        return f"{kind};{_unitext_encode(address)}"
    return f"{kind};{xtext_encode(address)}"


def orcpt_field(orcpt: str) -> str:
    """The stored ORCPT as a DSN's Original-Recipient field value (ASCII: an utf-8
    address in its RFC 6533 xtext form)."""
    kind, _, address = orcpt.partition(";")
    if kind == "utf-8":
        address = _unitext_encode(address)
    return f"{kind}; {address}"


def mail_params(ret: str | None, envid: str | None) -> str:
    """`` RET=HDRS ENVID=...`` for the next hop's MAIL ("" when neither was given)."""
    params = f" RET={ret}" if ret else ""
    return params + (f" ENVID={xtext_encode(envid)}" if envid else "")


def rcpt_params(request: dict[str, str] | None) -> str:
    """`` NOTIFY=... ORCPT=...`` for the next hop's RCPT ("" when neither was given)."""
    if not request:
        return ""
    params = f" NOTIFY={request['notify']}" if "notify" in request else ""
    return params + (f" ORCPT={orcpt_value(request['orcpt'])}" if "orcpt" in request else "")


def wants(request: dict[str, str] | None, kind: str) -> bool | None:
    """Whether a recipient asked for a notice of ``kind`` (SUCCESS, FAILURE, DELAY): True or
    False when its NOTIFY says, None when it gave none (the relay's defaults apply)."""
    notify = (request or {}).get("notify")
    if notify is None:
        return None
    return kind in notify.split(",")
