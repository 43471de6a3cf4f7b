"""What one delivery attempt makes of a message's state: pure functions, no I/O.

``fold`` takes the state the message had, the results of the attempt (one per recipient
tried: code, text, remote host), the recipients left out as suppressed, the time, the
retry policy and a jitter factor, and returns the next state with the recipients to
bounce now, those to send a delay notification for, and the word the log gives each
result. It reads no clock and draws no random number (the caller passes both in) and
changes nothing it is given, so every retry rule can be checked without a reactor:

- 2xx: the recipient is sent; 5xx: failed, bounced; 4xx (or a connection error, which
  the client reports as 4xx): still pending, its reply is the message's ``last_error``.
- Past ``lifetime`` after the message was received, every pending recipient fails with
  4.4.7, its last error kept in the text, and is bounced.
- Otherwise the next attempt is ``retry_first`` doubled per attempt made, capped at
  ``retry_max`` and at the expiry, times the jitter (0.9-1.0: restarted relays do not
  retry in step).
- A delay notification goes out once per recipient, at the first attempt at or after
  its threshold (the one that was scheduled before the threshold, or the first; an
  attempt before the threshold schedules the next one no later than it): for a
  recipient whose NOTIFY (RFC 3461) lists DELAY, ``dsn_delay_warning``; for one that
  gave no NOTIFY, ``delay_warning``; never for any other (``notify_delay`` says which).

The state's recipient entries are shared with the result where they do not change; no
caller changes one in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from mailrelay.delivery.client import Result
from mailrelay.spool.state import DeliveryState, RecipientState, RecipientStatus

SUPPRESSED = "suppressed: on the suppression list, not delivered (no bounce)"
JITTER = (0.9, 1.0)  # the range the caller draws the jitter factor from
_WORD = {RecipientStatus.SENT: "sent", RecipientStatus.FAILED: "bounced",
         RecipientStatus.PENDING: "deferred"}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_first: float = 60.0  # seconds before the first retry
    retry_max: float = 3600.0  # the longest wait between two attempts
    lifetime: float = 5 * 86400.0  # seconds after reception before the message expires
    delay_warning: float = 0.0  # seconds after reception to warn the sender (0: never)
    dsn_delay_warning: float = 4 * 3600.0  # the same for NOTIFY=DELAY (0: never)

    def warn_after(self, asked: bool | None) -> float:
        """The delay warning's threshold for a recipient whose NOTIFY asked for DELAY
        (True), asked for other notices only (False), or was not given (None)."""
        if asked is None:
            return self.delay_warning
        return self.dsn_delay_warning if asked else 0.0


class Next(NamedTuple):
    """What an attempt made of a message."""

    state: DeliveryState  # next_attempt None when no recipient is pending
    failed: list[str]  # recipients failed for good now: to bounce
    delayed: list[str]  # recipients to send a delay notification for
    logged: list[tuple[Result, str]]  # each result and its word: sent, bounced, ...


def backoff(attempts: int, policy: RetryPolicy, jitter: float) -> float:
    """Seconds to wait after the ``attempts``-th attempt."""
    doubled = policy.retry_first * 2 ** min(max(attempts - 1, 0), 32)
    return min(doubled, policy.retry_max) * jitter


def fold(state: DeliveryState, results: Sequence[Result], *, now: float,
         received_at: float, due: float | None, policy: RetryPolicy, jitter: float,
         suppressed: Sequence[str] = (),
         notify_delay: Callable[[str], bool | None] | None = None) -> Next | None:
    """The next state after an attempt, or None when it tried nothing and nothing is
    left to record (stopped before any recipient was tried). ``due``: when the attempt
    was scheduled for (None: the first attempt); ``notify_delay``: whether a recipient's
    NOTIFY lists DELAY (None: no NOTIFY, the default for every recipient)."""
    if not (results or suppressed or state.done):
        return None
    recipients = dict(state.recipients)
    attempts, first_attempt, last_error = state.attempts, state.first_attempt, state.last_error
    failed: list[str] = []
    logged: list[tuple[Result, str]] = []
    for rcpt in suppressed:  # done for good, without a bounce
        old = recipients.get(rcpt)
        recipients[rcpt] = RecipientState(RecipientStatus.FAILED, None, SUPPRESSED,
                                          old.remote if old else None)
    if results:
        attempts += 1
        first_attempt = first_attempt or now
        last_error = ""
    for result in results:
        if result.sent:
            status = RecipientStatus.SENT
        elif result.permanent:
            status = RecipientStatus.FAILED
            failed.append(result.recipient)
        else:
            old = recipients.get(result.recipient)
            status = old.status if old else RecipientStatus.PENDING
            last_error = f"{result.code} {result.text}"
        recipients[result.recipient] = RecipientState(status, result.code, result.text,
                                                      result.remote)
        logged.append((result, _WORD[status]))
    expiry = received_at + policy.lifetime
    pending = [r for r, rs in recipients.items() if rs.status is RecipientStatus.PENDING]
    if pending and now >= expiry:
        days = policy.lifetime / 86400
        for rcpt in pending:
            old = recipients[rcpt]
            text = (f"4.4.7 delivery time expired after {days:g} days; last error: "
                    f"{old.code or ''} {old.text}".strip())
            recipients[rcpt] = RecipientState(RecipientStatus.FAILED, old.code, text,
                                              old.remote)
            failed.append(rcpt)
            logged.append((Result(rcpt, old.code or 451, text, old.remote), "expired"))
        pending = []
    delayed: list[str] = []
    next_attempt = None
    if pending:
        next_attempt = min(now + backoff(attempts, policy, jitter), expiry)
        for rcpt in pending:
            warn = policy.warn_after(None if notify_delay is None else notify_delay(rcpt))
            threshold = received_at + warn
            if not warn:
                continue
            if now < threshold:  # an attempt at the threshold, else backoff may skip it
                next_attempt = min(next_attempt, threshold)
            elif due is None or due <= threshold:
                delayed.append(rcpt)
    return Next(DeliveryState(attempts, first_attempt, next_attempt, last_error, recipients),
                failed, delayed, logged)


def mark_sent(state: DeliveryState, results: Iterable[Result]) -> DeliveryState:
    """The state with the recipients ``results`` accepted marked sent, and nothing else
    changed: what is saved while other jobs of the message are still out."""
    recipients = dict(state.recipients)
    for result in results:
        if result.sent:
            recipients[result.recipient] = RecipientState(
                RecipientStatus.SENT, result.code, result.text, result.remote)
    return DeliveryState(state.attempts, state.first_attempt, state.next_attempt,
                         state.last_error, recipients)


def postpone(state: DeliveryState, rcpts: Iterable[str], now: float,
             policy: RetryPolicy) -> DeliveryState:
    """Their bounce could not be queued: the recipients stay pending (their last reply
    kept) and the message is due again after ``retry_first``."""
    recipients = dict(state.recipients)
    for rcpt in rcpts:
        old = recipients[rcpt]
        recipients[rcpt] = RecipientState(RecipientStatus.PENDING, old.code, old.text,
                                          old.remote)
    return DeliveryState(state.attempts, state.first_attempt, now + policy.retry_first,
                         state.last_error, recipients)
