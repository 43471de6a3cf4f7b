"""VERP return paths: ``b+TOKEN@bounces.example.com``, one per message and recipient.

The token is the queue id, the recipient's place in the envelope and an HMAC-SHA256 tag
over them and the bounce domain, made with ``[bounces] key_file``: base32 in lower case
(remote servers may change the case of a local part; base32 reads the same either way),
42 characters for a queue id with a node part (37 for an older id without one), so the
local part (44 octets) is within RFC 5321's 64. Without the key no
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
from mailrelay.spool.queueid import is_node_id

PREFIX = "b+"
TAG_BYTES = 10  # 80 bits: a guess is checked online, one RCPT at a time
_QUEUE_ID_BYTES = 9  # the 18 hex digits of a queue id (spool/queueid.py)
_NODE_BYTES = 3  # the 4 base32hex digits of its node part (20 bits)
_INDEX_BYTES = 3  # the recipient's place in the envelope (max_recipients is at most 100000)
# Version byte -> whether the id has a node part: 1, ids made before node ids; 2, with one.
_VERSIONS = {b"\x01": 0, b"\x02": _NODE_BYTES}
_PAYLOADS = {1 + _QUEUE_ID_BYTES + node + _INDEX_BYTES: version
             for version, node in _VERSIONS.items()}
_LOCALS = {len(PREFIX) + len(base64.b32encode(bytes(TAG_BYTES + n)).rstrip(b"="))
           for n in _PAYLOADS}
_BASE32HEX = "0123456789abcdefghijklmnopqrstuv"


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
        hex_part, node = envelope.id[:2 * _QUEUE_ID_BYTES], envelope.id[2 * _QUEUE_ID_BYTES:]
        try:
            queue_id = bytes.fromhex(hex_part)
            index = envelope.recipients.index(recipient)
        except ValueError:
            return None
        if len(queue_id) != _QUEUE_ID_BYTES or index >= 256 ** _INDEX_BYTES:
            return None
        if node and not is_node_id(node):
            return None
        version = b"\x02" + queue_id + int(node, 32).to_bytes(_NODE_BYTES, "big") if node \
            else b"\x01" + queue_id
        payload = version + index.to_bytes(_INDEX_BYTES, "big")
        return f"{PREFIX}{_b32(self._tag(domain, payload) + payload)}@{domain}"

    def open(self, address: str) -> Token | None:
        """What a VERP address of the relay's names; None for any other address (not the
        form, another key, another domain, altered)."""
        local, at, domain = address.rpartition("@")
        local, domain = local.lower(), domain.lower().rstrip(".")
        if not at or len(local) not in _LOCALS or not local.startswith(PREFIX):
            return None
        try:
            data = _unb32(local[len(PREFIX):])
            domain.encode("ascii")
        except (binascii.Error, ValueError):
            return None
        tag, payload = data[:TAG_BYTES], data[TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(domain, payload)):
            return None
        node_bytes = _VERSIONS.get(payload[:1])
        if node_bytes is None or _PAYLOADS.get(len(payload)) != payload[:1]:
            return None
        queue_id = payload[1:1 + _QUEUE_ID_BYTES].hex()
        rest = payload[1 + _QUEUE_ID_BYTES:]
        if node_bytes:
            queue_id += _node_text(int.from_bytes(rest[:node_bytes], "big"))
        return Token(domain, queue_id, int.from_bytes(rest[node_bytes:], "big"))


def _node_text(number: int) -> str:
    """A node id's 4 base32hex digits (spool/queueid.py) from its number."""
    return "".join(_BASE32HEX[number >> shift & 31] for shift in (15, 10, 5, 0))


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    if not text.isascii() or not text.isalnum():
        raise ValueError("not base32")
    data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    if _b32(data) != text:  # one spelling per token
        raise ValueError("non-canonical base32")
    return data
