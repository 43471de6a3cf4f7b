"""The URLs a recipient's copy points at: the relay's tracking endpoint with signed tokens."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from mailrelay.features.tokens import Kind, Token, TokenSigner


@dataclass(frozen=True)
class Recipient:
    """Whom one copy of a message is for: what every token of that copy carries."""

    queue_id: str
    account: str
    user: str
    recipient: str

    def token(self, kind: Kind, url: str | None = None) -> Token:
        return Token(kind, self.queue_id, self.account, self.user, self.recipient, url)


class Links:
    """``base_url`` is where the tracking listener is reached from outside, e.g.
    ``https://track.example.com`` (or with a path prefix behind a reverse proxy)."""

    def __init__(
        self, signer: TokenSigner, base_url: str, unsubscribe_mailto: str | None = None
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError(f"base URL {base_url!r} is not http(s)")
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self.unsubscribe_mailto = unsubscribe_mailto

    def open_url(self, r: Recipient) -> str:
        return f"{self.base_url}/o/{self.signer.sign(r.token(Kind.OPEN))}"

    def click_url(self, r: Recipient, target: str) -> str:
        return f"{self.base_url}/c/{self.signer.sign(r.token(Kind.CLICK, target))}"

    def unsubscribe_url(self, r: Recipient) -> str:
        return f"{self.base_url}/u/{self.signer.sign(r.token(Kind.UNSUBSCRIBE))}"

    def mailto(self, r: Recipient) -> str | None:
        """``mailto:ADDRESS?subject=unsubscribe%20TOKEN`` when an address is configured:
        whoever reads that mailbox can act on the token."""
        if not self.unsubscribe_mailto:
            return None
        token = self.signer.sign(r.token(Kind.UNSUBSCRIBE))
        return f"mailto:{self.unsubscribe_mailto}?subject={quote('unsubscribe ' + token)}"

    def is_ours(self, url: str) -> bool:
        return url.startswith(self.base_url + "/")
