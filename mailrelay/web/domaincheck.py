"""Checks the DNS TXT records of domains waiting for verification, every ``interval``
seconds, so a sender whose record has appeared is verified without anyone asking."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailrelay.web import ops

log = Logger()


class DomainChecker(Service):
    name = "admin-dns-check"

    def __init__(self, services: ops.Services, interval: float, clock) -> None:
        self.services = services
        self.interval = interval
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    async def check(self) -> int:
        """Check every waiting domain once; returns how many were verified."""
        verified = 0
        for user in await self.services.manager.store.listUsers():
            for entry in sorted(e for e in user.unverified if "@" not in e):
                try:
                    if await self.services.verifier.domain_published(user, entry):
                        verified += await ops.confirm(self.services, user.username, entry)
                except Exception as e:  # DNS trouble: try again next round
                    log.info("TXT check of {domain} failed: {error}", domain=entry, error=e)
        return verified

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self.check()))
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("sender domain checks stopped", f)
        )

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
