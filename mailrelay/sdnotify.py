"""systemd's readiness protocol (sd_notify(3)) for ``Type=notify``: one datagram of
``KEY=value`` lines to the socket systemd names in ``$NOTIFY_SOCKET``.

``systemctl start`` then returns once the relay serves (every listener bound, the
delivery process started), not as soon as twistd is running; ``systemctl reload`` and
``stop`` show the relay reloading and stopping. Without ``$NOTIFY_SOCKET`` (not started
by systemd, or another ``Type=``) nothing is sent.
"""

from __future__ import annotations

import os
import socket

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warn("cannot tell systemd {state}: {error}", state=state.replace("\n", " "),
                 error=e.strerror or str(e))
        return False
    return True


class Readiness(Service):
    """Added last: READY=1 once the reactor runs (everything has started by then),
    STOPPING=1 as the relay begins to stop."""

    name = "readiness"

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(notify, "READY=1")

    def stopService(self):
        super().stopService()
        notify("STOPPING=1")
