"""Signed tokens for the links the relay hands out (tracking links, sender confirmation
links) and the secret key files they are signed with.

A token is ``base64url(payload) "." base64url(tag)``, unpadded and with one spelling: the
tag is HMAC-SHA256 over a context (one per use, so that a token made for one use never
passes for another) and the payload, truncated to 128 bits. Without the key no valid token
can be made or altered, and tokens cannot be enumerated. The payload is signed, not
encrypted: whoever holds a link can read it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from mailrelay.files import save_file

KEY_BYTES = 32  # what a new key file holds
MIN_KEY_BYTES = 16
TAG_BYTES = 16


class MalformedToken(ValueError):
    """Not in the token format at all (too long, no single ".", bad base64)."""


class BadSignature(ValueError):
    """Well-formed, but not signed with this key for this use (forged or altered)."""


class Signer:
    def __init__(self, key: bytes, context: bytes, name: str = "the key") -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"{name} must be at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self._context = context

    def tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, self._context + payload, hashlib.sha256).digest()[:TAG_BYTES]

    def seal(self, payload: bytes) -> str:
        """The token for ``payload``."""
        return f"{_b64(payload)}.{_b64(self.tag(payload))}"

    def open(self, text: str, max_length: int) -> bytes:
        """The payload of a token this key sealed for this use; longer input than
        ``max_length`` is refused before any work."""
        if len(text) > max_length or text.count(".") != 1:
            raise MalformedToken(text[:64])
        payload_text, tag_text = text.split(".")
        try:
            payload, tag = _unb64(payload_text), _unb64(tag_text)
        except (binascii.Error, ValueError):
            raise MalformedToken(text[:64])
        if not hmac.compare_digest(tag, self.tag(payload)):
            raise BadSignature(text[:64])
        return payload


def load_or_create_key(path: str) -> bytes:
    """Read the hex key in ``path``; if absent, make one (mode 0600) atomically: two
    processes starting at once end up with the same key. Blocking: call it at start-up."""
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
        raise ValueError(f"{path}: the key is not hex text")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: the key is shorter than {MIN_KEY_BYTES} bytes")
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
