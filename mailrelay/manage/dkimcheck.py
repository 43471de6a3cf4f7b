"""The relay's scheduled look-up of every DKIM key's record (``[dkim] check_interval``).

It runs in the relay, not in the delivery process: the relay already owns the panel's DNS
checks and the control socket, and the delivery process only reads the key index (a
process restarted at any time should not also be the one changing it). Each round:

- every key's record is looked up (through ``[delivery] dns_servers``, the same look-up
  as ``dkim show``) and the result (ok, missing, different, unknown) and its time are kept
  in keys.json (``dns_status``, ``dns_checked``), which ``dkim list|show`` and the panel
  show; a result that changed is logged;
- a pending key whose record is ok is activated, as ``dkim activate`` does (the key it
  replaces becomes retiring), in one log line;
- a retiring key whose state changed more than ``[dkim] retire_after`` ago is reported
  once per run of the relay: its record can be withdrawn and the key deleted with ``dkim
  retire``. The relay does not delete it itself: the record in DNS is the administrator's
  to withdraw, and the key in ``dkim list`` is the reminder of which one.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailrelay.manage.dkim import UnknownKey, look_up

log = Logger()


class DkimChecker(Service):
    name = "dkim-check"

    def __init__(self, keys, resolver, interval: float, retire_after: float, clock) -> None:
        self.keys = keys  # IDkimKeys
        self.resolver = resolver
        self.interval = interval
        self.retire_after = retire_after
        self.clock = clock
        self._reported: set[tuple[str, str, float | None]] = set()  # withdrawable, said so
        self._loop: task.LoopingCall | None = None

    async def check(self) -> None:
        """Look every key's record up once, keep the results, act on them."""
        keys = await self.keys.list()
        if not keys:
            return
        pairs = [(k, await self.keys.txtRecord(k)) for k in keys]
        found = await look_up(self.resolver, pairs)
        now = self.clock.seconds()
        await self.keys.recordChecks({(k.domain, k.selector): status
                                      for k, status in zip(keys, found, strict=True)}, now)
        for (key, (name, _)), status in zip(pairs, found, strict=True):
            if status != key.dns_status and key.dns_status is not None:
                log.info("DKIM record {name} ({state} key) is {status} in DNS, was {was}",
                         name=name, state=key.state, status=status, was=key.dns_status)
            if key.state == "pending" and status == "ok":
                await self._activate(key.domain, key.selector, name)
            elif key.state == "retiring" and now - (key.changed or key.created) \
                    >= self.retire_after:  # fmt: skip
                self._withdrawable(key, name)

    async def _activate(self, domain: str, selector: str, name: str) -> None:
        try:  # the same change as dkim activate, its record just seen
            key, old = await self.keys.promote(domain, selector)
        except UnknownKey:  # activated or deleted meanwhile
            return
        log.info("DKIM: {domain} is signed with selector {selector} from now on ({name} "
                 "seen in DNS){retiring}", domain=domain, selector=key.selector, name=name,
                 retiring="".join(f"; {k.selector} is retiring" for k in old))  # fmt: skip

    def _withdrawable(self, key, name: str) -> None:
        seen = (key.domain, key.selector, key.changed)
        if seen in self._reported:
            return
        self._reported.add(seen)
        log.info("DKIM: {name} (retiring key) can be withdrawn from DNS now; then delete the "
                 "key: mailrelay-admin dkim retire {domain} {selector}", name=name,
                 domain=key.domain, selector=key.selector)  # fmt: skip

    async def _round(self) -> None:
        try:
            await self.check()
        except Exception:  # a key file or the index unreadable: try again next round
            log.failure("the DKIM record check failed")

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self._round()))
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
