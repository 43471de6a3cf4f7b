"""SASL PLAIN (RFC 4616) and LOGIN exchanges for AUTH (RFC 4954), without I/O.

Malformed client input is a ``501 5.5.2`` Reply, never an exception that drops the
connection. PLAIN keeps the authorization identity so the session can refuse one that
differs from the login.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from mailrelay.reply import Reply

MAX_FIELD = 1024  # bytes of a username or password; longer is not a credential


@dataclass(frozen=True)
class Login:
    username: str
    password: str
    authzid: str = ""

    def __repr__(self) -> str:  # never show the password in a log or a traceback
        return f"Login(username={self.username!r})"


def decode_response(line: bytes) -> bytes:
    """A base64 client response; ``=`` is the empty one (RFC 4954 section 4)."""
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise Reply(501, "5.5.2", "Invalid base64 data")


def _text(value: bytes) -> str:
    if len(value) > MAX_FIELD:
        raise Reply(501, "5.5.2", "Authentication data too long")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise Reply(501, "5.5.2", "Authentication data is not UTF-8")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise Reply(501, "5.5.2", "Control characters in authentication data")
    return text


class Plain:
    """``[authzid] NUL authcid NUL passwd``, as the initial response or after ``334``."""

    def start(self, initial: bytes | None) -> bytes | Login:
        """The challenge to send (bytes) or, with an initial response, the Login."""
        return b"" if initial is None else self.next(initial)

    def next(self, response: bytes) -> bytes | Login:
        parts = decode_response(response).split(b"\0")
        if len(parts) != 3:
            raise Reply(501, "5.5.2", "Malformed PLAIN response")
        authzid, username, password = (_text(p) for p in parts)
        return Login(username, password, authzid)


class LoginMechanism:
    """The LOGIN mechanism: ``334 Username:``, ``334 Password:``; the username may come
    as the initial response."""

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> bytes | Login:
        return b"Username:" if initial is None else self.next(initial)

    def next(self, response: bytes) -> bytes | Login:
        value = _text(decode_response(response))
        if self._username is None:
            self._username = value
            return b"Password:"
        return Login(self._username, value)


MECHANISMS = {b"PLAIN": Plain, b"LOGIN": LoginMechanism}
