"""The primary of a Redis watched by Sentinel, as the endpoint connection.RedisClient
connects to (``[cluster] redis = sentinel://HOST:PORT,HOST:PORT/NAME``).

Each connection starts by asking the sentinels, in turn, ``SENTINEL
get-master-addr-by-name NAME`` (the first that names an address is believed), then
connects there; RespProtocol checks it with ROLE before using it. The connection is
made again, and the sentinels asked again, whenever it is lost: Redis gone, the call
timeout, a ``-READONLY``/``-LOADING`` reply, a ROLE other than master (a demoted or
stale address), or Sentinel's own CLIENT KILL of a demoted primary's clients. Once
connected, a call costs what it costs on any other connection.

Beside it, a subscription to ``+switch-master`` on one sentinel (the first that takes
it, made again when lost) drops a connection to a primary that Sentinel has just
replaced: the node moves at once, also from an old primary it can still reach but
Sentinel cannot (whose writes the failover would discard).
"""

from __future__ import annotations

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from mailrelay.cluster.connection import (
    RETRY,
    RedisConnectionLost,
    RedisError,
    _Incomplete,
    encode,
    parse,
)


class NoPrimary(ConnectionError):
    """No sentinel named a primary for the name."""


class _Ask(Protocol):
    """One short connection: the commands in one write, their replies, then closed."""

    def __init__(self, commands: list[tuple]) -> None:
        self.commands = commands
        self.replies: list = []
        self.done = defer.Deferred(lambda _: self.transport.abortConnection())
        self._buf = b""

    def connectionMade(self) -> None:
        self.transport.write(b"".join(encode(c) for c in self.commands))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        try:
            while len(self.replies) < len(self.commands):
                value, pos = parse(self._buf, pos)
                self.replies.append(value)
        except _Incomplete:
            self._buf = self._buf[pos:]
            return
        except ValueError as e:
            self.transport.abortConnection()
            self.done.errback(RedisConnectionLost(f"not a sentinel: {e}"))
            return
        self.transport.loseConnection()
        self.done.callback(self.replies)

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.errback(RedisConnectionLost(reason.getErrorMessage()))


class _Watch(Protocol):
    """A subscription to a sentinel's ``+switch-master`` messages."""

    def __init__(self, endpoint: SentinelEndpoint) -> None:
        self.endpoint = endpoint
        self._buf = b""

    def connectionMade(self) -> None:
        commands = [("SUBSCRIBE", "+switch-master")]
        if self.endpoint.password:
            commands.insert(0, ("AUTH", self.endpoint.password))
        self.transport.write(b"".join(encode(c) for c in commands))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        try:
            while True:
                value, pos = parse(self._buf, pos)
                if isinstance(value, RedisError):  # a refused AUTH: another attempt later
                    self.transport.abortConnection()
                    return
                if isinstance(value, list) and value[:2] == ["message", "+switch-master"]:
                    self.endpoint.switched(str(value[2]))
        except _Incomplete:
            self._buf = self._buf[pos:]
        except ValueError:
            self.transport.abortConnection()


@implementer(IStreamClientEndpoint)
class _AnySentinel:
    """The first sentinel that takes a connection."""

    def __init__(self, owner: SentinelEndpoint) -> None:
        self.owner = owner

    def connect(self, factory) -> defer.Deferred:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory):
        owner = self.owner
        for host, port in owner.sentinels:
            try:
                return await HostnameEndpoint(owner.reactor, host, port,
                                              timeout=owner.timeout).connect(factory)
            except (ConnectError, OSError):
                continue
        raise NoPrimary("no sentinel answers")


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """Connects to the primary the sentinels name for ``master``; ``primary`` is the
    address last named."""

    def __init__(self, reactor, sentinels: list[tuple[str, int]], master: str,
                 password: str | None = None, timeout: float = 1.0) -> None:
        self.reactor = reactor
        self.sentinels = sentinels
        self.master = master
        self.password = password
        self.timeout = timeout
        self.primary: tuple[str, int] | None = None
        self.client = None  # the RedisClient, told why no primary was found
        self._watch = ClientService(_AnySentinel(self), Factory.forProtocol(lambda: _Watch(self)),
                                    clock=reactor, retryPolicy=lambda attempt: RETRY)

    def watch(self) -> None:
        self._watch.startService()

    def stop(self) -> defer.Deferred:
        return self._watch.stopService()

    def switched(self, message: str) -> None:
        """``+switch-master NAME OLD-IP OLD-PORT NEW-IP NEW-PORT``: a connection to
        another address than the new primary's is dropped (and made again)."""
        parts = message.split()
        if len(parts) != 5 or parts[0] != self.master or self.client is None:
            return
        connection = self.client.connection
        if connection is None or connection.transport is None:
            return
        peer = connection.transport.getPeer()
        if (getattr(peer, "host", None), getattr(peer, "port", None)) != (parts[3],
                                                                          int(parts[4])):
            self.client.failure = f"Sentinel: {self.master} moved to {parts[3]}:{parts[4]}"
            connection.transport.abortConnection()

    def connect(self, factory) -> defer.Deferred:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory):
        host, port = self.primary = await self.ask()
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        return await endpoint.connect(factory)

    async def ask(self) -> tuple[str, int]:
        """The primary's address, from the first sentinel that names one."""
        commands = [("SENTINEL", "get-master-addr-by-name", self.master)]
        if self.password:
            commands.insert(0, ("AUTH", self.password))
        reasons = []
        for host, port in self.sentinels:
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
            try:
                ask = _Ask(commands)
                await connectProtocol(endpoint, ask)
                replies = await ask.done.addTimeout(self.timeout, self.reactor)
            except (ConnectError, ConnectionError, OSError, defer.TimeoutError,
                    defer.CancelledError) as e:
                reasons.append(f"{host}:{port}: {e or type(e).__name__}")
                continue
            error = next((r for r in replies if isinstance(r, RedisError)), None)
            address = replies[-1]
            if error is not None:
                reasons.append(f"{host}:{port}: {error}")
            elif isinstance(address, list) and len(address) == 2:
                return address[0], int(address[1])
            else:
                reasons.append(f"{host}:{port} knows no master {self.master!r}")
        failure = "Sentinel: " + "; ".join(reasons)
        if self.client is not None:
            self.client.failure = failure
        raise NoPrimary(failure)
