"""VERP return paths: ``b+TOKEN@bounces.example.com``, one per message and recipient.

The token carries what a bounce must be charged to (queue id, account, user, the client's
envelope sender, the recipient) and an HMAC-SHA256 tag over it and the bounce domain,
made with ``[bounces] key_file``. So the bounce listener needs no record of what was
sent, a token made for one domain is refused at another, and without the key no address
can be made that would suppress a recipient, count a bounce or reach a user: a forged or
altered token is refused at RCPT.

The token is base32 in lower case (a-z, 2-7): remote servers may change the case of a
local part, and base32 reads the same either way. The local part is longer than RFC
5321's 64 octets (about 70 for ``news@doe.com`` to ``bob@example.net``), as classic VERP
addresses (Postfix's, Mailman's) are; receivers take such senders. One that would be
longer than MAX_LOCAL octets is not made: that recipient gets the client's envelope
sender, and the log says so.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from mailrelay.model import Envelope
from mailrelay.signing import Signer

PREFIX = "b+"
TAG_BYTES = 10  # 80 bits: checked online, one RCPT at a time
MAX_LOCAL = 200  # octets of the local part; the whole address stays well under 320
_VERSION = b"\x01"
_QUEUE_ID_BYTES = 9  # 18 hex digits (spool/queueid.py)


@dataclass(frozen=True)
class ReturnPath:
    """What a VERP address says about the mail it was the envelope sender of."""

    domain: str
    queue_id: str
    account: str
    user: str
    sender: str  # the client's envelope sender
    recipient: str


class Verp:
    def __init__(self, key: bytes) -> None:
        self._signer = Signer(key, b"mailrelay verp\0", "[bounces] key_file")

    def _tag(self, domain: str, payload: bytes) -> bytes:
        return self._signer.tag(domain.encode("ascii") + b"\0" + payload)[:TAG_BYTES]

    def address(self, envelope: Envelope, recipient: str) -> str | None:
        """The envelope sender for ``recipient``'s copy, or None when the message has no
        return path (no bounce domain, the null sender, the relay's own mail) or the
        address would be too long."""
        domain = envelope.return_path
        if not (domain and envelope.sender and envelope.user and envelope.account):
            return None
        sender = "" if envelope.sender == envelope.user else envelope.sender
        try:
            queue_id = bytes.fromhex(envelope.id)
        except ValueError:
            return None
        if len(queue_id) != _QUEUE_ID_BYTES:
            return None
        fields = "\0".join((envelope.account, envelope.user, sender, recipient))
        payload = _VERSION + queue_id + fields.encode("utf-8")
        token = _b32(self._tag(domain, payload) + payload)
        if len(PREFIX) + len(token) > MAX_LOCAL:
            return None
        return f"{PREFIX}{token}@{domain}"

    def open(self, address: str) -> ReturnPath | None:
        """What a VERP address of ours says; None for any other address (not the form,
        another key, another domain, altered)."""
        local, at, domain = address.rpartition("@")
        local, domain = local.lower(), domain.lower().rstrip(".")
        if not at or not local.startswith(PREFIX) or len(local) > MAX_LOCAL:
            return None
        try:
            data = _unb32(local[len(PREFIX):])
            domain.encode("ascii")
        except (binascii.Error, ValueError):
            return None
        tag, payload = data[:TAG_BYTES], data[TAG_BYTES:]
        if len(payload) < 1 + _QUEUE_ID_BYTES or not hmac.compare_digest(
                tag, self._tag(domain, payload)):
            return None
        if payload[:1] != _VERSION:
            return None
        try:
            fields = payload[1 + _QUEUE_ID_BYTES:].decode("utf-8").split("\0")
        except UnicodeDecodeError:
            return None
        if len(fields) != 4:
            return None
        account, user, sender, recipient = fields
        return ReturnPath(domain, payload[1:1 + _QUEUE_ID_BYTES].hex(), account, user,
                          sender or user, recipient)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    if not text or not text.isascii() or not text.isalnum():
        raise ValueError("not base32")
    data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    if _b32(data) != text:  # one spelling per token
        raise ValueError("non-canonical base32")
    return data
