"""DKIM signing of what delivery sends (the keys and the signature: mailrelay/dkim.py).

Signing comes last, after the footer and tracking links (features/hooks.py) have made
each recipient's copy: each distinct variant is signed once, the spooled original for the
recipients that share it, and each changed copy. The work (reading a large body, parsing,
hashing, the private-key operation) runs in the reactor's thread pool, in batches: the
messages that come to signing in one reactor turn, or while a batch is being signed, go
to the pool together in one call and come back in one, and one batch is signed at a time.
Handing each message over on its own cost the reactor thread more than the signature's
own hashing (a pool thread woken, the interpreter lock passed back and forth, per
message); under load a batch holds many messages. Mail of an account without keys never
goes there (unless ``[dkim] relay_domain`` has a key, which signs what
no key of the account does). A message the client signed already keeps its signature
and gets ours on top (footer and tracking break the client's own signature, as any change
of the body does). When signing fails (a key file unreadable) the message goes out
unsigned and the failure is logged: a missing signature costs less than mail held back.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.dkim import Signer
from mailrelay.features.copy import Copy
from mailrelay.model import Envelope

log = Logger()


class DkimSigning:
    def __init__(self, signer: Signer, reactor) -> None:
        self.signer = signer
        self.reactor = reactor
        # While the keys are being read, the messages that come wait for that reading: the
        # signer is no longer due once it has begun, and a message that went on then would
        # find no keys yet (at startup, every delivery in flight but the first).
        self._waiting: list[Deferred] | None = None
        self._pending: list[tuple[Callable, Deferred]] = []  # the next batch
        self._busy = False  # a batch is being signed, or starts at the end of this turn
        self.batches = 0  # batches handed to the pool

    def _thread(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _batched(self, work: Callable) -> Deferred:
        """``work()`` run in the pool with the other messages of its batch."""
        d: Deferred = Deferred()
        self._pending.append((work, d))
        if not self._busy:
            self._busy = True
            self.reactor.callLater(0, self._start)  # after the rest of this turn's messages
        return d

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            self._busy = False
            return
        self.batches += 1
        d = self._thread(_run_all, [work for work, _ in batch])
        d.addBoth(self._done, batch)

    def _done(self, outcomes, batch: list[tuple[Callable, Deferred]]) -> None:
        if isinstance(outcomes, Failure):  # a bug in _run_all: the whole batch fails
            outcomes = [outcomes] * len(batch)
        for outcome, (_, d) in zip(outcomes, batch, strict=True):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        self._start()  # what came meanwhile (or while firing these): the next batch at once

    async def sign(self, envelope: Envelope, original: Callable[[], bytes] | None,
                   copies: dict[str, Copy]) -> tuple[Copy | None, dict[str, Copy]]:
        """The signed original (None: unsigned, or ``original`` None: nobody shares it)
        and the copies, signed where their From: domain has a key of the account."""
        signer = self.signer
        if self._waiting is not None:
            d: Deferred = Deferred()
            self._waiting.append(d)
            await d
        elif signer.due():
            self._waiting = []
            try:
                await self._thread(signer.refresh)
            except Exception:
                log.failure("cannot read the DKIM keys in {directory}",
                            directory=signer.directory)
            finally:
                waiting, self._waiting = self._waiting, None
                for d in waiting:
                    d.callback(None)
        account = envelope.account  # None: the relay's own mail (relay domain only)
        if not signer.signs_for(account):
            return None, copies

        def sign_all() -> tuple[Copy | None, dict[str, Copy]]:
            done: dict[bytes, bytes] = {}  # a variant -> its signatures: each signed once

            def signed(copy: Copy) -> Copy:
                data = copy.to_bytes()
                if data not in done:
                    done[data] = signer.sign(data, account)
                if not done[data]:
                    return copy
                return Copy([done[data], *copy.pieces], copy.changed, copy.reason)

            head = signed(Copy([original()], False)) if original is not None else None
            return head, {rcpt: signed(copy) for rcpt, copy in copies.items()}

        try:
            return await self._batched(sign_all)
        except Exception:
            log.failure("{queue_id}: DKIM signing failed, sent unsigned", queue_id=envelope.id)
            return None, copies


def _run_all(works: list[Callable]) -> list:
    """In a pool thread: each work's result, or its Failure (the others still run)."""
    outcomes: list = []
    for work in works:
        try:
            outcomes.append(work())
        except Exception:
            outcomes.append(Failure())
    return outcomes
