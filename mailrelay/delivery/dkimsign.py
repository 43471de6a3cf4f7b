"""DKIM signing of what delivery sends (the keys and the signature: mailrelay/dkim.py).

Signing comes last, after the footer and tracking links (features/hooks.py) have made
each recipient's copy: each distinct variant is signed once, the spooled original for the
recipients that share it, and each changed copy. The work (reading a large body, parsing,
hashing, the private-key operation) runs in the reactor's thread pool; mail of an account
without keys never goes there (unless ``[dkim] relay_domain`` has a key, which signs what
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

    def _thread(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

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
            return await self._thread(sign_all)
        except Exception:
            log.failure("{queue_id}: DKIM signing failed, sent unsigned", queue_id=envelope.id)
            return None, copies
