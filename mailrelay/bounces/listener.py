"""The bounce listener: a small inbound SMTP server for the VERP return paths, nothing else.

It is the MX of the bounce domains (``[bounces] endpoint``, usually ``tcp:25``): remote
servers send their later bounces and complaints here. It takes mail only for VERP
addresses the relay made (bounces/verp.py, checked at RCPT with the key); any other
recipient gets ``550 5.7.1``, so it can never relay or be used to reach anyone. There is
no AUTH: what arrives is a report about mail the relay sent, and it goes no further.
STARTTLS is offered with the relay's certificate (``[tls]``), as remote servers use it
when they can: the returned headers are the user's. ``SIZE`` is advertised and enforced
(``[bounces] max_message_size``), a session has at most MAX_RECIPIENTS recipients and
MAX_ERRORS mistakes, and it is closed after ``idle_timeout`` without a command.
Connections beyond ``max_connections`` get ``421 4.7.0``.

A message is read with the submission session's framing (smtp/framing.py: CRLF lines
only, DATA never taken for commands; smtp/data.py: dot-unstuffing, bare CR/LF refused),
then handed to bounces/feed.py, and the 250 is sent only once its effects are durable.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.bounces.verp import Token, Verp
from mailrelay.reply import Reply
from mailrelay.smtp.address import parse_mail, parse_rcpt
from mailrelay.smtp.data import DataReader, too_big
from mailrelay.smtp.framing import CommandStream
from mailrelay.text import printable

log = Logger()

MAX_RECIPIENTS = 100
MAX_ERRORS = 20  # refused commands and recipients before the connection is closed


class BounceSession(CommandStream):
    max_line = 2048  # no AUTH here: a command line is short

    def __init__(self, factory: BounceFactory) -> None:
        super().__init__()
        self.factory = factory
        self.peer = "-"
        self._helo = False
        self.tls = False
        self._sender: str | None = None
        self._paths: list[Token] = []
        self._chunks: list[bytes] = []
        self._errors = 0

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "-")
        self.factory.sessions += 1
        if self.factory.sessions > self.factory.max_connections:
            self.reply(421, "4.7.0", f"{self.factory.hostname} too many connections, try later")
            self.close()
            return
        self.setTimeout(self.factory.idle_timeout)
        self.write(f"220 {self.factory.hostname} ESMTP bounces only\r\n".encode())

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.factory.sessions -= 1

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded")
        self.close()

    def reply(self, code: int, status: str, text: str) -> None:
        self.write(f"{code} {status} {text}\r\n".encode("utf-8", "replace"))

    # -- commands

    def lineReceived(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        handler = getattr(self, f"do_{verb.decode('ascii', 'replace').upper()}", None)
        try:
            if handler is None or any(b in line for b in (b"\r", b"\n", b"\0")):
                raise Reply(502, "5.5.2", "Error: command not recognized")
            handler(arg.strip())
        except Reply as e:
            self._refused(e)

    def _refused(self, e: Reply) -> None:
        self.reply(e.code, e.status, e.text)
        if e.code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self.reply(421, "4.7.0", f"{self.factory.hostname} Error: too many errors")
                self.close()

    def do_EHLO(self, arg: bytes, esmtp: bool = True) -> None:
        if not arg:
            raise Reply(501, "5.5.4", "Syntax: EHLO hostname")
        self._helo = True
        self._reset()
        if not esmtp:
            self.write(f"250 {self.factory.hostname}\r\n".encode())
            return
        lines = [self.factory.hostname, "PIPELINING", f"SIZE {self.factory.max_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.factory.tls_options is not None and not self.tls:
            lines.append("STARTTLS")
        self.write(b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode()
                            for i, text in enumerate(lines)))

    def do_HELO(self, arg: bytes) -> None:
        if not arg:
            raise Reply(501, "5.5.4", "Syntax: HELO hostname")
        self.do_EHLO(arg, esmtp=False)

    def do_STARTTLS(self, arg: bytes) -> None:
        if arg:
            raise Reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.tls or self.factory.tls_options is None:
            raise Reply(503 if self.tls else 502, "5.5.1", "STARTTLS not available")
        if not self._helo:
            raise Reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self.pending:  # plaintext pipelined after STARTTLS (CVE-2011-0411): drop it
            self.close()
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        self.flush()  # the 220 goes out in plaintext
        self.transport.startTLS(self.factory.tls_options)
        self.tls = True
        self._helo = False  # RFC 3207 4.2: forget what the client said before TLS
        self._reset()

    def do_MAIL(self, arg: bytes) -> None:
        if not self._helo:
            raise Reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._sender is not None:
            raise Reply(503, "5.5.1", "Error: nested MAIL command")
        sender, params = parse_mail(arg)
        size = params.get("SIZE")
        if size and size.isdigit() and int(size) > self.factory.max_size:
            raise too_big(self.factory.max_size)
        self._sender = sender
        self.reply(250, "2.1.0", "Ok")

    def do_RCPT(self, arg: bytes) -> None:
        if self._sender is None:
            raise Reply(503, "5.5.1", "Error: need MAIL command")
        address, _ = parse_rcpt(arg)
        if len(self._paths) >= MAX_RECIPIENTS:
            raise Reply(452, "4.5.3", "Error: too many recipients")
        path = self.factory.verp.open(address)
        if path is None:
            log.info("bounces: refused RCPT <{address}> from {peer}: not a return path of "
                     "this relay", address=printable(address), peer=self.peer)
            raise Reply(550, "5.7.1", f"<{address}>: Recipient address rejected: "
                                      "not a bounce address of this relay")
        self._paths.append(path)
        self.reply(250, "2.1.5", "Ok")

    def do_DATA(self, arg: bytes) -> None:
        if arg:
            raise Reply(501, "5.5.4", "Syntax: DATA")
        if self._sender is None:
            raise Reply(503, "5.5.1", "Error: need MAIL command")
        if not self._paths:
            raise Reply(554, "5.5.1", "Error: no valid recipients")
        self._chunks = []
        self.readMessage(DataReader(self._chunks.append, self.factory.max_size,
                                    lambda header: None))
        self.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def do_RSET(self, arg: bytes) -> None:
        self._reset()
        self.reply(250, "2.0.0", "Ok")

    def do_NOOP(self, arg: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_VRFY(self, arg: bytes) -> None:
        self.reply(252, "2.0.0", "Send some mail, I'll try my best")

    def do_QUIT(self, arg: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self.close()

    def _reset(self) -> None:
        self._sender, self._paths, self._chunks = None, [], []

    # -- the message

    def messageRefused(self, reader: DataReader) -> None:
        if reader.endless:
            self._refused(reader.error)
            self._reset()
            self.close()

    def messageReceived(self, reader: DataReader) -> None:
        if reader.error is not None:
            self._reset()
            self._refused(reader.error)
            return
        data, paths, sender = b"".join(self._chunks), self._paths, self._sender
        self._reset()
        d = defer.ensureDeferred(self.factory.feed.received(paths, data))
        d.addCallbacks(lambda _: self.reply(250, "2.0.0", "Ok: processed"),
                       self._failed, errbackArgs=(sender, paths))
        self.wait(d)

    def _failed(self, failure: Failure, sender: str, paths: list[Token]) -> None:
        log.failure("bounces: cannot record the report from <{sender}> about {ids}", failure,
                    sender=printable(sender or ""),
                    ids=", ".join(p.queue_id for p in paths))
        self.reply(451, "4.3.0", "Error: local error in processing, try again later")

    def waitFailed(self, failure: Failure) -> None:
        log.failure("bounces: session error", failure)


class BounceFactory(ServerFactory):
    noisy = False  # no "Starting factory <...>": the listener's own line says it
    def __init__(self, verp: Verp, feed, hostname: str, *, tls_options=None,
                 max_size: int = 10 * 2**20, idle_timeout: float = 300.0,
                 max_connections: int = 100) -> None:
        self.verp = verp
        self.tls_options = tls_options  # None: no STARTTLS
        self.feed = feed
        self.hostname = hostname
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.sessions = 0

    def buildProtocol(self, addr) -> BounceSession:
        return BounceSession(self)
