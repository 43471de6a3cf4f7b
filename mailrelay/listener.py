"""A listening service whose port must be bound at startup.

Failing to bind (port in use, no permission) stops twistd with one line naming the
listener and the endpoint, not a traceback.
"""

from __future__ import annotations

import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

log = Logger()


class ListenerService(StreamServerEndpointService):
    def __init__(self, name: str, endpoint: str, factory, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(endpoints.serverFromString(reactor, endpoint), factory)
        self.setName(name)
        self.endpoint_text = endpoint
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            message = (f"mailrelay: [{self.name}] endpoint {self.endpoint_text}: "
                       f"cannot listen: {reason}")
            log.critical("{message}", message=message)
            # twistd has redirected sys.stderr into its log by now; the admin needs the
            # line on the terminal too.
            print(message, file=sys.__stderr__)
            raise SystemExit(1)
