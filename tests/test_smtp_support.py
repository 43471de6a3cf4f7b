"""What the SMTP session tests share: users and a Cred portal made of a small checker and
realm, an in-memory spool for clock-driven tests, certificates, a blocking line client for
loopback tests, and a trial base class that runs listeners on port 0."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import tempfile

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.auth.avatar import ISubmitter, Submitter
from mailrelay.auth.checkers import NetworkChecker, SenderAddressChecker
from mailrelay.auth.ipauth import AddressAuth, IpAuthTable
from mailrelay.features.envelope import user_fields
from mailrelay.interfaces import DirectoryUnavailable, IIncomingMessage, ISpool
from mailrelay.listener import PromptWrites
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.scope import Scope
from mailrelay.smtp.factory import SubmissionFactory, wrap_listener_factory
from mailrelay.smtp.server import SubmissionServer

PASSWORD = "correct horse battery"
HOST = "relay.test"
ACCOUNT = Account(
    "default",
    frozenset({"doe.test", "shop.test", "other.test", "blocked.test", "sandbox.test",
               "xn--bcher-kva.test", "held.test"}),
)
USERS = {
    u.username: u
    for u in [
        SmtpUser("doe.test"),  # domain-level
        SmtpUser("john@shop.test", priority=2),  # user-level
        SmtpUser("webapp", scope=Scope.parse("other.test", "news@shop.test"),
                 bounce_notify="ops@other.test"),  # named
        SmtpUser("blocked.test", status=Status.BLOCKED),
        SmtpUser("sandbox.test", status=Status.SANDBOXED),
        SmtpUser("ldapdown.test"),  # the directory fails for this one
        SmtpUser("xn--bcher-kva.test"),  # bücher.test, domain-level
        SmtpUser("held.test", quota_day=2, quota_action="hold"),  # over quota: held
    ]
}


@implementer(ICredentialsChecker)
class Checker:
    """Passwords in memory; remembers who asked from where (never the password)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    def requestAvatarId(self, credentials):
        self.seen.append((credentials.username, credentials.client_ip, credentials.tls))
        if credentials.username == "ldapdown.test":
            return defer.fail(DirectoryUnavailable("ldap://127.0.0.1 timed out"))
        if credentials.username in USERS and credentials.checkPassword(PASSWORD):
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin())


@implementer(IRealm)
class Realm:
    """Submitter avatars from USERS; the method of a login without a password comes with
    its id (auth.realm.LoginId); an address login of an unknown address gets a user of
    its own, as the real realm does."""

    def __init__(self) -> None:
        self.logins = 0
        self.logouts = 0
        self.account = ACCOUNT

    def requestAvatar(self, avatar_id, mind, *interfaces):
        assert ISubmitter in interfaces
        self.logins += 1
        method = getattr(avatar_id, "method", "password")
        user = USERS.get(avatar_id) or SmtpUser(str(avatar_id))
        return ISubmitter, Submitter.for_user(user, self.account, method), self._logout

    def _logout(self) -> None:
        self.logouts += 1


def make_portal(ip_users: dict[str, str] | None = None, addresses: str = ""):
    """The password checker above, and the real IP and address authentication checkers
    for ``ip_users`` (network -> username) and ``addresses`` ("a@x.test;b@x.test")."""
    checker, realm = Checker(), Realm()
    checkers = [checker]
    if ip_users:
        checkers.append(NetworkChecker(IpAuthTable(ip_users.items())))
    if addresses:
        checkers.append(SenderAddressChecker(AddressAuth.parse(addresses)))
    return Portal(realm, checkers), checker, realm


def plain(username: str, password: str = PASSWORD, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{username}\0{password}".encode())


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@implementer(IIncomingMessage)
class MemoryMessage:
    def __init__(self, spool: MemorySpool, envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.id = envelope.id = f"3{len(spool.created):017x}"
        self.size = 0
        self.data = bytearray()
        self.state = "open"
        self.commit_deferred: defer.Deferred | None = None

    def write(self, data: bytes) -> None:
        if self.state == "open":
            self.data += data
            self.size += len(data)

    def commit(self):
        self.state = "committing"
        self.commit_deferred = d = defer.Deferred()
        d.addCallback(self._done)
        if not self.spool.hold:
            d.callback(self.id)
        return d

    def _done(self, result):
        self.state = "committed"
        return result

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"


@implementer(ISpool)
class MemorySpool:
    """For clock-driven tests: commits fire at once, or when the test says (``hold``)."""

    def __init__(self) -> None:
        self.created: list[MemoryMessage] = []
        self.hold = False

    def create(self, envelope):
        message = MemoryMessage(self, envelope)
        self.created.append(message)
        return message

    @property
    def committed(self) -> list[MemoryMessage]:
        return [m for m in self.created if m.state == "committed"]


class Session:
    """A session over StringTransport with a Clock: every byte in and out is visible."""

    def __init__(self, clock, spool=None, portal=None, ip="192.0.2.7", **factory_args) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address

        self.clock = clock
        self.spool = spool or MemorySpool()
        if portal is None:
            portal, self.checker, self.realm = make_portal()
        args = dict(tls_options=None, tls_mode="none", plaintext_auth=True,
                    envelope_fields=user_fields)
        args.update(factory_args)
        self.factory = SubmissionFactory(portal, self.spool, HOST, reactor=clock, **args)
        address = IPv6Address if ":" in ip else IPv4Address
        self.transport = StringTransport(peerAddress=address("TCP", ip, 40000))
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        """Send bytes; the reply lines written since the last call."""
        self.proto.dataReceived(data)
        return self.replies()

    def replies(self) -> list[str]:
        out = self.transport.value().decode("ascii")
        self.transport.clear()
        return out.splitlines()

    def login(self, username: str = "doe.test") -> None:
        lines = self.send(b"EHLO client.test\r\nAUTH PLAIN " + plain(username) + b"\r\n")
        assert lines[-1].startswith("235 "), lines

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.proto.connectionLost(Failure(ConnectionLost()))


def codes(lines: list[str]) -> list[int]:
    """The code of each final reply line."""
    return [int(line[:3]) for line in lines if line[3:4] == " "]


# -- loopback

class TLSFiles:
    """A CA, a server certificate for HOST, the server options and a client context."""

    def __init__(self) -> None:
        from certs import TestCA

        from mailrelay.tls import server_options

        self.directory = tempfile.mkdtemp(prefix="smtp-tls-")
        ca = TestCA(self.directory)
        cert, key = ca.issue(HOST)
        self.options = server_options(str(cert), str(key), False, HOST)
        self.client = ssl.create_default_context(cafile=str(ca.cert_path))


_TLS: TLSFiles | None = None


def tls_files() -> TLSFiles:
    global _TLS
    if _TLS is None:
        _TLS = TLSFiles()
    return _TLS


class LineClient:
    """A blocking SMTP client that sends exactly the bytes it is told to (run it in a
    thread). Every read has a timeout, so a test never hangs."""

    def __init__(self, port: int, implicit_tls: bool = False, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if implicit_tls:
            self.sock = tls_files().client.wrap_socket(self.sock, server_hostname=HOST)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[str]] | None:
        """One complete (possibly multi-line) reply, or None at EOF."""
        texts = []
        while True:
            line = self._line()
            if line is None:
                return None
            texts.append(line[4:].decode("ascii"))
            if line[3:4] != b"-":
                return int(line[:3]), texts

    def cmd(self, line: bytes | str) -> tuple[int, list[str]] | None:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def replies(self, n: int) -> list[int | None]:
        out = []
        for _ in range(n):
            r = self.reply()
            out.append(r and r[0])
        return out

    def starttls(self) -> None:
        code, _ = self.cmd("STARTTLS")
        assert code == 220, code
        assert not self.buf
        self.sock = tls_files().client.wrap_socket(self.sock, server_hostname=HOST)

    def eof(self) -> bool:
        """True when the server closed the connection (after any pending replies)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


class RecordingServer(SubmissionServer):
    """Notes the most input it ever held in memory, and when its connection ended."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.factory.max_buffered = max(self.factory.max_buffered, self.buffered)

    def connectionMade(self) -> None:
        self.factory.sessions.append(self)
        super().connectionMade()


class LoopbackCase(unittest.TestCase):
    """Listeners on 127.0.0.1 port 0 with the real spool; clients run in threads."""

    def setUp(self):
        from mailrelay.spool.spool import Spool

        self.spool_dir = tempfile.mkdtemp(prefix="smtp-spool-")
        self.spool = Spool(self.spool_dir, reactor=reactor, min_free_bytes=0)
        self.spool.open()
        self.portal, self.checker, self.realm = make_portal()
        self.factories: list[SubmissionFactory] = []

    @defer.inlineCallbacks
    def sessions_ended(self):
        """Wait (5 s at most) until every server-side session has seen its connection end."""
        for _ in range(500):
            if all(s._lost for f in self.factories for s in f.sessions):
                return True
            yield deferLater(reactor, 0.01, lambda: None)
        return False

    @defer.inlineCallbacks
    def tearDown(self):
        yield self.sessions_ended()
        yield self.spool.close()

    def listen(self, tls_mode: str = "starttls", plaintext_auth: bool = False,
               portal=None, outer=None, **kw) -> int:
        factory = SubmissionFactory(
            portal or self.portal, self.spool, HOST, tls_files().options, tls_mode,
            plaintext_auth, reactor=reactor, envelope_fields=user_fields, **kw,
        )
        factory.protocol = RecordingServer
        factory.sessions = []
        factory.max_buffered = 0
        self.factories.append(factory)
        port = PromptWrites(reactor, outer).listenTCP(  # as a ListenerService listens
            0, wrap_listener_factory(factory, tls_mode, tls_files().options),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def files(self, place: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.spool_dir, place)))

    def body(self, queue_id: str) -> bytes:
        with self.spool.open_body(queue_id) as f:
            return f.read()


def message(sender: str, to: str = "rcpt@example.net", body: str = "hello\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: test\r\n\r\n{body}").encode()
