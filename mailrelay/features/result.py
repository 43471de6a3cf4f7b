"""What a message transform returns: the bytes to send and whether they changed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    data: bytes  # the copy to send (the original bytes when nothing was changed)
    changed: bool
    reason: str | None = None  # why the message was left unchanged, for the log
