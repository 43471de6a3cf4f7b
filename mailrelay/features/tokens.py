"""Signed tokens for the tracking endpoint's links: open, click and unsubscribe.

A token is ``base64url(payload) "." base64url(tag)``: the payload is a compact JSON list
(kind, queue id, account, user, recipient, and for clicks the target URL), the tag is
HMAC-SHA256 over it, truncated to 128 bits. Without the key no valid token can be made or
altered, and tokens cannot be enumerated. The payload is signed, not encrypted: whoever
holds a link can read the recipient address it was made for (they are usually that
recipient).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from mailrelay.files import save_file

KEY_BYTES = 32
TAG_BYTES = 16
MAX_TOKEN = 8192  # longer input is refused before any work
_CONTEXT = b"mailrelay-token-v1\0"


class Kind(enum.StrEnum):
    OPEN = "o"
    CLICK = "c"
    UNSUBSCRIBE = "u"


@dataclass(frozen=True)
class Token:
    kind: Kind
    queue_id: str
    account: str
    user: str
    recipient: str
    url: str | None = None  # the click target; None for the other kinds


class TokenError(ValueError):
    """Not a token this relay made (forged, altered, truncated or of the wrong kind)."""


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the token key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_key_file(cls, path: str) -> TokenSigner:
        """Use the key in ``path``, making it (mode 0600) on first use. Blocking: call it
        at start-up."""
        return cls(load_or_create_key(path))

    def sign(self, token: Token) -> str:
        if (token.kind is Kind.CLICK) != (token.url is not None):
            raise ValueError("a click token, and only a click token, carries a URL")
        fields = [token.kind.value, token.queue_id, token.account, token.user, token.recipient]
        if token.url is not None:
            fields.append(token.url)
        payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._tag(payload))}"

    def verify(self, text: str, kind: Kind | None = None) -> Token:
        """The token's content; raises TokenError unless this key signed it (and it is of
        ``kind`` when given)."""
        if len(text) > MAX_TOKEN or text.count(".") != 1:
            raise TokenError("malformed token")
        payload_text, tag_text = text.split(".")
        try:
            payload, tag = _unb64(payload_text), _unb64(tag_text)
        except (binascii.Error, ValueError):
            raise TokenError("malformed token")
        if not hmac.compare_digest(tag, self._tag(payload)):
            raise TokenError("bad signature")
        try:  # signed with our key, so well-formed unless a future format reuses the key
            fields = json.loads(payload)
            token = Token(Kind(fields[0]), *fields[1:])
        except (ValueError, TypeError, IndexError):
            raise TokenError("unknown token format")
        if kind is not None and token.kind is not kind:
            raise TokenError(f"not a {kind.name.lower()} token")
        return token

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _CONTEXT + payload, hashlib.sha256).digest()[:TAG_BYTES]


def load_or_create_key(path: str) -> bytes:
    """Read the hex key in ``path``; if absent, make one atomically (two processes starting
    at once end up with the same key)."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    save_file(path, (secrets.token_hex(KEY_BYTES) + "\n").encode(), replace=False)
    return _read_key(path)


def _read_key(path: str) -> bytes:
    with open(path) as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: the token key is not hex text")
    if len(key) < 16:
        raise ValueError(f"{path}: the token key is shorter than 16 bytes")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii():
        raise ValueError("empty or non-ASCII")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # one spelling per token: no variants in the unused bits
        raise ValueError("non-canonical base64")
    return data
