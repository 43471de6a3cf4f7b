"""Signed tokens for the tracking endpoint's links: open, click and unsubscribe.

The payload of a token (mailrelay.signing) is a compact JSON list: kind, queue id, account,
user, recipient, and for clicks the target URL. Whoever holds a link can read the
recipient address it was made for (they are usually that recipient).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from mailrelay.signing import BadSignature, MalformedToken, Signer, load_or_create_key

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
        self._signer = Signer(key, _CONTEXT, "the token key")

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
        return self._signer.seal(payload)

    def verify(self, text: str, kind: Kind | None = None) -> Token:
        """The token's content; raises TokenError unless this key signed it (and it is of
        ``kind`` when given)."""
        try:
            payload = self._signer.open(text, MAX_TOKEN)
        except MalformedToken:
            raise TokenError("malformed token")
        except BadSignature:
            raise TokenError("bad signature")
        try:  # signed with our key, so well-formed unless a future format reuses the key
            fields = json.loads(payload)
            token = Token(Kind(fields[0]), *fields[1:])
        except (ValueError, TypeError, IndexError):
            raise TokenError("unknown token format")
        if kind is not None and token.kind is not kind:
            raise TokenError(f"not a {kind.name.lower()} token")
        return token
