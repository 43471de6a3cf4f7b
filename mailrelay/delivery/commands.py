"""What the relay and its delivery process say to each other: AMP commands over a socket
pair made when the relay starts the process (delivery/process.py, delivery/worker.py).

The relay speaks first in every command; the delivery process answers. Retry, Delete and
Flush are the control socket's own commands (control.py), passed on unchanged. Message data
never crosses the socket: both processes read and write the spool directly. ``Given``,
the quiet factory of one protocol made beforehand, also serves delivery's outbound SMTP
connections.
"""

from __future__ import annotations

import socket

from twisted.internet import protocol
from twisted.protocols import amp

# Ids per Enqueue: an AMP value holds at most 65,535 bytes (an id takes 20 with its length).
MAX_IDS = 1000


class Enqueue(amp.Command):
    """Messages just committed to queue/ (durable already): schedule them now."""

    arguments = [(b"ids", amp.ListOf(amp.Unicode()))]
    requiresAnswer = False


def adopt(reactor, fd: int, proto: amp.AMP) -> None:
    """Run ``proto`` on the connected UNIX socket ``fd``; the reactor uses a copy of the
    descriptor, so the caller closes ``fd``."""
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, Given(proto))


class Given(protocol.Factory):
    """The factory of one protocol made beforehand. Unlike endpoints.connectProtocol's it
    is quiet: no "Starting factory" and "Stopping factory" lines for every connection."""

    noisy = False

    def __init__(self, proto: protocol.Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr) -> protocol.Protocol:
        return self._proto
