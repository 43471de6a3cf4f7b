"""Outbound ESMTP: one connection carries as many messages as its destination has queued.

Built on twisted.mail.smtp.ESMTPClient for the greeting, EHLO, STARTTLS and AUTH; the
transaction states are our own so that the body is dot-stuffed correctly across chunks
(wire.DotStuffer), addresses are checked before they reach the wire, SIZE is respected
and every recipient gets its own result. Messages are pulled one at a time from the
caller (``next_job``), so a connection keeps going while the queue feeds it.

Round trips and writes per message: to a server that offers PIPELINING (RFC 2920), MAIL,
every RCPT and DATA go in one write and their replies are read in order; a body up to
SMALL_BODY bytes goes in one write with its terminating dot, larger ones stream from the
file. So a message costs two round trips instead of three plus one per recipient.

Replies (RFC 5321 4.2, 4.3.2): a reply means success only with a code its command can
have: 220 to the greeting and STARTTLS, 250 to EHLO, HELO, MAIL, RSET and the end of the
data, 250, 251 or 252 to RCPT, 354 to DATA, 235 (334 for the next step) to AUTH. 4xx and
5xx keep their meaning: a recipient's or message's refusal is temporary or permanent; a
refusal before the first MAIL (a 554 greeting too) fails the hop, and the next one is
tried, the message deferred when none takes it (5xx to EHLO first falls back to HELO,
unless STARTTLS or AUTH is required). Anything else is a protocol error: a 250 to DATA
(no body was sent), a 2xx before the end of the data, a 2xx other than those above, a
354 or 334 where neither is due, a line that is not three digits (2-5, 0-5, 0-9)
followed by a space, a hyphen or nothing, a multiline reply whose lines have different
codes. The two sides then no longer agree on where the session stands: every recipient
of the message in progress is deferred with "451 4.5.0 protocol error: ..." (whatever
the server said about them before), and the connection is closed without QUIT; before
the first message, the hop has failed. A connection lost before the reply to the end of
the data defers the message (4.4.2), so a recipient counts as delivered only after a 250
to the end of the data.

What the message needs of the server, checked before MAIL (wire.eight_bit reads it once,
stopping at its first 8-bit byte): a message with any byte over 0x7F goes with
BODY=8BITMIME, and is returned (554 5.6.3, not converted: that would break its DKIM
signatures) by a server without 8BITMIME (RFC 6152). A message sent to us with SMTPUTF8,
or with a UTF-8 address, goes with SMTPUTF8 and its addresses in UTF-8 to a server that
offers it (RFC 6531); to one that does not, addresses go with their domains as A-labels,
and a UTF-8 local part (550 5.6.7: the recipient, or the whole message for the sender) or
an SMTPUTF8 message's UTF-8 header (550 5.6.9) is returned, never downgraded.

TLS policy (delivery/dane.py): the hop says what its TLS must be. STARTTLS is required
for encrypt, verify and dane; with DANE the certificate chain is checked as the handshake
completes (handshakeCompleted), before anything inside TLS is read or sent, and a
mismatch closes the connection. Such a hop fails with its policy in the error, and the
connection's Outcome carries 4.7.5 instead of 4.4.1; connections are per destination,
and a destination is a set of hops with their policies, so a connection never carries
mail that was routed under another policy. MTA-STS enforce is verified TLS (the hop's
``verify``); under MTA-STS testing the chain is checked at the handshake too, and what
would have failed is only reported. ``Courier.on_session`` hears of each connection under
a policy a domain published (TLS reporting, delivery/tlsrpt.py).

REQUIRETLS (requiretls.py): such a message goes only over TLS checked against the
domain's own policy (DANE or MTA-STS enforce) to a server that offers REQUIRETLS, and is
returned with 5.7.30 otherwise (checked before MAIL, with the other refusals).

A report may return a Deferred: the connection sends nothing more (no next MAIL, no QUIT)
and keeps its place until that fires, so the caller can make the outcome durable before
the connection goes on; a crash then finds at most the message in progress on each
connection delivered but not recorded.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, error, ssl
from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.mail import smtp
from twisted.mail._cred import LOGINAuthenticator
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay import requiretls, tuning
from mailrelay.delivery import dane
from mailrelay.delivery.commands import Given
from mailrelay.delivery.router import Hop
from mailrelay.delivery.wire import DotStuffer, EightBit, address_problem, eight_bit, stuff
from mailrelay.scope import ascii_form


@dataclass
class Job:
    """One message for one destination: the recipients of it that route there."""

    queue_id: str
    sender: str
    recipients: list[str]
    open_body: Callable[[], BinaryIO]  # at the body: canonical CRLF, not dot-stuffed
    context: object = None  # the caller's own bookkeeping
    body: bytes | None = None  # the body already read (as open_body gives it), if small
    # DSN parameters (dsnparams.py) for a server that offers DSN: " RET=.. ENVID=.." for
    # MAIL, " NOTIFY=.. ORCPT=.." by recipient for RCPT.
    dsn_mail: str = ""
    dsn_rcpt: dict[str, str] = field(default_factory=dict)
    smtputf8: bool = False  # the client sent it with SMTPUTF8 (Envelope.smtputf8)
    requiretls: bool = False  # only over checked TLS to a hop offering it (RFC 8689)


SMALL_BODY = 64 * 1024  # bytes: a body up to this size is read whole and sent in one write


# The caller's jobs: the next one; None when there is none; or a Deferred to wait for,
# firing True when there may be one now, False when the connection should close.
JobSource = Callable[[], "Job | defer.Deferred[bool] | None"]


@dataclass(frozen=True)
class Result:
    """The outcome of one recipient in one attempt."""

    recipient: str
    code: int
    text: str
    remote: str | None = None
    tls: bool = False
    dsn: bool = False  # the server offered DSN: notices past it are its to send
    policy: str = ""  # the TLS policy level the hop was tried under (dane.TlsPolicy)

    @property
    def sent(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass
class Outcome:
    """What one connection did: jobs taken from the caller, or why no hop could take any."""

    jobs: int = 0
    errors: list[str] = field(default_factory=list)
    status: str = "4.4.1"  # for what is left waiting: 4.7.5 when a TLS policy failed

    @property
    def error(self) -> str:
        return "; ".join(self.errors) or "no mail server to try"


# Called once per job taken, with its results. A Deferred returned holds the connection
# (and its Courier.send) until it fires; it must not errback.
Report = Callable[[Job, list[Result]], defer.Deferred | None]


class _PlainAuthenticator:
    """AUTH PLAIN with an empty authorization identity (the form every server accepts)."""

    def __init__(self, user: bytes) -> None:
        self.user = user

    def getName(self) -> bytes:
        return b"PLAIN"

    def challengeResponse(self, secret: bytes, chal=1) -> bytes:
        return b"\0" + self.user + b"\0" + secret


def _text(resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(resp.split())[:500]


# RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP (the last line of the
# reply), "-" (more lines follow) or the end of the line.
_REPLY_LINE = re.compile(rb"[2-5][0-5][0-9](?:[ -]|\Z)")

# The codes that mean success (RFC 5321 4.3.2; 252 to RCPT also says the message will
# be taken); 4xx and 5xx are refusals; any other code is a protocol error. (ESMTPClient
# itself expects exactly 220 to the greeting and STARTTLS, 235 or 334 to AUTH.)
_HELLO_OK = [250]  # EHLO and HELO
_MAIL_OK = [250]
_RCPT_OK = [250, 251, 252]
_DATA_OK = [354]
_END_OK = [250]  # the end of the data
_RSET_OK = [250]


def _refusal(code: int) -> bool:
    return 400 <= code < 600


@implementer(IHandshakeListener)
class RelayClient(smtp.ESMTPClient):
    """One SMTP session to one hop."""

    debug = False  # the session log would hold AUTH lines; results carry the replies
    # ESMTPClient.__setattr__ only warns about the deprecated tlsMode, never set here, and
    # as a Python-level hook it cost every attribute write (~50 a message).
    if tuning.on("client_setattr"):
        __setattr__ = object.__setattr__

    def __init__(self, hop: Hop, identity: str, context, next_job: JobSource,
                 report: Report, max_messages: int, timeout: float) -> None:
        secret = hop.password.encode() if hop.username else None
        super().__init__(secret, context, identity)
        self.hop = hop
        self.next_job = next_job
        self.report = report
        self.max_messages = max_messages
        self.timeout = timeout
        self.requireTransportSecurity = hop.tls == "required"
        self.policy_failed = False  # the hop's TLS policy could not be met
        self.tls_problem: str | None = None  # what MTA-STS testing would have refused
        self.requireAuthentication = bool(hop.username)
        self.heloFallback = not (self.requireTransportSecurity or self.requireAuthentication)
        if hop.username:
            user = hop.username.encode()
            self.registerAuthenticator(_PlainAuthenticator(user))
            self.registerAuthenticator(LOGINAuthenticator(user))
        self.extensions: dict[bytes, bytes | None] = {}
        self.pulled = 0
        self.completed = False  # ran out of messages (or was stopped) and said QUIT
        self.error: str | None = None
        self.finished: defer.Deferred[tuple[int, str | None]] = defer.Deferred()
        self._job: Job | None = None
        self._data: bytes | None = None  # a small body, in memory
        self._body: BinaryIO | None = None  # a large one, streamed from the file
        self._sender: FileSender | None = None
        self._size = 0
        self._bits = EightBit(False, False)  # the message in progress's 8-bit bytes
        self._utf8 = False  # its MAIL says SMTPUTF8 (addresses go as UTF-8)
        self._results: dict[str, tuple[int, str]] = {}
        self._accepted: list[str] = []
        self._pending_rcpts: list[str] = []
        self._mail_ok: bool | None = None  # pipelined: the reply to MAIL, once read
        self._rcpt_replies = 0  # pipelined: replies to RCPT read so far
        self._stopping = False
        self._settling: defer.Deferred | None = None  # the last report's, until it fires
        self._idle: defer.Deferred | None = None  # waiting for the source to have a job
        self._idle_over = False  # the source gave up on this connection: QUIT
        self._lost = False
        self._password_sent = False  # AUTH LOGIN: the answer to its second challenge went

    # ---- connection-level events

    def stop(self) -> None:
        """Finish the current message, then QUIT instead of taking another."""
        self._stopping = True
        if self._idle is not None:
            self._idle.cancel()

    def _fail(self, text: str) -> None:
        self.error = self.error or text

    def sendError(self, exc) -> None:
        code = getattr(exc, "code", -1)
        resp = getattr(exc, "resp", b"") or b""
        self._fail(f"{code} {_text(resp)}" if code and code > 0 else _text(resp) or str(exc))
        super().sendError(exc)

    def timeoutConnection(self) -> None:
        self._fail("timed out waiting for the server")
        self.transport.abortConnection()

    def lineReceived(self, line: bytes):
        """One line of a reply. SMTPClient's own parser would read "250ok" as 250, skip
        lines starting with "0" and take the last line's code for a multiline reply whose
        lines disagree; here each of those is a protocol error."""
        self.resetTimeout()
        if _REPLY_LINE.match(line) is None:
            self._protocol_error(f'malformed reply "{_text(line[:100])}"')
            return
        code = int(line[:3])
        if self.resp and code != self.code:
            self._protocol_error(f"the lines of a reply have different codes ({self.code} "
                                 f"then {code})")
            return
        self.code = code
        self.resp.append(line[4:])
        if line[3:4] == b"-":
            return
        resp, self.resp, self.code = b"\n".join(self.resp), [], -1
        if code in self._expected:
            return self._okresponse(code, resp)
        return self._failresponse(code, resp)

    def _protocol_error(self, what: str) -> None:
        """The server sent what no reply to our command can be: the two sides no longer
        agree on where the session stands. Nothing it said about the message in progress
        is trusted: every recipient sent to it is deferred, and the connection closes
        without QUIT (whose reply could be anything too)."""
        text = f"4.5.0 protocol error: {what}"
        self._fail(text)
        if self._job is not None:
            self._finish({r: (451, text) for r in self._job.recipients
                          if address_problem(r) is None})
        self.transport.loseConnection()

    def _unexpected_reply(self, command: str, code: int, resp: bytes) -> None:
        self._protocol_error(f"unexpected reply to {command}: {code} {_text(resp)}")

    def _refused(self, command: str, code: int, resp: bytes) -> None:
        """A step before the first MAIL failed: the hop takes no message now."""
        if not _refusal(code):
            self._unexpected_reply(command, code, resp)
            return
        self._fail(f"{code} {_text(resp)}")
        self._disconnectFromServer()

    def connectionLost(self, reason=error.ConnectionDone) -> None:
        super().connectionLost(reason)
        self._lost = True
        if self._idle is not None:  # no job may be handed to this connection any more
            self._idle.cancel()
        failure = reason.value if isinstance(reason, Failure) else reason
        if (self.hop.policy.level in dane.ENCRYPTED and not self.policy_failed
                and isinstance(failure, SSL.Error | VerificationError)):
            # the handshake failed (verify: the certificate): the policy was not met
            self.policy_failed = True
            self._fail(f"TLS policy {self.hop.policy}: {_describe(reason)}")
        if not self.completed:
            self._fail(_describe(reason))
        if self._job is not None:
            text = f"4.4.2 connection lost: {self.error or _describe(reason)}"
            self._finish({r: (451, text) for r in self._job.recipients
                          if r not in self._results})
        self._close_body()
        if self._settling is None:
            self.finished.callback((self.pulled, self.error))
        else:  # the connection's place is free once its last outcome is settled
            self._settling.addCallback(lambda _: self.finished.callback((self.pulled,
                                                                         self.error)))

    # ---- handshake: ESMTPClient does EHLO, STARTTLS and AUTH; we check and record

    def connectionMade(self) -> None:
        # The end of DATA is a small write right behind the body: with Nagle it waits
        # for the ACK of the body's last segment, which the server delays (up to 40 ms),
        # and that capped a connection at ~20 messages/s.
        self.transport.setTcpNoDelay(True)
        super().connectionMade()
        self._failresponse = lambda code, resp: self._refused("the greeting", code, resp)

    def esmtpState_ehlo(self, code, resp) -> None:
        self._expected = _HELLO_OK
        self._okresponse = self.esmtpState_serverConfig
        self._failresponse = self._ehlo_refused
        self.sendLine(b"EHLO " + self.identity)

    def _ehlo_refused(self, code, resp) -> None:
        # RFC 5321 3.2: a server that does not know EHLO says so with a 5xx; HELO then,
        # unless STARTTLS or AUTH is needed. A 4xx (421) is no answer to that question.
        if 500 <= code < 600 and self.heloFallback:
            self.smtpState_helo(code, resp)
        else:
            self._refused("EHLO", code, resp)

    def esmtpState_serverConfig(self, code, resp) -> None:
        self.extensions = {}
        for line in resp.splitlines()[1:]:
            keyword, _, value = line.partition(b" ")
            self.extensions[keyword.upper()] = value or None
        self.tryTLS(code, resp, self.extensions)

    def smtpState_helo(self, code, resp) -> None:
        self._expected = _HELLO_OK
        self._okresponse = self.smtpState_from
        self._failresponse = lambda code, resp: self._refused("HELO", code, resp)
        self.sendLine(b"HELO " + self.identity)

    def esmtpTLSFailed(self, code=-1, resp=None) -> None:
        if resp is None:  # starting TLS on the transport failed
            super().esmtpTLSFailed(code, resp)
        else:  # the reply to STARTTLS was not 220
            self._refused("STARTTLS", code, resp)

    def esmtpTLSRequired(self, code=-1, resp=None) -> None:
        if self.hop.policy.level in dane.ENCRYPTED:
            self._policy_failed("the server does not offer STARTTLS")
            return
        self._fail("TLS is required but the server does not offer STARTTLS")
        self._disconnectFromServer()

    def _policy_failed(self, problem: str) -> None:
        self.policy_failed = True
        self._fail(f"TLS policy {self.hop.policy}: {problem}")
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: the hop's policy checks the certificate chain now,
        before the EHLO inside TLS is answered (DANE, RFC 7672 2.2)."""
        policy = self.hop.policy
        if not (policy.dane or policy.testing):
            return
        try:
            chain = [c.to_cryptography() for c in
                     self.transport.getHandle().get_peer_cert_chain() or []]
        except Exception as e:  # a certificate cryptography cannot read
            problem: str | None = f"unreadable certificate: {e}"
        else:
            problem = policy.check(chain)
        if problem is not None and policy.testing:
            self.tls_problem = problem  # delivered all the same, and reported
        elif problem is not None:
            self._policy_failed(problem)

    def esmtpState_starttls(self, code, resp) -> None:
        # Anything the server sent after its 220 arrived in plaintext and would be read
        # as a reply inside TLS: a man in the middle injecting responses.
        if self.clearLineBuffer():
            self._fail("data after the STARTTLS reply (response injection)")
            self.transport.abortConnection()
            return
        super().esmtpState_starttls(code, resp)

    def authenticate(self, code, resp, items) -> None:
        if self.secret is not None and not self._tlsMode and self.hop.tls != "none":
            self._fail("refusing to send credentials without TLS")
            self._disconnectFromServer()
            return
        super().authenticate(code, resp, items)

    def _esmtpState_plainAuth(self, code, resp) -> None:
        # ESMTPClient retries PLAIN with another authzid form; ours is the standard one.
        self.esmtpAUTHDeclined(code, resp)

    def smtpState_maybeAuthenticated(self, code, resp) -> None:
        # AUTH LOGIN asks for the name, then the password; ESMTPClient would answer any
        # further challenge with the password again, as often as the server asked.
        if code == 334 and self._password_sent:
            self._unexpected_reply("AUTH", code, resp)
            return
        self._password_sent = code == 334
        super().smtpState_maybeAuthenticated(code, resp)

    # ---- transactions

    def smtpState_from(self, code=250, resp=b"") -> None:
        """Between transactions: once the last report is settled, the next MAIL (or QUIT
        when there is nothing more to send)."""
        while self._settling is None:
            job = self._take()
            if isinstance(job, defer.Deferred):
                # Nothing to send yet: the connection stays open until the source has a
                # job (True: ask again) or gives up (False: QUIT).
                self._idle = job
                self._settling = job.addCallbacks(self._idle_ended, self._idle_cancelled)
                break
            if job is None:
                self.completed = True
                self._disconnectFromServer()
                return
            if self._prepare(job):
                self._mail(job)
                return
        self._expected = []  # a reply now is the server giving up on us (421)
        self._okresponse = self._failresponse = self._unexpected
        self._settling.addCallback(self._settled, self._settling)

    def _unexpected(self, code, resp) -> None:
        self._fail(f"{code} {_text(resp)}")
        self.transport.loseConnection()

    def _settled(self, _, settling: defer.Deferred) -> None:
        if self._settling is settling:
            self._settling = None
            if not self._lost:
                self.smtpState_from()

    def _mail(self, job: Job) -> None:
        params = b""
        if b"SIZE" in self.extensions:
            params += b" SIZE=%d" % self._size
        params += self._body_param() + self._smtputf8_param()
        if job.requiretls:  # _refusals saw the hop offers it
            params += b" REQUIRETLS"
        if b"DSN" in self.extensions:
            params += job.dsn_mail.encode()
        mail = b"MAIL FROM:<" + self._path(job.sender) + b">" + params
        if b"PIPELINING" in self.extensions:
            self._mail_ok, self._rcpt_replies = None, 0
            self._okresponse = self._failresponse = self._pipelined_reply
            self.transport.write(b"\r\n".join(
                [mail, *(self._rcpt(r) for r in self._pending_rcpts), b"DATA", b""]))
            return
        self._expected = _MAIL_OK
        self._okresponse = self._mail_accepted
        self._failresponse = self._mail_refused
        self.sendLine(mail)

    def _body_param(self) -> bytes:
        """BODY=8BITMIME for an 8-bit message (RFC 6152; _refusals saw the hop offers it)."""
        return b" BODY=8BITMIME" if self._bits.anywhere else b""

    def _smtputf8_param(self) -> bytes:
        """SMTPUTF8 (RFC 6531) when the hop offers it and the message is SMTPUTF8 (the
        client said so, or an address is UTF-8); without it, addresses go as A-labels."""
        return b" SMTPUTF8" if self._utf8 else b""

    def _path(self, address: str) -> bytes:
        """An address as MAIL and RCPT give it: UTF-8 with SMTPUTF8, else ASCII with the
        domain's A-labels (_prepare refused what has no such form)."""
        if self._utf8:
            return address.encode("utf-8")
        return (ascii_form(address) or address).encode("ascii", "replace")

    def _take(self) -> Job | defer.Deferred | None:
        """The next job; None when this connection is to take no more; or the source's
        Deferred to wait for (see smtpState_from)."""
        if self._stopping or self._idle_over or self.pulled >= self.max_messages:
            return None
        job = self.next_job()
        if isinstance(job, Job):
            self.pulled += 1
        return job

    def _idle_ended(self, more: bool) -> None:
        self._idle = None
        self._idle_over = not more

    def _idle_cancelled(self, failure: Failure) -> None:
        failure.trap(defer.CancelledError)
        self._idle = None
        self._idle_over = True

    def _prepare(self, job: Job) -> bool:
        """Open the body and check the job against the server; False when it cannot be
        sent here (it is reported at once)."""
        self._job = job
        self._results = {r: (550, f"5.1.3 recipient address {why}")
                         for r in job.recipients
                         if (why := address_problem(r)) is not None}
        self._utf8 = b"SMTPUTF8" in self.extensions and (
            job.smtputf8 or not all(a.isascii() for a in (job.sender, *job.recipients)))
        if not self._utf8:
            self._results.update(
                (r, (550, "5.6.7 non-ASCII recipient address and the server does not offer "
                     "SMTPUTF8")) for r in job.recipients
                if r not in self._results and ascii_form(r) is None)
        self._pending_rcpts = [r for r in job.recipients if r not in self._results]
        refused = None
        if self._pending_rcpts:
            try:
                self._read_body(job)
            except (OSError, KeyError) as e:
                refused = (451, f"4.3.0 cannot read the queued message: {e}")
            else:
                refused = self._refusals(job)
        if refused is None and self._pending_rcpts:
            return True
        self._finish({r: refused for r in self._pending_rcpts} if refused else {})
        return False

    def _read_body(self, job: Job) -> None:
        if job.body is not None:
            self._data, self._size = job.body, len(job.body)
        else:
            self._body = job.open_body()
            self._size = _remaining(self._body)
            if self._size <= SMALL_BODY:
                body, self._body = self._body, None
                with body:
                    self._data = body.read()
        self._bits = eight_bit(self._body if self._data is None else io.BytesIO(self._data))

    def _refusals(self, job: Job) -> tuple[int, str] | None:
        """A reply for every recipient when the message cannot go to this server at all."""
        why = address_problem(job.sender)
        if why is not None:
            return 550, f"5.1.7 sender address {why}"
        if not self._utf8 and ascii_form(job.sender) is None:
            return 550, "5.6.7 non-ASCII sender address and the server does not offer SMTPUTF8"
        if not self._utf8 and job.smtputf8 and self._bits.header:
            # RFC 6531 3.2: no UTF-8 header to a server without SMTPUTF8; not downgraded.
            return 550, ("5.6.9 UTF-8 header (SMTPUTF8 message) and the server does not "
                         "offer SMTPUTF8")
        if self._bits.anywhere and b"8BITMIME" not in self.extensions:
            # RFC 6152 3: convert to 7 bits or return the message. A conversion would break
            # the DKIM signatures made before the next hop was known; every current MTA
            # offers 8BITMIME.
            return 554, ("5.6.3 8-bit message and the server does not offer 8BITMIME; not "
                         "converted to 7 bits")
        # Checked TLS: the recipient domain's own policy, or a smarthost or route the
        # sysadmin named (no MX lookup to protect), its certificate verified for that name.
        checked = self.hop.policy.checked or (self.hop.verify and self.hop.address is None)
        if job.requiretls and (why := requiretls.problem(
                self._tlsMode, self.hop.policy.level, checked,
                b"REQUIRETLS" in self.extensions)) is not None:
            return 550, f"{requiretls.STATUS} REQUIRETLS: {why}"
        limit = (self.extensions.get(b"SIZE") or b"").strip()
        if limit.isdigit() and int(limit) and self._size > int(limit):
            return 552, (f"5.3.4 message size {self._size} exceeds the limit {int(limit)} "
                         f"of {self.hop.name}")
        return None

    def _pipelined_reply(self, code, resp) -> None:
        """The replies to a pipelined MAIL, RCPT... and DATA, in that order."""
        if code == 421:  # the server is closing: no more replies will come
            text = _text(resp)
            self._finish({r: (421, text) for r in self._job.recipients
                          if r not in self._results})
            self._next(code, resp, reset=False)
        elif self._mail_ok is None:
            if code not in _MAIL_OK and not _refusal(code):
                self._unexpected_reply("MAIL", code, resp)
                return
            self._mail_ok = code in _MAIL_OK
            if not self._mail_ok:
                self._results.update((r, (code, _text(resp))) for r in self._pending_rcpts)
        elif self._rcpt_replies < len(self._pending_rcpts):
            if code not in _RCPT_OK and not _refusal(code):
                self._unexpected_reply("RCPT", code, resp)
                return
            rcpt = self._pending_rcpts[self._rcpt_replies]
            self._rcpt_replies += 1
            if not self._mail_ok:
                pass  # the recipient has the reply to MAIL
            elif code in _RCPT_OK:
                self._accepted.append(rcpt)
            else:
                self._results[rcpt] = (code, _text(resp))
        elif code not in _DATA_OK:
            self._data_refused(code, resp)
        elif self._accepted:
            self._send_body(code, resp)
        else:
            # RFC 2920 3.1: DATA was accepted with no recipient (or no sender); a lone dot
            # ends that transaction without a message.
            self._okresponse = self._failresponse = self._empty_done
            self.transport.write(b".\r\n")

    def _empty_done(self, code, resp) -> None:
        if code not in _END_OK and not _refusal(code):
            self._unexpected_reply("the end of the data", code, resp)
            return
        self._finish({})
        self._next(code, resp, reset=False)

    def _mail_accepted(self, code, resp) -> None:
        self._accepted = []
        self._next_rcpt()

    def _mail_refused(self, code, resp) -> None:
        if not _refusal(code):
            self._unexpected_reply("MAIL", code, resp)
            return
        self._finish({r: (code, _text(resp)) for r in self._pending_rcpts})
        self._next(code, resp, reset=True)

    def _next_rcpt(self) -> None:
        if not self._pending_rcpts:
            if self._accepted:
                self._expected = _DATA_OK
                self._okresponse = self._send_body
                self._failresponse = self._data_refused
                self.sendLine(b"DATA")
            else:
                self._finish({})
                self._next(250, b"", reset=True)
            return
        self._expected = _RCPT_OK
        self._okresponse = self._rcpt_accepted
        self._failresponse = self._rcpt_refused
        self.sendLine(self._rcpt(self._pending_rcpts[0]))

    def _rcpt(self, rcpt: str) -> bytes:
        params = self._job.dsn_rcpt.get(rcpt, "") if b"DSN" in self.extensions else ""
        return b"RCPT TO:<" + self._path(rcpt) + b">" + params.encode()

    def _rcpt_accepted(self, code, resp) -> None:
        self._accepted.append(self._pending_rcpts.pop(0))
        self._next_rcpt()

    def _rcpt_refused(self, code, resp) -> None:
        if not _refusal(code):
            self._unexpected_reply("RCPT", code, resp)
            return
        self._results[self._pending_rcpts.pop(0)] = (code, _text(resp))
        self._next_rcpt()

    def _data_refused(self, code, resp) -> None:
        # Only 354 lets the body go; a 2xx here would have the message delivered
        # although not a byte of it was sent.
        if not _refusal(code):
            self._unexpected_reply("DATA", code, resp)
            return
        self._finish({r: (code, _text(resp)) for r in self._accepted})
        self._next(code, resp, reset=True)

    def _send_body(self, code, resp) -> None:
        self._expected = _END_OK
        self._okresponse = self._data_done
        self._failresponse = self._data_done
        if self._data is not None:
            data, self._data = self._data, None
            self.transport.write(stuff(data))
            return
        stuffer = DotStuffer()

        def transform(chunk: bytes) -> bytes:
            self.resetTimeout()
            return stuffer.feed(chunk)

        def sent(_) -> None:
            self._sender = None
            self._close_body()
            self.transport.write(stuffer.end())

        self._sender = FileSender()
        d = self._sender.beginFileTransfer(self._body, self.transport, transform)
        d.addCallbacks(sent, lambda _: None)  # a lost connection is handled in connectionLost

    def _data_done(self, code, resp) -> None:
        early = self._sender is not None  # answered before the end of the data
        if not _refusal(code) and (early or code not in _END_OK):
            # A server may give up on a message early, but not take one it has not seen.
            if early:
                self._protocol_error(f"reply before the end of the data: {code} "
                                     f"{_text(resp)}")
            else:
                self._unexpected_reply("the end of the data", code, resp)
            return
        self._finish({r: (code, _text(resp)) for r in self._accepted})
        if early:  # the server's idea of where the data ends is unknown: start afresh
            self.completed = True
            self.transport.loseConnection()
        else:
            self._next(code, resp, reset=False)  # the reply to DATA ended the transaction

    def _next(self, code: int, resp: bytes, reset: bool) -> None:
        """After a transaction: on to the next message (after RSET when it was cut short),
        unless the server said it is closing."""
        if code == 421:
            self._fail(f"421 {_text(resp)}")
            self.transport.loseConnection()
        elif reset:
            self._expected = _RSET_OK
            self._okresponse = self.smtpState_from
            self._failresponse = self._rset_refused
            self.sendLine(b"RSET")
        else:
            self.smtpState_from(code, resp)

    def _rset_refused(self, code, resp) -> None:
        if _refusal(code):
            self._disconnectFromServer()
        else:
            self._unexpected_reply("RSET", code, resp)

    def _finish(self, replies: dict[str, tuple[int, str]]) -> None:
        job, self._job = self._job, None
        self._close_body()
        self._results.update(replies)
        dsn = b"DSN" in self.extensions
        results = [Result(r, *self._results[r], remote=self.hop.name, tls=self._tlsMode,
                          dsn=dsn, policy=self.hop.policy.level)
                   for r in job.recipients if r in self._results]
        self._results, self._accepted, self._pending_rcpts = {}, [], []
        settling = self.report(job, results)
        if isinstance(settling, defer.Deferred):
            self._settling = settling

    def _close_body(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None and sender.deferred is not None:
            # The server answered before the end of the data (or went away): stop sending.
            sender.stopProducing()
            if self.transport is not None:
                self.transport.unregisterProducer()
        body, self._body, self._data = self._body, None, None
        if body is not None:
            body.close()


def _remaining(f: BinaryIO) -> int:
    """Bytes from the position to the end (the body's size)."""
    here = f.tell()
    end = f.seek(0, 2)
    f.seek(here)
    return end - here


def _describe(reason: Failure | BaseException) -> str:
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, SSL.Error):
        reasons = [r[2] for r in value.args[0] if isinstance(r, tuple) and len(r) == 3] \
            if value.args and isinstance(value.args[0], list) else []
        return "TLS handshake failed: " + (", ".join(reasons) or str(value))
    if isinstance(value, VerificationError):
        return "TLS certificate does not match the host name"
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, error.TimeoutError | defer.TimeoutError):
        return "connection timed out"
    if isinstance(value, error.DNSLookupError):
        return "host not found"
    if isinstance(value, defer.CancelledError | error.ConnectingCancelledError):
        return "connection given up (shutting down)"
    if isinstance(value, error.ConnectionDone | error.ConnectionLost):
        return "connection closed by the server"
    text = str(value) or type(value).__name__
    return " ".join(text.split())[:300]


class Courier:
    """Opens connections toward a destination and runs RelayClient sessions on them."""

    def __init__(self, reactor, hostname: str, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, max_messages: int = 100) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_messages = max_messages
        self._contexts: dict[tuple, object] = {}
        # (hop, None for a TLS session that met its policy, or what failed), for each
        # connection under a policy a domain published (TLS reporting, delivery/tlsrpt.py)
        self.on_session: Callable[[Hop, str | None], None] | None = None
        self._live: set[RelayClient] = set()
        self._connecting: set[defer.Deferred] = set()
        self._stopping = False

    def stop(self) -> None:
        """Each connection finishes its message in progress, then QUITs; connections not
        yet made are given up."""
        self._stopping = True
        for protocol in self._live:
            protocol.stop()
        for d in list(self._connecting):
            d.cancel()

    def abort(self) -> None:
        """Drop every connection now (their messages in progress are deferred)."""
        for protocol in list(self._live):
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    def send(self, hops: list[Hop], next_job: JobSource,
             report: Report) -> defer.Deferred[Outcome]:
        """Try ``hops`` in order until one takes a job; then pull jobs until ``next_job``
        returns None (or the per-connection limit). Every job taken is reported exactly
        once; a Deferred the report returns holds the connection (see Report). Fires
        with an Outcome, after the last report's Deferred: ``jobs == 0`` with
        ``errors`` means no hop could take any job; without errors, that there was none
        to take."""
        return defer.ensureDeferred(self._send(hops, next_job, report))

    async def _send(self, hops: list[Hop], next_job, report: Report) -> Outcome:
        outcome = Outcome()
        for hop in hops:
            if self._stopping:
                break
            try:
                context = self._context(hop)
            except (OSError, ValueError, SSL.Error) as e:
                outcome.errors.append(f"{hop.name}: TLS setup failed: {_describe(e)}")
                continue
            protocol = RelayClient(hop, self.hostname, context, next_job, report,
                                   self.max_messages, self.command_timeout)
            connecting = self._endpoint(hop).connect(Given(protocol))
            self._connecting.add(connecting)
            try:
                await connecting
            except Exception as e:
                outcome.errors.append(f"{hop.name}: {_describe(e)}")
                continue
            finally:
                self._connecting.discard(connecting)
            self._live.add(protocol)
            if self._stopping:
                protocol.stop()
            try:
                pulled, problem = await protocol.finished
            finally:
                self._live.discard(protocol)
            self._session(hop, protocol, problem)
            outcome.jobs += pulled
            if pulled or problem is None:  # None: nothing was waiting for this destination
                return outcome
            outcome.errors.append(f"{hop.name}: {problem}")
            if protocol.policy_failed:
                outcome.status = dane.STATUS
        return outcome

    def _session(self, hop: Hop, protocol: RelayClient, problem: str | None) -> None:
        if self.on_session is None or not hop.policy.domain:
            return
        if protocol.policy_failed:
            self.on_session(hop, problem or "validation failed")
        elif protocol._tlsMode:
            self.on_session(hop, protocol.tls_problem)
        elif hop.policy.testing and protocol.extensions:  # sent in the clear: reported
            self.on_session(hop, "the server does not offer STARTTLS")

    def _endpoint(self, hop: Hop):
        if hop.address is None:
            return endpoints.HostnameEndpoint(self.reactor, hop.host, hop.port,
                                              timeout=self.connect_timeout)
        kind = endpoints.TCP6ClientEndpoint if isIPv6Address(hop.address) else (
            endpoints.TCP4ClientEndpoint)
        return kind(self.reactor, hop.address, hop.port, timeout=self.connect_timeout)

    def _context(self, hop: Hop):
        """The STARTTLS options: verified against the hop's name for smarthosts with
        verify, unverified (still encrypted) for opportunistic MX delivery; with DANE
        unverified by OpenSSL (the policy checks the chain) and with the host name as SNI
        (RFC 7672 8.1)."""
        if hop.tls == "none":
            return None
        key = (hop.host, hop.verify, hop.ca_file, hop.policy.dane)
        if key not in self._contexts and hop.policy.dane and not hop.verify:
            self._contexts[key] = _ServerName(ssl.CertificateOptions(verify=False), hop.host)
        if key not in self._contexts:
            if hop.verify:
                trust = ssl.platformTrust()
                if hop.ca_file:
                    with open(hop.ca_file, "rb") as f:
                        trust = ssl.trustRootFromCertificates(
                            [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())])
                self._contexts[key] = ssl.optionsForClientTLS(hop.host, trustRoot=trust)
            else:
                self._contexts[key] = ssl.CertificateOptions(verify=False)
        return self._contexts[key]


@implementer(IOpenSSLClientConnectionCreator)
class _ServerName:
    """Client TLS options that send ``hostname`` as SNI, certificate unverified."""

    def __init__(self, options: ssl.CertificateOptions, hostname: str) -> None:
        self.options = options
        self.hostname = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_tlsext_host_name(self.hostname)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN" in block]

