"""A listening service whose port must be bound at startup.

Failing to bind (port in use, no permission) stops twistd with one line naming the
listener and the endpoint, not a traceback.

A TCP connection that turns Nagle off (TCP_NODELAY, as every SMTP session does) also sends
what it is given at once when nothing is queued before it. A stock Twisted transport only
queues a write and asks the reactor to watch the socket for writability: two epoll_ctl
calls and a turn of the reactor loop before every reply leaves. With Nagle on (the web
listeners), writes keep waiting for the loop, which lets them leave together.

That reaches into Twisted's transports (the TLS layer's module, their write buffers). A
Twisted that no longer has them gets stock transports, one loop turn later per reply,
and a warning at startup, rather than sessions that fail on their first write;
``MAILRELAY_STOCK`` turns it off (``prompt_writes`` in mailrelay/tuning.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay import tuning

try:
    from twisted.internet import _newtls
except ImportError:  # pragma: no cover - a Twisted without it
    _newtls = None

log = Logger()

# What _send reads of a connection, besides its public methods.
_CONNECTION_STATE = ("connected", "disconnecting", "_writeDisconnected", "dataBuffer",
                     "_tempDataLen", "producerPaused")


def prompt_writes_possible() -> bool:
    """Whether this Twisted still has the internals that prompt writes use."""
    if _newtls is None or not callable(getattr(_newtls, "startTLS", None)):
        return False
    connection = FileDescriptor()  # a bare one: not registered with any reactor
    return all(hasattr(connection, name) for name in _CONNECTION_STATE)


class ListenerService(StreamServerEndpointService):
    """``outer``, if given, wraps the factory outside any TLS of the endpoint (an ``ssl:``
    one's too) on its TCP port: the PROXY protocol (proxyproto.py)."""

    def __init__(self, name: str, endpoint: str, factory, reactor=None,
                 outer: Callable | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._prompt = PromptWrites(reactor, outer)
        super().__init__(endpoints.serverFromString(self._prompt, endpoint), factory)
        self.setName(name)
        self.endpoint_text = endpoint
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            self._stop_startup(f"cannot listen: {reason}")
        if self._prompt.outer is not None and not self._prompt.wrapped:
            # Connections would reach the sessions with the balancer's address.
            self._stop_startup("the PROXY protocol needs a tcp:, tcp6: or ssl: endpoint")

    def _stop_startup(self, problem: str) -> None:
        message = f"mailrelay: [{self.name}] endpoint {self.endpoint_text}: {problem}"
        log.critical("{message}", message=message)
        # twistd has redirected sys.stderr into its log by now; the admin needs the
        # line on the terminal too.
        print(message, file=sys.__stderr__)
        raise SystemExit(1)


class PromptWrites:
    """``reactor``, except that its TCP ports make connections that send a write at once
    when Nagle is off (see above). ListenerService parses endpoints with it. ``outer``
    wraps the factory of each TCP port, outermost (``wrapped`` counts them)."""

    def __init__(self, reactor, outer: Callable | None = None) -> None:
        self._reactor = reactor
        self.outer = outer
        self.wrapped = 0

    def __getattr__(self, name: str):
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory, backlog: int = 50, interface: str = ""):
        if self.outer is not None:
            factory = self.outer(factory)
            self.wrapped += 1
        if not tuning.on("prompt_writes"):
            return self._reactor.listenTCP(port, factory, backlog, interface)
        if not prompt_writes_possible():
            log.warn("this Twisted's TCP transports lack what prompt replies need; "
                     "replies on port {port} wait for the reactor loop", port=port)
            return self._reactor.listenTCP(port, factory, backlog, interface)
        listening = _PromptPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def listenSSL(self, port: int, factory, contextFactory, backlog: int = 50,
                  interface: str = ""):
        """An ``ssl:`` endpoint: TLS with its own certificate over listenTCP (as Twisted's
        reactors do it), with the relay's ALPN answer and handshake log line."""
        from mailrelay.tls import ServerConnections

        tls = TLSMemoryBIOFactory(ServerConnections(contextFactory), False, factory)
        return self.listenTCP(port, tls, backlog, interface)


def _send(connection: FileDescriptor, data: bytes) -> None:
    """Write ``data`` to a connection's socket at once if nothing is queued before it (and
    Nagle is off); whatever the socket does not take goes the usual way."""
    if (data and connection._prompt and connection.connected and not connection.disconnecting
            and not connection._writeDisconnected
            and not connection.dataBuffer and not connection._tempDataLen
            and not connection.producerPaused):
        sent = connection.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:  # an error: the reactor meets it again
            data = data[sent:]
    FileDescriptor.write(connection, data)


class _PromptBypass(FileDescriptor):
    """What a TLS layer started on a _PromptConnection writes its records through."""

    def write(self, data: bytes) -> None:
        _send(self, data)


class _PromptConnection(tcp.Server):
    _prompt = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        super().setTcpNoDelay(enabled)
        self._prompt = bool(enabled)

    def write(self, data: bytes) -> None:
        if self.TLS:
            super().write(data)  # the TLS layer sends its records through _PromptBypass
        else:
            _send(self, data)

    def startTLS(self, ctx, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, _PromptBypass)


class _PromptPort(tcp.Port):
    transport = _PromptConnection
