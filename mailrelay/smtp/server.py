"""One SMTP submission session: the commands, the transaction, and the commit.

The session is a framing.CommandStream (a Twisted Protocol with TimeoutMixin): commands
split on CRLF only, message data read a chunk at a time by data.DataReader (what BDAT
chunks carry goes through it too: chunking.py), and nothing further read while a command
waits on a Deferred (the portal, the policy, the spool), so pipelined commands run
strictly in order. Commands dispatch to the smtp_* methods below; a handler answers by
returning, by raising Reply, or by returning a coroutine.

Transactions need a login (login.py): AUTH PLAIN or LOGIN (inside TLS unless the listener
allows plaintext AUTH), or, at MAIL without AUTH, IP authentication or address
authentication through the portal. Which envelope and From: header senders a login may
use is the policy's to say (policy/sender.py); so are the limits (policy/submission.py).

Time limits: ``idle_timeout`` between commands, ``data_timeout`` for a whole DATA phase
(or all BDAT chunks of a message), and ``session_timeout`` for the time a connection
spends outside transactions in total (a message in progress is never cut off by it).

When the relay stops (``shut_down``, from smtp/goodbye.py), a session idle between
commands gets ``421 4.3.2`` at once (RFC 5321 3.8); one with a command in progress
(message data being read, a lookup, a commit) finishes it and gets the 421 after its
reply, or when the grace ends, unless a commit is in flight then: its 250 goes out first,
since a 421 instead would have the client send again a message that was kept.
"""

from __future__ import annotations

import base64
import inspect
import itertools

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay import dsnparams, events, requiretls
from mailrelay.errors import StorageError
from mailrelay.events import EventKind
from mailrelay.model import Envelope, utc_text
from mailrelay.net import plain_ip
from mailrelay.reply import Reply
from mailrelay.scope import ascii_form
from mailrelay.smtp.address import parse_mail, parse_rcpt
from mailrelay.smtp.chunking import BETWEEN_CHUNKS, Chunk, Chunking
from mailrelay.smtp.data import DataReader
from mailrelay.smtp.framing import CommandStream
from mailrelay.smtp.headers import HeaderError, from_addresses
from mailrelay.smtp.login import MAX_AUTH_LINE, SessionLogin
from mailrelay.smtp.longlines import conform
from mailrelay.smtp.received import MAX_HELO, protocol_name, received_header
from mailrelay.smtp.sasl import MECHANISMS, Login
from mailrelay.text import printable

log = Logger()

MAX_COMMAND = 2048  # octets of a command line (RFC 5321 says 512; MAIL parameters add)
MAX_AUTH_FAILURES = 3  # per connection; then 421 (the policy counts across connections)
MAX_ERRORS = 20  # syntax and sequence errors (50x) per connection
MAX_JUNK = 100  # NOOP, RSET, VRFY, HELP, HELO/EHLO between two accepted messages
_STAGES = frozenset({b"MAIL", b"RCPT", b"DATA", b"BDAT"})  # whose refusals are events

_sessions = itertools.count(1)


class SubmissionServer(Chunking, CommandStream):
    """A session; built by factory.SubmissionFactory, whose settings it reads."""

    max_line = MAX_AUTH_LINE

    def __init__(self, factory) -> None:
        super().__init__()
        self.factory = factory
        self.callLater = factory.reactor.callLater  # for TimeoutMixin
        self.session_id = next(_sessions)
        self.client_ip = ""
        self.tls = False
        self.helo: str | None = None
        self.esmtp = False
        self.login = SessionLogin(factory.portal, factory.reactor, self.session_id)
        self.login.metrics = factory.metrics
        self.policy = None  # the connection's policy.sender.SenderChecks, once greeted
        self._sender: str | None = None  # None: no transaction open
        self._smtputf8 = False  # the transaction's MAIL had SMTPUTF8 (RFC 6531)
        self._requiretls = False  # and REQUIRETLS (RFC 8689)
        self._recipients: list[str] = []
        self._dsn_mail: dict[str, str] = {}  # RET, ENVID of the transaction
        self._dsn_rcpts: dict[str, dict[str, str]] = {}  # NOTIFY, ORCPT by recipient
        self._incoming = None
        self._envelope: Envelope | None = None
        # The transaction command being answered (stage, sender, recipients...): what a
        # refusal of it reports (message.rejected); None once it is answered.
        self._step: dict | None = None
        self._data_deadline = None
        # The session clock: seconds spent outside transactions, and since when (None
        # while a transaction is open); the timer fires when session_timeout is spent.
        self._outside = 0.0
        self._outside_since: float | None = None
        self._session_timer = None
        self.messages = 0
        self._errors = 0
        self._junk = 0
        self._stopping = False  # the relay stops: 421 once no command is in progress
        self._said_goodbye = False  # and that 421 was sent
        self._committing = False  # a message's commit is in flight: its 250 is to come

    @property
    def avatar(self):
        """The login's ISubmitter, or None."""
        return self.login.avatar

    # -- connection

    def connectionMade(self) -> None:
        # Without TCP_NODELAY, Nagle holds a reply back while the previous one is unacked,
        # and the client, waiting for that reply, delays its ACK: 40 ms lost per round
        # trip (seen after STARTTLS). A TLS wrapper passes the call on to the TCP socket.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        self.factory.open_sessions.add(self)
        self.client_ip = self.login.client_ip = _client_ip(self.transport.getPeer())
        self.tls = ISSLTransport.providedBy(self.transport)
        self.factory.metrics.opened(self.tls)
        self.setTimeout(self.factory.idle_timeout)
        self._session_clock(running=True)
        log.info(
            "session {session}: connection from {client_ip} tls={tls}",
            session=self.session_id,
            client_ip=self.client_ip,
            tls=self.tls,
        )
        d = maybeDeferred(self.factory.policy.connect, self.client_ip)
        d.addCallback(self._greet)
        d.addErrback(self._refused_connection)
        self.wait(d)

    def _greet(self, session_policy) -> None:
        self.policy = self.login.policy = session_policy
        self._reply(220, None, f"{self.factory.hostname} ESMTP mailrelay")

    def _refused_connection(self, failure: Failure) -> None:
        if not failure.check(Reply):
            log.failure("session {session}: connect policy failed", failure,
                        session=self.session_id)
            failure = Failure(Reply(421, "4.3.0", "Local error in processing, try later"))
        self._send(failure.value)
        self.close()

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.factory.metrics.closed(self.tls)
        self._session_clock(running=False)
        if self._session_timer is not None and self._session_timer.active():
            self._session_timer.cancel()
        self._session_timer = None
        self._cancel_data_deadline()
        if self._incoming is not None:
            self._incoming.abort()  # the client vanished mid-message: nothing is kept
            log.info(
                "session {session}: {client_ip} disconnected during {phase}, {queue_id} "
                "discarded",
                session=self.session_id,
                client_ip=self.client_ip,
                phase="BDAT" if self._chunks is not None else "DATA",
                queue_id=self._incoming.id,
            )
        log.info(
            "session {session}: {client_ip} disconnected after {messages} messages "
            "user={user} auth={auth} tls={tls}",
            session=self.session_id,
            client_ip=self.client_ip,
            messages=self.messages,
            user=self.login.username or "-",
            auth=self.login.avatar.method if self.login.avatar is not None else "-",
            tls=self.tls,
        )
        # A commit in flight still decides the message; the policy hears of it first.
        if self._waiting is not None:
            self._waiting.addBoth(lambda _: self._end_session())
        else:
            self._end_session()

    def _end_session(self) -> None:
        self._end_transaction(accepted=False)
        self.login.drop()
        if self.policy is not None:
            self._notify(self.policy.disconnect)
            self.policy = self.login.policy = None
        self.factory.session_ended(self)

    # -- the relay stops

    def shut_down(self, grace_over: bool = False) -> Deferred | None:
        """Say goodbye (421 4.3.2) now if no command is in progress, else once it is done;
        ``grace_over``: now, unless a commit is in flight. Returns a Deferred that fires
        once such a commit is answered (its 250, then the 421), else None."""
        self._stopping = True
        if self._committing:
            answered = Deferred()

            def replied(result):
                answered.callback(None)
                return result

            self._waiting.addBoth(replied)
            return answered
        if grace_over or not self._busy():
            self._goodbye()
        return None

    def _busy(self) -> bool:
        """A command is in progress: waited for, or message data being read (DATA, or a
        BDAT message before its LAST chunk)."""
        return self._waiting is not None or self._reader is not None or (
            self._incoming is not None)

    def _goodbye(self) -> bool:
        """If the relay stops, its 421 and the close (callers see that no command is in
        progress, or that the grace is over); True if the session is closed."""
        if self._closing:
            return True
        if not self._stopping:
            return False
        self._said_goodbye = True
        self._send(Reply(421, "4.3.2", f"{self.factory.hostname} Service shutting down, "
                         "try again later"))
        return True

    def timeoutConnection(self) -> None:
        if self._waiting is not None:  # the client waits for us: its idle time starts after
            self.setTimeout(self.factory.idle_timeout)
            return
        self._send(Reply(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded"))

    def _session_clock(self, running: bool) -> None:
        """Run the session clock outside transactions, stop it while one is open. Its timer
        stays where it is as transactions come and go (no timer change per message): when
        it fires, it reads the clock and waits again for whatever time is left."""
        if not self.factory.session_timeout:
            return
        now = self.factory.reactor.seconds()
        if running and self._outside_since is None and not self._lost:
            self._outside_since = now
            if self._session_timer is None:
                self._session_timer = self.callLater(self._session_left(), self._session_tick)
        elif not running and self._outside_since is not None:
            self._outside += now - self._outside_since
            self._outside_since = None

    def _session_left(self) -> float:
        """Seconds the session may still spend outside transactions."""
        spent = self._outside
        if self._outside_since is not None:
            spent += self.factory.reactor.seconds() - self._outside_since
        return max(0.0, self.factory.session_timeout - spent)

    def _session_tick(self) -> None:
        self._session_timer = None
        if self._outside_since is None:
            return  # in a transaction, the clock stands still; its end starts the timer
        left = self._session_left()
        if left > 0:
            self._session_timer = self.callLater(left, self._session_tick)
        else:
            self._session_expired()

    def _session_spent(self) -> bool:
        if not self.factory.session_timeout or self._outside_since is None:
            return False
        return self._session_left() <= 0

    def _session_expired(self) -> None:
        # A command in progress (a login, a MAIL) finishes first: commandFinished looks
        # again.
        if self._waiting is None and not self._closing:
            self._send(Reply(421, "4.4.2", f"{self.factory.hostname} Error: session timeout "
                             "exceeded"))

    def commandFinished(self) -> None:
        # A command that was waited for (a login, a MAIL) is done: the relay may be
        # stopping, or the session spent.
        if not self._busy() and self._goodbye():
            return
        if self._session_spent():
            self._session_expired()

    # -- commands

    def lineReceived(self, line: bytes) -> None:
        self._step = None
        if not self._busy() and self._goodbye():  # the relay stops: no new command
            return
        if self.login.exchange is not None:  # a 334 was sent: this is the response
            self._run(self._sasl_response, line)
            return
        if b"\r" in line or b"\n" in line or b"\0" in line:
            self._send(Reply(500, "5.5.2", "Bare CR, LF or NUL in command"))
            return
        parts = line.strip(b" \t").split(None, 1)
        if not parts:
            self._send(Reply(500, "5.5.2", "Empty command"))
            return
        verb, arg = parts[0], (parts[1] if len(parts) > 1 else b"")
        if verb.upper() in _STAGES:
            # The recipients' list is replaced, never emptied, when a transaction ends: a
            # refusal that ends it still reports those it had.
            self._step = {"stage": verb.upper().decode(), "sender": self._sender,
                          "recipients": self._recipients}
        if len(line) > (MAX_AUTH_LINE if verb.upper() == b"AUTH" else MAX_COMMAND):
            self._send(Reply(500, "5.5.2", "Line too long"))
            return
        handler = self._handler(verb)
        if handler is None:
            self._send(Reply(500, "5.5.1", "Command unrecognized"))
            return
        if self._chunks is not None and verb.upper() not in BETWEEN_CHUNKS:
            self._send(Reply(503, "5.5.1", "Only BDAT, RSET, NOOP or QUIT may follow BDAT"))
            return
        self._run(handler, arg)
        if not self._busy():  # a RSET between BDAT chunks ends the message it waited for
            self._goodbye()

    def _handler(self, verb: bytes):
        """Only smtp_* methods are commands; a verb that is not ASCII letters is unknown."""
        if not verb.isalpha() or not verb.isascii():
            return None
        return getattr(self, "smtp_" + verb.decode("ascii").upper(), None)

    def lineTooLong(self) -> None:
        self._send(Reply(500, "5.5.2", "Line too long"))
        self.close()

    def inputFlooded(self, size: int) -> None:
        log.warn(
            "session {session}: {client_ip} sent {size} bytes without waiting, dropping",
            session=self.session_id,
            client_ip=self.client_ip,
            size=size,
        )
        self.close()

    def _run(self, handler, *args) -> None:
        """Call a command handler: it answers by returning, by raising Reply, or by
        returning a coroutine (awaited before the next command is read)."""
        try:
            result = handler(*args)
        except Reply as reply:
            self._send(reply)
            return
        except Exception:
            self._internal_error(Failure())
            return
        if inspect.iscoroutine(result):
            d = ensureDeferred(result)
            d.addErrback(self._command_failed)
            self.wait(d)

    def _command_failed(self, failure: Failure) -> None:
        if self._said_goodbye and failure.check(Reply):
            return  # its 421 answered the command already
        if failure.check(Reply):
            self._send(failure.value)
        else:
            self._internal_error(failure)

    def waitFailed(self, failure: Failure) -> None:
        self._internal_error(failure)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("session {session}: internal error", failure, session=self.session_id)
        self._send(Reply(451, "4.3.0", "Local error in processing, try again later"))

    # -- replies

    def _reply(self, code: int, status: str | None, text: str) -> None:
        """Every reply goes out here, every refusal counted, logged and reported."""
        line = f"{code} {status} {text}" if status else f"{code} {text}"
        self.write(printable(line, 512).encode("ascii", "backslashreplace") + b"\r\n")
        if code >= 400:
            self.factory.metrics.refused(code, status)
            log.info(
                "session {session}: refused {code} {status} {text} client {client_ip}",
                session=self.session_id,
                code=code,
                status=status,
                text=text,
                client_ip=self.client_ip,
                user=self.login.username,
            )
            self._rejected(code, status, text)
        if code != 354:  # DATA goes on: its end is answered too
            self._step = None

    def _rejected(self, code: int, status: str | None, text: str) -> None:
        """message.rejected for the refusal of a logged-in client's transaction command
        (once: a 421 that follows it is not another)."""
        step, avatar = self._step, self.login.avatar
        if step is None or avatar is None:
            return
        stage = step["stage"]
        data = {"stage": stage, "reply": events.reply(code, status, text),
                "auth_method": avatar.method, "client_ip": self.client_ip}
        if step["sender"] is not None:
            data["sender"] = step["sender"]
        if "recipient" in step:
            data["recipient"] = step["recipient"]
        if stage in ("DATA", "BDAT"):
            data["recipients"] = list(step["recipients"])
        self.factory.events.emit(EventKind.REJECTED, avatar.user.account,
                                 avatar.user.username, data)

    def _multiline(self, code: int, lines: list[str]) -> None:
        lines = [f"{code}-{x}" for x in lines[:-1]] + [f"{code} {lines[-1]}"]
        out = [printable(line, 512).encode("ascii", "backslashreplace") for line in lines]
        self.write(b"\r\n".join(out) + b"\r\n")

    def _send(self, reply: Reply) -> None:
        self._reply(reply.code, reply.status, reply.text)
        if reply.code == 421:
            self.close()
        elif 500 <= reply.code < 510:
            self._errors += 1
            if self._errors > MAX_ERRORS:
                self._send(Reply(421, "4.7.0", "Too many errors, closing connection"))

    def _junk_command(self) -> None:
        self._junk += 1
        if self._junk > MAX_JUNK:
            raise Reply(421, "4.7.0", "Too many commands without mail, closing connection")

    # -- policy

    async def _ask(self, method: str, *args):
        """A session policy check; a Reply it raises refuses the step."""
        if self.policy is None:
            return None
        return await maybeDeferred(getattr(self.policy, method), *args)

    def _notify(self, method, *args) -> None:
        """A policy notice whose outcome does not change the reply."""
        maybeDeferred(method, *args).addErrback(
            lambda f: log.failure("session {session}: policy notice failed", f,
                                  session=self.session_id)
        )

    # -- session commands

    def smtp_EHLO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=True)
        lines = [f"{self.factory.hostname} Hello {self.client_ip}"]
        lines += [f"SIZE {self.factory.max_message_size}", "PIPELINING", "8BITMIME",
                  "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "SMTPUTF8"]  # DSN: dsnparams.py
        if self.tls:
            lines.append(requiretls.KEYWORD)
        if self._can_starttls():
            lines.append("STARTTLS")
        if self._auth_allowed():
            lines.append("AUTH " + " ".join(m.decode() for m in MECHANISMS))
        self._multiline(250, lines)

    def smtp_HELO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=False)
        self._reply(250, None, f"{self.factory.hostname} Hello {self.client_ip}")

    def _hello(self, arg: bytes, esmtp: bool) -> None:
        self._junk_command()
        name = arg.strip(b" \t")
        if not name or len(name) > MAX_HELO or any(b < 0x21 or b > 0x7E for b in name):
            verb = "EHLO" if esmtp else "HELO"
            raise Reply(501, "5.5.4", f"Syntax: {verb} hostname")
        self._end_transaction(accepted=False)
        self.helo = name.decode("ascii")
        self.esmtp = esmtp

    def smtp_NOOP(self, arg: bytes) -> None:
        self._junk_command()
        self._reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, arg: bytes) -> None:
        self._junk_command()
        self._end_transaction(accepted=False)
        self._reply(250, "2.0.0", "Ok")

    def smtp_VRFY(self, arg: bytes) -> None:
        self._junk_command()
        if not arg:
            raise Reply(501, "5.5.4", "Syntax: VRFY address")
        self._reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: bytes) -> None:
        self._junk_command()
        raise Reply(502, "5.5.1", "EXPN not available")

    def smtp_HELP(self, arg: bytes) -> None:
        self._junk_command()
        self._reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT "
                    "RSET NOOP VRFY HELP QUIT")

    def smtp_QUIT(self, arg: bytes) -> None:
        self._reply(221, "2.0.0", "Bye")
        self.close()

    # -- STARTTLS

    def _can_starttls(self) -> bool:
        return not self.tls and self.factory.tls_mode == "starttls"

    def smtp_STARTTLS(self, arg: bytes) -> None:
        if arg:
            raise Reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.tls:
            raise Reply(503, "5.5.1", "TLS already active")
        if not self._can_starttls():
            raise Reply(502, "5.5.1", "STARTTLS not available on this port")
        if self.helo is None:  # RFC 3207: the client says EHLO first
            raise Reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self.pending:
            # Plaintext sent after STARTTLS would otherwise be read as if it came inside
            # TLS (CVE-2011-0411). A real client waits for the 220.
            log.warn(
                "session {session}: protocol violation, {size} bytes pipelined after "
                "STARTTLS from {client_ip}; discarded, dropping the connection",
                session=self.session_id,
                size=self.pending,
                client_ip=self.client_ip,
            )
            self.close()
            return
        self._reply(220, "2.0.0", "Ready to start TLS")
        self.flush()  # the 220 goes out in plaintext
        self.transport.startTLS(self.factory.tls_options)
        self.tls = True
        self.factory.metrics.startedTLS()
        # RFC 3207 4.2: forget everything learnt from the client before TLS.
        self._end_transaction(accepted=False)
        self.login.forget()
        self.helo = None
        self.esmtp = False

    # -- AUTH

    def _auth_allowed(self) -> bool:
        return self.tls or self.factory.plaintext_auth

    def smtp_AUTH(self, arg: bytes):
        parts = arg.split(None, 1)
        if not parts:
            raise Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if self.login.by_password:
            raise Reply(503, "5.5.1", "Already authenticated")
        if self._sender is not None:
            raise Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if self.helo is None:
            raise Reply(503, "5.5.1", "Send EHLO first")
        if not self._auth_allowed():
            raise Reply(538, "5.7.11", "Encryption required for requested authentication "
                        "mechanism")
        return self._sasl_step(self.login.start(parts[0], parts[1] if len(parts) > 1 else None))

    def _sasl_response(self, line: bytes):
        return self._sasl_step(self.login.respond(line))

    def _sasl_step(self, result: bytes | Login):
        if isinstance(result, bytes):
            self._reply(334, None, base64.b64encode(result).decode("ascii"))
            return None
        return self._password_login(result)

    async def _password_login(self, credentials: Login) -> None:
        if await self.login.password(credentials, self.tls):
            self._reply(235, "2.7.0", "Authentication successful")
            return
        self._send(Reply(535, "5.7.8", "Authentication credentials invalid"))
        if self.login.failures >= MAX_AUTH_FAILURES and not self._closing:
            self._send(Reply(421, "4.7.0", "Too many failed logins, closing connection"))

    # -- the transaction

    def _end_transaction(self, accepted: bool) -> None:
        if self._sender is not None and not accepted and self.policy is not None:
            self._notify(self.policy.reset)
        if self._incoming is not None:  # BDAT chunks before their LAST (RSET, EHLO...)
            self._incoming.abort()
            self._incoming = self._envelope = self._chunks = None
            self._cancel_data_deadline()
        self._sender = None
        self._recipients = []
        self._dsn_mail, self._dsn_rcpts = {}, {}
        self._session_clock(running=True)

    def _need_login(self) -> None:
        if self.login.avatar is None:
            raise Reply(530, "5.7.0", "Authentication required")

    async def smtp_MAIL(self, arg: bytes) -> None:
        if self.helo is None:
            raise Reply(503, "5.5.1", "Send EHLO first")
        if self._sender is not None:
            raise Reply(503, "5.5.1", "Nested MAIL command")
        try:
            sender, params = parse_mail(arg)
        except Reply as error:  # reported once the login question is settled
            sender, params, syntax = None, {}, error
        else:
            syntax = None
            self._step["sender"] = sender
        login = self.login
        if login.avatar is None and not login.ip_tried:
            await login.by_ip()
        if sender is not None and (login.avatar is None or login.avatar.method == "address"):
            await login.by_sender(sender)
        self._need_login()
        avatar = self.login.avatar
        if self.messages >= self.factory.max_messages_per_connection:
            raise Reply(451, "4.7.0", "Too many messages on this connection, reconnect and "
                        "retry")
        if syntax is not None:
            raise syntax
        dsn_mail, params = dsnparams.take_mail(params)
        required, params = requiretls.take_mail(params, self.tls)
        self._mail_params(params)
        # The sender checks (status, null sender, scope, verification): policy/sender.py.
        await self._ask("mailFrom", avatar, sender)
        self._sender, self._recipients = sender, []
        self._dsn_mail, self._dsn_rcpts = dsn_mail, {}
        self._smtputf8 = "SMTPUTF8" in params
        self._requiretls = required
        self._session_clock(running=False)
        self._reply(250, "2.1.0", "Ok")

    def _mail_params(self, params: dict[str, str | None]) -> None:
        for name, value in params.items():
            if name == "SIZE":
                check_size(value, self.factory.max_message_size)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            elif name == "SMTPUTF8":
                _smtputf8_param(value)
            elif name != "AUTH":  # AUTH=<mailbox> (RFC 4954 section 5): accepted, unused
                raise Reply(555, "5.5.4", f"Unsupported parameter {name}")

    async def smtp_RCPT(self, arg: bytes) -> None:
        self._need_login()
        if self._sender is None:
            raise Reply(503, "5.5.1", "Need MAIL command")
        recipient, params = parse_rcpt(arg, self._smtputf8)
        self._step["recipient"] = recipient
        dsn_rcpt, params = dsnparams.take_rcpt(params)
        if params:
            raise Reply(555, "5.5.4", f"Unsupported parameter {next(iter(params))}")
        if recipient in self._recipients:
            self._junk_command()  # else repeating one RCPT would hold a transaction open
            self._reply(250, "2.1.5", "Ok")  # a duplicate: delivered once
            return
        check_recipient_count(len(self._recipients), self.factory.max_recipients)
        await self._ask("rcptTo", self.login.avatar, recipient, len(self._recipients))
        self._recipients.append(recipient)
        if dsn_rcpt:
            self._dsn_rcpts[recipient] = dsn_rcpt
        self._reply(250, "2.1.5", "Ok")

    def smtp_DATA(self, arg: bytes) -> None:
        try:
            self._start_data(arg)
        except Reply as reply:
            self._send(reply)
            if self.pending and not self._closing:
                # RFC 2920: DATA ends a pipelined group; data sent before the 354 would
                # run as commands once DATA is refused.
                log.warn(
                    "session {session}: {client_ip} sent {size} bytes after a refused "
                    "DATA; discarded, dropping the connection",
                    session=self.session_id,
                    client_ip=self.client_ip,
                    size=self.pending,
                )
                self.close()

    def _start_data(self, arg: bytes) -> None:
        if arg:
            raise Reply(501, "5.5.4", "Syntax: DATA")
        if self._chunks is not None:  # RFC 3030 section 2
            raise Reply(503, "5.5.1", "DATA not allowed after BDAT")
        self._need_login()
        if self._sender is None:
            raise Reply(503, "5.5.1", "Need MAIL command")
        if not self._recipients:
            raise Reply(554, "5.5.1", "No valid recipients")
        self.readMessage(self._open_message())
        self._reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _open_message(self) -> DataReader:
        """The spool file of a message whose data begins (DATA, or the first BDAT), with
        its Received header; the reader its data goes through. data_timeout starts."""
        user = self.login.avatar.user
        now = self.factory.reactor.seconds()
        # Over a quota of a user whose mail is then held: kept in hold/ until it resets.
        # (A policy written before holding() existed holds nothing.)
        holding = getattr(self.policy, "holding", None)
        held = holding() if holding is not None else None
        envelope = Envelope(
            id="",
            sender=self._sender,
            user=user.username,
            account=user.account,
            client_ip=self.client_ip,
            helo=self.helo,
            tls=self.tls,
            received_at=now,
            priority=user.priority,
            sandboxed=self.login.avatar.sandboxed,
            dsn=self._dsn_rcpts,
            **self._dsn_mail,  # ret, envid
            smtputf8=self._smtputf8,
            requiretls=self._requiretls,
            auth_method=self.login.avatar.method,
            held_until=held.resets if held is not None else None,
            held_quota=held.quota.describe() if held is not None else "",
            # audit BCC, footer, the account's bounce domain...
            **self.factory.envelope_fields(user, self._recipients, self.login.avatar.account),
        )
        try:
            incoming = self.factory.spool.create(envelope)
        except StorageError as e:
            raise storage_reply(e)
        except Exception:
            log.failure("session {session}: cannot create a spool file",
                        session=self.session_id)
            raise Reply(451, "4.3.0", "Local error in processing, try again later")
        protocol = protocol_name(self.esmtp, self.tls, self.login.by_password, self._smtputf8)
        # The client's recipients only: audit BCC addresses appear in no header.
        incoming.write(received_header(self.helo, self.client_ip, self.factory.hostname,
                                       protocol, incoming.id, self._recipients, now))
        self._incoming, self._envelope = incoming, envelope
        self._data_deadline = self.callLater(self.factory.data_timeout, self._data_timeout)
        return DataReader(incoming.write, self.factory.max_message_size, self._check_headers)

    def _check_headers(self, header: bytes) -> Reply | bytes | None:
        """Refuse a From: header that is malformed or out of scope; add one from the
        envelope sender to a message without any (as Postfix's cleanup does: cron jobs,
        printers and scripts often send none), the sender being in scope already."""
        added = None
        try:
            addresses = from_addresses(header, self._smtputf8)
        except HeaderError as e:
            added = _from_field(self._sender, self._smtputf8)
            try:  # parses with the field added: there was none (else: two, or malformed)
                addresses = from_addresses(header + b"\r\n" + added if header else added,
                                           self._smtputf8)
            except HeaderError:
                return Reply(550, "5.6.0", str(e))
        avatar = self.login.avatar
        for address in addresses:
            try:
                self.policy.headerFrom(avatar, address)  # the scope: policy/sender.py
            except Reply as refusal:
                return refusal
        return None if added is None else added + b"\r\n"

    def messageRefused(self, reader: DataReader) -> None:
        self._incoming.abort()  # refused: stop using disk now, keep reading to the end
        if reader.endless:
            # One line longer than the size limit: its end (and the message's) may never
            # come, and reading on to data_timeout would cost as much as any client cares
            # to send. The size refusal is final (RFC 5321 7.8 lets a server close after
            # 5yz replies to an attack); the connection goes with it.
            log.warn("session {session}: {client_ip} sent a DATA line longer than "
                     "{max_size} bytes; dropping the connection", session=self.session_id,
                     client_ip=self.client_ip, max_size=self.factory.max_message_size)
            self._send(reader.error)
            self.close()

    def messageReceived(self, reader: DataReader | Chunk) -> None:
        if isinstance(reader, Chunk):
            self._chunk_read(reader)  # chunking.py; the LAST one comes back here
            return
        self._cancel_data_deadline()
        d = ensureDeferred(self._finish_message(reader))
        d.addErrback(self._command_failed)
        self.wait(d)

    async def _finish_message(self, reader: DataReader) -> None:
        incoming, envelope = self._incoming, self._envelope
        self._incoming = self._envelope = None
        avatar = self.login.avatar
        try:
            if reader.error is not None:
                raise reader.error
            if reader.long_lines:
                await self._conform(incoming)
                self._check_said_goodbye()
            await self._ask("data", avatar, envelope)
            self._check_said_goodbye()
            committing = self.factory.reactor.seconds()
            self._committing = True
            try:
                queue_id = await incoming.commit()
            except StorageError as e:
                raise storage_reply(e)
            except Exception:
                log.failure("session {session}: commit of {queue_id} failed",
                            session=self.session_id, queue_id=incoming.id)
                raise _local_error()
            finally:
                self._committing = False
        except BaseException:
            incoming.abort()
            self._end_transaction(accepted=False)
            raise
        self.factory.metrics.accepted(reader.size, self.factory.reactor.seconds() - committing)
        self.messages += 1
        self._junk = 0
        self._end_transaction(accepted=True)
        log.info(
            "accepted {queue_id}: session={session} user={user} auth={auth} "
            "client_ip={client_ip} sender={sender} recipients={recipients} size={size} "
            "tls={tls} sandboxed={sandboxed}{held}",
            queue_id=queue_id,
            session=self.session_id,
            user=envelope.user,
            auth=avatar.method,
            client_ip=self.client_ip,
            sender=envelope.sender,
            recipients=len(envelope.recipients),
            size=reader.size,
            tls=self.tls,
            sandboxed=envelope.sandboxed,
            held=f" held_until={utc_text(envelope.held_until)}" if envelope.quota_held else "",
        )
        self.factory.events.emit(EventKind.PROCESSED, envelope.account, envelope.user, {
            **events.of_message(envelope), "queue_id": queue_id,
            "recipients": list(envelope.recipients), "size": reader.size, "tls": self.tls,
            "sandboxed": envelope.sandboxed})
        if self.policy is not None:
            self._notify(self.policy.accepted, avatar, envelope)
        held = f", {envelope.held_text()}" if envelope.quota_held else ""
        self._reply(250, "2.0.0", f"Ok: queued as {queue_id}{held}")

    def _check_said_goodbye(self) -> None:
        """Before a commit: the shutdown grace ended first, its 421 sent, so the client
        sends the message again and none is kept."""
        if self._said_goodbye:
            raise Reply(421, "4.3.2", "Service shutting down")  # answered already

    async def _conform(self, incoming) -> None:
        """Re-encode what has lines over 998 octets (longlines.py), in a thread: the
        message may be on disk, and as large as max_message_size."""
        reactor = self.factory.reactor
        try:
            await deferToThreadPool(reactor, reactor.getThreadPool(), incoming.rewrite, conform)
        except Reply:
            raise
        except Exception:
            log.failure("session {session}: re-encoding long lines of {queue_id} failed",
                        session=self.session_id, queue_id=incoming.id)
            raise _local_error()
        log.info("session {session}: {queue_id} had lines over 998 octets, re-encoded",
                 session=self.session_id, queue_id=incoming.id)

    def _data_timeout(self) -> None:
        self._data_deadline = None
        self._send(Reply(421, "4.4.2", f"{self.factory.hostname} Error: DATA timeout "
                         "exceeded"))

    def _cancel_data_deadline(self) -> None:
        if self._data_deadline is not None and self._data_deadline.active():
            self._data_deadline.cancel()
        self._data_deadline = None


def check_size(value: str | None, max_size: int) -> None:
    """MAIL's SIZE parameter (RFC 1870): Reply 501 when malformed, 552 over ``max_size``.
    A function of its own: manage/explain.py asks it the session's question."""
    if value is None or not value.isdigit() or len(value) > 20:
        raise Reply(501, "5.5.4", "Bad SIZE parameter")
    if int(value) > max_size:
        raise Reply(552, "5.3.4", f"Message size exceeds fixed limit of {max_size} bytes")


def check_recipient_count(count: int, max_recipients: int) -> None:
    """Reply 452 for a new recipient when ``count`` are already accepted (RFC 5321 4.5.3.1.8:
    the client sends the rest in another transaction)."""
    if count >= max_recipients:
        raise Reply(452, "4.5.3", "Too many recipients")


def _client_ip(peer) -> str:
    """The peer's address; an IPv4 client of a dual-stack socket as plain IPv4."""
    return plain_ip(str(getattr(peer, "host", peer)))


def _from_field(sender: str, smtputf8: bool) -> bytes:
    """The From: field for a message without one (MAIL refuses the null sender): a UTF-8
    domain as A-labels, so that only a UTF-8 local part (SMTPUTF8, RFC 6532) makes the
    header UTF-8."""
    if smtputf8:
        return f"From: {ascii_form(sender) or sender}".encode()
    return f"From: {sender}".encode("ascii", "backslashreplace")


def _smtputf8_param(value: str | None) -> None:
    """SMTPUTF8 takes no value (RFC 6531 3.4); the address was parsed knowing of it."""
    if value is not None:
        raise Reply(501, "5.5.4", "SMTPUTF8 takes no value")


def storage_reply(error: StorageError) -> Reply:
    """The answer to a message the spool could not keep (RFC 3463 4.3.1: storage full)."""
    if error.full:
        return Reply(452, "4.3.1", "Insufficient system storage, try again later")
    return _local_error()


def _local_error() -> Reply:
    return Reply(451, "4.3.0", "Local error in processing, try again later")
