"""The connection to Redis behind the shared counters (redis_counters.py): RESP over one
socket (unix, TCP, or TLS), commands pipelined in the order they are sent and replies
matched in that order.

Only what the counters need, made cheap because a message pays for it: the commands of
one reactor turn leave in one write, sent at once when the socket takes it (no wait for
the reactor's next poll, no epoll change per command); replies are parsed from the
bytes in one pass; one timer watches every call in flight instead of one timer per call.
txredisapi, used before, spent four times this client's CPU per script call with 20 in
flight, twice with one (bench/README.md, "Shared counters: a connection to Redis of its
own").

The connection is made and made again by a ClientService, RETRY after it was lost.
AUTH (and SELECT) come first on each; a connection whose TLS handshake or AUTH fails is
dropped and tried again, its reason kept (``failure``) for the log line of
RedisCounters, so a password corrected on Redis's side needs no restart. A call Redis
has not answered within ``timeout`` is cancelled and the connection dropped: a Redis
that hangs (stopped, swapping) is left for a new connection rather than waited on. So
is one that answers ``-READONLY``, ``-LOADING`` or ``-MASTERDOWN`` (a primary demoted to
a replica, or one still loading its data): that call fails as a lost connection.

With ``sentinel://`` the connection is made to the primary the sentinels name
(sentinel.py), and ``ROLE`` must answer master after AUTH and SELECT; the calls then go
exactly as on any other connection.
"""

from __future__ import annotations

from collections import deque

from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailrelay import tuning
from mailrelay.config import redis_url_parts
from mailrelay.tls import client_options, ssl_reason

log = Logger()
PROMPT = tuning.on("prompt_writes")  # MAILRELAY_STOCK turns it off, as for the listeners


class RedisError(Exception):
    """An error reply ("NOSCRIPT ...", "WRONGPASS ...", a script's error)."""


class RedisConnectionLost(ConnectionError):
    """The connection went (or never was) before the reply came."""


class _Incomplete(Exception):
    pass


def encode(args) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse(buf: bytes, pos: int):
    """One reply from ``buf`` at ``pos``: ``(value, next pos)``; raises _Incomplete.
    Bulk strings are text; an error reply is a RedisError (returned, not raised)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos], buf[pos + 1:end]
    if kind == 0x3A:  # ':'
        return int(line), end + 2
    if kind == 0x24:  # '$'
        n = int(line)
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2:stop].decode("utf-8", "replace"), stop + 2
    if kind == 0x2A:  # '*'
        n = int(line)
        if n < 0:
            return None, end + 2
        items, pos = [], end + 2
        for _ in range(n):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2B:  # '+'
        return line.decode("utf-8", "replace"), end + 2
    if kind == 0x2D:  # '-'
        return RedisError(line.decode("utf-8", "replace")), end + 2
    raise ValueError(f"not a RESP reply: {bytes(buf[pos:pos + 20])!r}")


class RespProtocol(Protocol):
    """One connection: ``call(*args)`` fires with the reply, errbacks with RedisError for
    an error reply and RedisConnectionLost when the connection goes first."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._pending: deque[tuple[defer.Deferred, float]] = deque()
        self._out: list[bytes] = []
        self._flushing = None
        self._buf = b""
        self.lost = False

    def call(self, *args) -> defer.Deferred:
        if self.lost:
            return defer.fail(RedisConnectionLost("not connected"))
        clock = self.client.clock
        self._out.append(encode(args))
        if self._flushing is None:  # the commands of this turn, once it is over
            self._flushing = clock.callLater(0, self._flush)
        d = defer.Deferred()
        self._pending.append((d, clock.seconds()))
        self.client.watch(self)
        return d

    def _flush(self) -> None:
        self._flushing = None
        data, self._out = b"".join(self._out), []
        transport = self.transport
        if self.lost or not data:
            return
        if (PROMPT and isinstance(transport, FileDescriptor) and transport.connected
                and not transport.disconnecting and not transport.dataBuffer
                and getattr(transport, "_tempDataLen", 1) == 0):
            # At once, as the listeners send their replies (tuning.py, prompt_writes: the
            # same private parts of Twisted's transports, the same switch): no epoll
            # change and no wait for the next poll. What the socket does not take goes
            # the usual way.
            sent = transport.writeSomeData(data)
            if isinstance(sent, int) and sent > 0:  # an error: the reactor meets it again
                data = data[sent:]
            if not data:
                return
        transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, pending, gone = 0, self._pending, None
        try:
            while pos < len(buf):
                value, pos = parse(buf, pos)
                if not pending:
                    raise ValueError("a reply to no command")
                d, _ = pending.popleft()
                if isinstance(value, RedisError):
                    if str(value).startswith(NOT_PRIMARY):  # a replica now, or loading
                        gone = value = RedisConnectionLost(f"Redis: {value}")
                    d.errback(value)
                else:
                    d.callback(value)  # ignored when the call timed out (cancelled)
        except _Incomplete:
            pass
        except ValueError as e:  # not Redis speaking: drop the connection
            log.error("Redis connection: {error}", error=str(e))
            self.transport.abortConnection()
            return
        self._buf = buf[pos:]
        if gone is not None:  # a new connection, to the primary the address names now
            self.client.failure = str(gone)
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.lost = True
        if isinstance(reason.value, SSL.Error):
            self.client.failure = f"TLS: {ssl_reason(reason.value)}"
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        self.client.lost(self)
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            if not d.called:
                d.errback(RedisConnectionLost(reason.getErrorMessage()))

    def expire(self, now: float, timeout: float) -> float | None:
        """When the oldest call in flight is due (``timeout`` after it was sent), or None
        when none is. A call not answered by then is cancelled, and the connection
        dropped: the calls behind it fail at once, and a new connection is made."""
        for d, sent in self._pending:
            if d.called:
                continue
            if sent + timeout > now:
                return sent + timeout
            d.cancel()
            self.transport.abortConnection()
            return None
        return None

    def connectionMade(self) -> None:
        """AUTH, then SELECT; the connection is used once both are answered."""
        client = self.client
        d = defer.succeed(None)
        if client.password is not None:
            auth = ("AUTH", client.username, client.password) if client.username \
                else ("AUTH", client.password)
            d.addCallback(lambda _: self.call(*auth))
        if client.dbid is not None:
            d.addCallback(lambda _: self.call("SELECT", client.dbid))
        if client.primary_only:  # an address from Sentinel may be stale: a replica now
            d.addCallback(lambda _: self.call("ROLE")).addCallback(self._primary)
        d.addCallbacks(lambda _: client.ready(self), self._refused)

    def _primary(self, role: list) -> None:
        if not role or role[0] != "master":
            peer = self.transport.getPeer()
            raise RedisError(f"{peer.host}:{peer.port} is a {role[0] if role else '?'}, "
                             "not the primary")

    def _refused(self, failure) -> None:
        if not failure.check(RedisConnectionLost) or not self.client.failure:
            self.client.failure = failure.getErrorMessage()
        self.transport.loseConnection()  # made again after RETRY


# Error replies of a Redis that cannot take the counters' writes now: the connection is
# dropped and made again (through Sentinel: to the primary it names then).
NOT_PRIMARY = ("READONLY", "LOADING", "MASTERDOWN")
RETRY = 0.5  # seconds between a connection lost (or refused) and the next attempt


class RedisClient:
    """The node's connection to Redis, made again whenever it is lost.

    ``call(*args)`` sends a command on the current connection, or waits for one while
    none is up (until ``timeout``); every call errbacks with CancelledError when Redis has
    not answered it within ``timeout``. ``connection`` is the usable connection or None.
    """

    def __init__(self, endpoint, clock, password: str | None = None,
                 username: str | None = None, dbid: int | None = None,
                 timeout: float = 1.0, primary_only: bool = False) -> None:
        self.clock = clock
        self.endpoint = endpoint
        self.primary_only = primary_only  # ROLE must answer master (Sentinel's address)
        self.timeout = timeout
        self.password, self.username, self.dbid = password, username, dbid
        self.connection: RespProtocol | None = None
        self.failure = ""  # why the last connection failed, for the log
        self._timer = None
        self._watched: set[RespProtocol] = set()
        self._waiting: list[defer.Deferred] = []
        # The attempts in a row are counted from the last connection made, which AUTH
        # may still refuse: a fixed delay, not a growing one.
        self._service = ClientService(endpoint, Factory.forProtocol(lambda: RespProtocol(self)),
                                      clock=clock, retryPolicy=lambda attempt: RETRY)
        self._service.startService()

    def call(self, *args) -> defer.Deferred:
        connection = self.connection
        if connection is not None:
            return connection.call(*args)
        d = defer.Deferred(self._waiting.remove)
        self._waiting.append(d)
        d.addTimeout(self.timeout, self.clock)
        return d.addCallback(lambda c: c.call(*args))

    def ready(self, connection: RespProtocol) -> None:
        self.failure = ""
        self.connection = connection
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(connection)

    def watch(self, connection: RespProtocol) -> None:
        self._watched.add(connection)
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now, due = self.clock.seconds(), []
        for connection in list(self._watched):
            when = connection.expire(now, self.timeout)
            if when is None:
                self._watched.discard(connection)
            else:
                due.append(when)
        if due:
            self._timer = self.clock.callLater(max(0.0, min(due) - now), self._expire)

    def lost(self, connection: RespProtocol) -> None:
        if self.connection is connection:
            self.connection = None
        self._watched.discard(connection)

    def disconnect(self) -> defer.Deferred:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        stopped = [self._service.stopService()]
        if hasattr(self.endpoint, "stop"):  # Sentinel's: its subscription too
            stopped.append(self.endpoint.stop())
        return defer.gatherResults(stopped)


def connect(url: str, clock, password: str = "", timeout: float = 1.0, ca_file: str = "",
            certificate: str = "", key: str = "", sentinel_password: str = "") -> RedisClient:
    """A RedisClient for ``[cluster] redis``: a unix socket, TCP, or TLS (``rediss://``,
    the server's certificate verified against ``ca_file``, the system's roots when
    empty, and its name against the URL's host; ``certificate`` and ``key``: a client
    certificate), or the primary the sentinels of ``sentinel://`` name (sentinel.py;
    ``sentinel_password``: their AUTH). Raises TLSSetupError for a file that cannot be
    read."""
    args = redis_url_parts(url)
    if "sentinels" in args:
        from mailrelay.cluster.sentinel import SentinelEndpoint

        endpoint = SentinelEndpoint(clock, args["sentinels"], args["master"],
                                    sentinel_password or None, timeout)
        client = RedisClient(endpoint, clock, args.get("password") or password or None,
                             args.get("username"), args.get("dbid"), timeout, primary_only=True)
        endpoint.client = client  # why no primary was found, for the log
        endpoint.watch()
        return client
    if "path" in args:
        endpoint = UNIXClientEndpoint(clock, args["path"], timeout=timeout)
    else:
        endpoint = HostnameEndpoint(clock, args["host"], args["port"], timeout=timeout)
        if args.get("tls"):
            endpoint = wrapClientTLS(
                client_options(args["host"], ca_file, certificate, key), endpoint)
    return RedisClient(endpoint, clock, args.get("password") or password or None,
                       args.get("username"), args.get("dbid"), timeout)
