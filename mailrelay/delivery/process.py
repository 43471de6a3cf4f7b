"""Delivery in a process of its own, the way Postfix's smtpd and qmgr meet only at the queue.

The relay (this side) receives and commits messages; the delivery process
(delivery/worker.py) runs the queue: routing, outbound connections, retries, DSNs. One
Python process runs on one core, so receiving and delivering in two processes lets them
use two. They share the spool directory and talk over a socket pair with AMP
(delivery/commands.py): the relay tells the process about each committed message, and
passes on retry, flush and delete from the panel and the control socket.

No message can be forgotten between them: the process lists the queue when it starts, and
a message is announced only once it is durable in queue/, so whatever was announced to a
process that died is found by the next one's listing. The relay restarts a process that
ends while the relay runs (after 1 s, doubling up to 30 s while it keeps failing), and
stops it when the relay stops. The process's log events come back over its stdout as
JSON and join the relay's log as if logged here, except its metrics records (once a
second: metrics/forward.py), which go to the relay's IMetrics; a process whose relay is
gone stops.
"""

from __future__ import annotations

import os
import socket
import sys
from operator import itemgetter

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

import mailrelay
from mailrelay.control import Delete, DeliveryNotRunning, Flush, Retry
from mailrelay.delivery.commands import MAX_IDS, Enqueue, adopt
from mailrelay.interfaces import IQueueControl
from mailrelay.metrics import NO_METRICS, RECORD_KEY

log = Logger()

RESTART_FIRST = 1.0  # seconds before restarting a process that ended
RESTART_MAX = 30.0
STABLE = 60.0  # a process that ran this long restarts after RESTART_FIRST again
STOP_TIMEOUT = 30.0  # SIGTERM, then SIGKILL after this long (it saves states first)
MAX_LOG_RECORD = 1 << 20  # bytes of one log record from the process, at most
# A message committed after a quiet spell is announced at once; those that follow within
# this many seconds go together at its end. Each announcement costs both processes a wake
# up, a round trip and a trip to a loader thread, and the delivery process's removals
# group-commit better in bursts: batched, a steady flow costs a quarter less CPU per
# message from one client and 5% less from twenty, for at most this much more latency
# (email does not notice 0.1 s; Postfix's queue manager takes seconds under load).
ANNOUNCE_WINDOW = 0.1


def worker_command(config_source: str | None) -> list[str]:
    """The command line of the delivery process for a relay run with ``config_source``
    (None: the embedded defaults)."""
    argv = [sys.executable, "-m", "mailrelay.delivery.worker", "--fd", "3"]
    if config_source is not None:
        argv += ["--config", os.path.abspath(config_source)]
    return argv


def worker_env() -> dict[str, str]:
    """The relay's environment, with this mailrelay package first on the import path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(mailrelay.__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class _Channel(amp.AMP):
    def __init__(self, owner: DeliveryProcess) -> None:
        super().__init__()
        self._owner = owner

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._owner._channel_lost(self)


class _Child(protocol.ProcessProtocol):
    """The process's stdout (log events as JSON records) and stderr (anything else)."""

    def __init__(self, owner: DeliveryProcess) -> None:
        self._owner = owner
        self._out = b""
        self._err = b""

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        # Each record is RS + JSON + LF (RFC 7464); JSON escapes any LF of its own, so a
        # record is complete, and logged at once, when its LF arrives.
        self._out += data
        *records, self._out = self._out.split(b"\n")
        for record in records:
            _relog(record.lstrip(b"\x1e"), self._owner.metrics)
        if len(self._out) > MAX_LOG_RECORD:
            self._out = b""
            log.warn("delivery process: a log record over {size} bytes, dropped",
                     size=MAX_LOG_RECORD)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                log.error("delivery process: {line}", line=line.decode("utf-8", "replace"))
        self._err = self._err[-MAX_LOG_RECORD:]

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(self, reason)


def _relog(record: bytes, metrics) -> None:
    if not record.strip():
        return
    try:
        event = eventFromJSON(record.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        log.warn("delivery process: unreadable log record {record!r}", record=record[:200])
        return
    if RECORD_KEY in event:
        metrics.absorb(event[RECORD_KEY])
        return
    globalLogPublisher(event)


@implementer(IQueueControl)
class DeliveryProcess(Service):
    """Starts, watches and stops the delivery process; stands for its DeliveryManager
    towards the relay: ``enqueue`` (the spool's subscriber), ``retry``, ``delete`` and
    ``flush`` (the control panel and the control socket; DeliveryNotRunning while the
    process restarts)."""

    name = "delivery"
    metrics = NO_METRICS  # the relay's IMetrics: the process's records go there

    def __init__(self, argv: list[str], reactor, env: dict[str, str] | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self._argv = argv
        self._env = env if env is not None else worker_env()
        self._reactor = reactor
        self._stop_timeout = stop_timeout
        self._child: _Child | None = None
        self._process = None  # IProcessTransport of the running process
        self._channel: _Channel | None = None
        self._pending: list[str] = []  # ids waiting for the next announcement
        self._sending = None
        self._announced_at = float("-inf")
        self._restart = None
        self._delay = RESTART_FIRST
        self._started_at = 0.0
        self._pid: int | None = None  # of the process running or last run
        self.restarts = 0  # processes that ended while the relay ran
        self._stopped: list[defer.Deferred] = []

    @property
    def pid(self) -> int | None:
        """The running process's pid."""
        return self._pid if self._process is not None else None

    # ---- lifecycle

    def startService(self) -> None:
        super().startService()
        self._spawn()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        if self._sending is not None and self._sending.active():
            self._sending.cancel()  # the next process lists the queue anyway
        self._sending, self._pending = None, []
        if self._process is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._stopped.append(d)
        self._signal("TERM")
        kill = self._reactor.callLater(self._stop_timeout, self._signal, "KILL")

        def done(result):
            if kill.active():
                kill.cancel()
            return result

        return d.addBoth(done)

    def hangup(self) -> None:
        """Have the running process read the configuration again (its [routes])."""
        self._signal("HUP")

    def _signal(self, name: str) -> None:
        if self._process is not None:
            try:
                self._process.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def _spawn(self) -> None:
        self._restart = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            child = _Child(self)
            self._process = self._reactor.spawnProcess(
                child, self._argv[0], self._argv, env=self._env,
                childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()})
            self._child = child
            channel = _Channel(self)
            adopt(self._reactor, ours.fileno(), channel)
            self._channel = channel
        finally:
            ours.close()  # both were duplicated: by the process and by the reactor
            theirs.close()
        self._started_at = self._reactor.seconds()
        self._pid = self._process.pid
        log.info("delivery process {pid} started", pid=self._pid)

    def _channel_lost(self, channel: _Channel) -> None:
        if channel is self._channel:
            self._channel = None

    def _ended(self, child: _Child, reason: Failure) -> None:
        if child is not self._child:
            return
        pid = self._pid
        self._child = self._process = None
        if self._channel is not None:
            self._channel.transport.loseConnection()
            self._channel = None
        stopped, self._stopped = self._stopped, []
        if stopped or not self.running:
            log.info("delivery process {pid} stopped", pid=pid)
            for d in stopped:
                d.callback(None)
            return
        if self._reactor.seconds() - self._started_at >= STABLE:
            self._delay = RESTART_FIRST
        self.restarts += 1
        log.error("delivery process {pid} ended ({why}); restarting it in {delay:.0f}s",
                  pid=pid, why=_why(reason), delay=self._delay)
        self._restart = self._reactor.callLater(self._delay, self._spawn)
        self._delay = min(self._delay * 2, RESTART_MAX)

    # ---- what the relay asks of delivery

    def enqueue(self, message) -> None:
        """A message (its id or its envelope) is durable in queue/: announce it, at the
        end of this reactor turn, or with the others of ANNOUNCE_WINDOW when the last
        announcement was more recent than that. Without a process nothing is sent: the
        next one lists the queue when it starts."""
        if self._channel is None:
            return
        self._pending.append(getattr(message, "id", message))
        if self._sending is None:
            wait = self._announced_at + ANNOUNCE_WINDOW - self._reactor.seconds()
            self._sending = self._reactor.callLater(max(0.0, wait), self._announce)

    def _announce(self) -> None:
        self._sending = None
        self._announced_at = self._reactor.seconds()
        ids, self._pending = self._pending, []
        if self._channel is None:
            return
        for start in range(0, len(ids), MAX_IDS):
            self._channel.callRemote(Enqueue, ids=ids[start:start + MAX_IDS])

    def retry(self, queue_id: str) -> defer.Deferred:
        """Fires with True when the message is now due, False when it is not queued."""
        return self._call(Retry, queue_id=queue_id).addCallback(itemgetter("queued"))

    def delete(self, queue_id: str) -> defer.Deferred:
        """Fires with the place the message was removed from; KeyError when unknown."""
        return self._call(Delete, queue_id=queue_id).addCallback(itemgetter("place"))

    def flush(self) -> defer.Deferred:
        """Fires with how many deferred messages became due."""
        return self._call(Flush).addCallback(itemgetter("count"))

    def _call(self, command, **kw) -> defer.Deferred:
        if self._channel is None:
            return defer.fail(DeliveryNotRunning("the delivery process is restarting"))
        return self._channel.callRemote(command, **kw)


def _why(reason: Failure) -> str:
    value = reason.value
    if getattr(value, "signal", None):
        return f"signal {value.signal}"
    if getattr(value, "exitCode", None) is not None:
        return f"exit code {value.exitCode}"
    return str(value)
