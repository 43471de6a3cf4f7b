"""SMTP replies with enhanced status codes (RFC 3463), raised by policy and session code."""

from __future__ import annotations


class Reply(Exception):
    """A refusal (or temporary failure) to send to the client as one SMTP reply."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status  # e.g. "5.7.1"
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def line(self) -> str:
        """The reply text after the code, as Twisted's sendCode expects it."""
        return f"{self.status} {self.text}"
