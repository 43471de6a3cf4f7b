"""The one channel to a running relay: AMP over a UNIX socket, <data_dir>/control.sock
(``config.server.control_socket``).

The relay listens there (mode 0600: only its own user may act on the queue) and answers
with an IQueueControl: its delivery process, which the same commands reach over the
socket pair the two share (delivery/process.py). ``mailrelay-admin queue retry|flush|
delete`` and the control panel thus ask delivery the same questions the same way. When
nobody listens, ``ask`` raises RelayNotRunning and the caller acts on the spool itself.
"""

from __future__ import annotations

from twisted.internet import error, protocol
from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()


class DeliveryOff(Exception):
    """This relay runs without delivery ([delivery] enabled = no)."""


class DeliveryNotRunning(Exception):
    """The delivery process is between a crash and its restart: ask again shortly."""


class RelayNotRunning(Exception):
    """No relay answers on the control socket."""


_ERRORS = {DeliveryOff: b"DELIVERY_OFF", DeliveryNotRunning: b"DELIVERY_NOT_RUNNING"}


class Retry(amp.Command):
    """One message is due now; False: it is not in the queue."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"queued", amp.Boolean())]
    errors = _ERRORS


class Delete(amp.Command):
    """Stop delivering a message and remove it; the place it was in (queue or hold)."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"place", amp.Unicode())]
    errors = {KeyError: b"UNKNOWN_MESSAGE", **_ERRORS}


class Flush(amp.Command):
    """Every deferred message is due now; how many were waiting."""

    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class QueueResponder(amp.AMP):
    """Answers Retry, Delete and Flush with ``queue`` (an IQueueControl)."""

    def __init__(self, queue) -> None:
        super().__init__()
        self._queue = queue

    @Retry.responder
    def retry(self, queue_id: str):
        return self._queue.retry(queue_id).addCallback(lambda queued: {"queued": queued})

    @Delete.responder
    def delete(self, queue_id: str):
        return self._queue.delete(queue_id).addCallback(lambda place: {"place": place})

    @Flush.responder
    def flush(self):
        return self._queue.flush().addCallback(lambda count: {"count": count})


class _Factory(protocol.Factory):
    noisy = False  # no "Starting factory" line per mailrelay-admin call

    def __init__(self, queue) -> None:
        self._queue = queue

    def buildProtocol(self, addr) -> QueueResponder:
        return QueueResponder(self._queue)


def control_service(path: str, queue, reactor):
    """Listens on ``path`` while the relay runs; ``queue`` (an IQueueControl) answers. A
    stale socket left by a relay that died is replaced (the lock file beside it tells a
    live relay from a dead one); a second relay on the same data_dir does not start."""
    # Imported here: twisted's endpoints bring OpenSSL, which most mailrelay-admin
    # commands (every one imports this module) never need.
    from twisted.internet.endpoints import quoteStringArgument

    from mailrelay.listener import ListenerService

    endpoint = f"unix:{quoteStringArgument(path)}:mode=600:lockfile=1"

    return ListenerService("control", endpoint, _Factory(queue), reactor)


async def ask(reactor, path: str, command: type[amp.Command], **arguments) -> dict:
    """Send one command to the relay listening on ``path``; its answer. RelayNotRunning
    when there is no socket or nobody listens on it."""
    from twisted.internet import endpoints

    endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=10)
    try:
        channel = await endpoints.connectProtocol(endpoint, amp.AMP())
    except (error.ConnectError, error.ConnectionRefusedError, FileNotFoundError) as e:
        raise RelayNotRunning(f"no relay answers on {path}") from e
    try:
        return await channel.callRemote(command, **arguments)
    finally:
        channel.transport.loseConnection()
