"""The delivery state of one queued message: what `state/<id>.json` holds.

Plain dataclasses with JSON round trips; the spool stores them, delivery decides them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class RecipientStatus(enum.StrEnum):
    PENDING = "pending"  # not yet delivered: to be tried again
    SENT = "sent"  # accepted by the remote server (2xx)
    FAILED = "failed"  # refused for good (5xx) or expired: bounced


@dataclass
class RecipientState:
    status: RecipientStatus = RecipientStatus.PENDING
    code: int | None = None  # the last SMTP reply code, None before any attempt
    text: str = ""  # the last reply text or connection error
    remote: str | None = None  # the host that gave it

    def to_json(self) -> dict:
        return {"status": str(self.status), "code": self.code, "text": self.text,
                "remote": self.remote}

    @classmethod
    def from_json(cls, data: dict) -> RecipientState:
        return cls(status=RecipientStatus(data.get("status", "pending")),
                   code=data.get("code"), text=data.get("text", ""),
                   remote=data.get("remote"))


@dataclass
class DeliveryState:
    attempts: int = 0
    first_attempt: float | None = None  # unix time of the first attempt
    next_attempt: float | None = None  # unix time the scheduler may try again
    last_error: str = ""
    recipients: dict[str, RecipientState] = field(default_factory=dict)

    @classmethod
    def fresh(cls, recipients: Iterable[str]) -> DeliveryState:
        """The state before the first attempt: every recipient pending."""
        return cls(recipients={r: RecipientState() for r in recipients})

    def _with(self, status: RecipientStatus) -> list[str]:
        return [r for r, s in self.recipients.items() if s.status is status]

    def pending(self) -> list[str]:
        return self._with(RecipientStatus.PENDING)

    def sent(self) -> list[str]:
        return self._with(RecipientStatus.SENT)

    def failed(self) -> list[str]:
        return self._with(RecipientStatus.FAILED)

    @property
    def done(self) -> bool:
        """No recipient pending: the message can leave the spool."""
        return not self.pending()

    def to_json(self) -> dict:
        return {"attempts": self.attempts, "first_attempt": self.first_attempt,
                "next_attempt": self.next_attempt, "last_error": self.last_error,
                "recipients": {r: s.to_json() for r, s in self.recipients.items()}}

    @classmethod
    def from_json(cls, data: dict) -> DeliveryState:
        return cls(attempts=int(data.get("attempts", 0)),
                   first_attempt=data.get("first_attempt"),
                   next_attempt=data.get("next_attempt"),
                   last_error=data.get("last_error", ""),
                   recipients={r: RecipientState.from_json(s)
                               for r, s in data.get("recipients", {}).items()})
