"""VERP return paths: ``b+TOKEN@bounces.example.com``, one per message and recipient.

The token is the queue id, the recipient's place in the envelope and an HMAC-SHA256 tag
over them and the bounce domain, made with ``[bounces] key_file``: base32 in lower case
(remote servers may change the case of a local part; base32 reads the same either way),
37 characters, so the local part (39 octets) is within RFC 5321's 64. Without the key no
address can be made that the bounce listener would take: a forged or altered token, or
one made for another bounce domain, is refused at RCPT. What the token points to (the
user, the account, the client's envelope sender, the recipients) is recorded by delivery
in the return-path store (store.py) when the message is first sent.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from mailrelay.model import Envelope
from mailrelay.signing import Signer

PREFIX = "b+"
TAG_BYTES = 10  # 80 bits: a guess is checked online, one RCPT at a time
_VERSION = b"\x01"
_QUEUE_ID_BYTES = 9  # 18 hex digits (spool/queueid.py)
_INDEX_BYTES = 3  # the recipient's place in the envelope (max_recipients is at most 100000)
_PAYLOAD = 1 + _QUEUE_ID_BYTES + _INDEX_BYTES
_LOCAL = len(PREFIX) + len(base64.b32encode(bytes(TAG_BYTES + _PAYLOAD)).rstrip(b"="))


@dataclass(frozen=True)
class Token:
    """What a VERP address of the relay's names."""

    domain: str
    queue_id: str
    index: int  # of the recipient in the envelope's recipients


class Verp:
    def __init__(self, key: bytes) -> None:
        self._signer = Signer(key, b"mailrelay verp\0", "[bounces] key_file")

    def _tag(self, domain: str, payload: bytes) -> bytes:
        return self._signer.tag(domain.encode("ascii") + b"\0" + payload)[:TAG_BYTES]

    def address(self, envelope: Envelope, recipient: str) -> str | None:
        """The envelope sender for ``recipient``'s copy, or None when the message has no
        return path: no bounce domain, the null sender, or the relay's own mail."""
        domain = envelope.return_path
        if not (domain and envelope.sender and envelope.user and envelope.account):
            return None
        try:
            queue_id = bytes.fromhex(envelope.id)
            index = envelope.recipients.index(recipient)
        except ValueError:
            return None
        if len(queue_id) != _QUEUE_ID_BYTES or index >= 256 ** _INDEX_BYTES:
            return None
        payload = _VERSION + queue_id + index.to_bytes(_INDEX_BYTES, "big")
        return f"{PREFIX}{_b32(self._tag(domain, payload) + payload)}@{domain}"

    def open(self, address: str) -> Token | None:
        """What a VERP address of the relay's names; None for any other address (not the
        form, another key, another domain, altered)."""
        local, at, domain = address.rpartition("@")
        local, domain = local.lower(), domain.lower().rstrip(".")
        if not at or len(local) != _LOCAL or not local.startswith(PREFIX):
            return None
        try:
            data = _unb32(local[len(PREFIX):])
            domain.encode("ascii")
        except (binascii.Error, ValueError):
            return None
        tag, payload = data[:TAG_BYTES], data[TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(domain, payload)):
            return None
        if payload[:1] != _VERSION:
            return None
        return Token(domain, payload[1:1 + _QUEUE_ID_BYTES].hex(),
                     int.from_bytes(payload[1 + _QUEUE_ID_BYTES:], "big"))


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    if not text.isascii() or not text.isalnum():
        raise ValueError("not base32")
    data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    if _b32(data) != text:  # one spelling per token
        raise ValueError("non-canonical base32")
    return data
