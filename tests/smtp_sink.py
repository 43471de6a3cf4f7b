"""A recording SMTP server for tests: Twisted ESMTP on 127.0.0.1, an ephemeral port.

Per-recipient replies (accept, 4xx, 5xx) can change at any time; STARTTLS (with a given
certificate), AUTH PLAIN/LOGIN, SIZE, PIPELINING and DSN (offered only: the parameters
are recorded, no notice is sent) are optional; 8BITMIME is offered unless told not to,
SMTPUTF8 only when told to (and then UTF-8 addresses are taken, else refused with 553
5.6.7 as RFC 6531 has it). Every message is kept with its envelope, its exact MAIL and
RCPT command lines and its exact bytes (dot-unstuffed, CRLF lines), and MAIL commands and
connections are counted, so a test sees a smuggled second transaction.

In-process (trial tests)::

    sink = SMTPSink(rules={"later@x.test": (451, "4.2.0 try later")})
    port = sink.listen()
    yield sink.wait_for(2)             # two messages received
    sink.rules["later@x.test"] = None   # accept from now on
    yield sink.stop()

As a subprocess (end-to-end tests)::

    python tests/smtp_sink.py --port-file F --record-dir D [--rules R.json]
        [--tls-cert C --tls-key K] [--auth user:password] [--require-auth] [--size N]
        [--pipelining] [--dsn] [--no-8bitmime] [--smtputf8]
        [--interface 127.0.0.2 --port N]

R.json (re-read when it changes): ``{"rcpt@x": [451, "4.2.0 later"], "*": [550, "..."],
"data": [554, "5.6.0 no"], "data_command": [250, "2.0.0 ok"]}``; "*" applies to recipients
without their own rule, "data" is the reply at the end of DATA and "data_command" the
reply to DATA itself instead of 354 (a server that lies: it ends the transaction there,
without a message). Each message is written as D/<n>.eml (the bytes)
then D/<n>.json (sender, recipients, tls, user, the ESMTP parameters exactly as given:
"mail_params" a string, "rcpt_params" one string per recipient; commands: the MAIL and
RCPT lines as text, decoded from UTF-8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.mail import smtp
from twisted.mail._cred import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import implementer

Rule = tuple[int, str] | None  # None: accept


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    user: str | None
    connection: int  # the number of the connection it came on (1, 2, ...)
    mail_params: str = ""  # MAIL's ESMTP parameters as sent
    rcpt_params: dict[str, str] = field(default_factory=dict)  # RCPT's, by recipient
    commands: list[bytes] = field(default_factory=list)  # MAIL and RCPT lines, as sent


@dataclass
class _Transaction:
    sender: str
    tls: bool
    user: str | None
    connection: int
    recipients: list[str] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    leader: object = None  # the IMessage that records (Twisted makes one per recipient)
    mail_params: str = ""
    rcpt_params: dict[str, str] = field(default_factory=dict)
    commands: list[bytes] = field(default_factory=list)


@implementer(IMessageSMTP)
class _Message:
    def __init__(self, sink: SMTPSink, txn: _Transaction) -> None:
        self.sink, self.txn = sink, txn
        if txn.leader is None:
            txn.leader = self

    def lineReceived(self, line: bytes) -> None:
        if self.txn.leader is self:
            self.txn.lines.append(line)

    def eomReceived(self):
        if self.txn.leader is self and self.sink.data_reply is None:
            self.sink._record(self.txn)
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class _Delivery:
    def __init__(self, proto: _SinkProtocol, user: str | None = None) -> None:
        self.proto, self.user = proto, user

    def receivedHeader(self, helo, origin, recipients):
        return None  # record exactly what arrived

    def validateFrom(self, helo, origin):
        sink = self.proto.sink
        if sink.require_auth and not self.proto.authenticated:
            raise smtp.SMTPBadSender(origin, 530, "5.7.0 authentication required")
        sink.transactions += 1
        self.proto.txn = _Transaction(self.proto.real(str(origin)), self.proto.startedTLS,
                                      self.user, self.proto.number,
                                      mail_params=self.proto.params,
                                      commands=[self.proto.mail_line])
        return origin

    def validateTo(self, user):
        sink = self.proto.sink
        recipient = self.proto.real(str(user.dest))
        rule = sink.rule_for(recipient)
        if rule is not None and rule[0] >= 300:
            raise smtp.SMTPBadRcpt(recipient, rule[0], rule[1])
        txn = self.proto.txn
        txn.recipients.append(recipient)
        txn.rcpt_params[recipient] = self.proto.params
        txn.commands.append(self.proto.rcpt_line)
        return lambda: _Message(sink, txn)


@implementer(IRealm)
class _Realm:
    def __init__(self, proto: _SinkProtocol) -> None:
        self.proto = proto

    def requestAvatar(self, avatarId, mind, *interfaces):
        user = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        return IMessageDelivery, _Delivery(self.proto, user), lambda: None


class _SinkProtocol(smtp.ESMTP):
    noisy = False

    def __init__(self, sink: SMTPSink, number: int) -> None:
        known = {"PLAIN": PLAINCredentials, "LOGIN": smtp.LOGINCredentials}
        challengers = {m.encode(): known[m] for m in sink.mechanisms} if sink.auth else {}
        super().__init__(challengers, sink.tls_options)
        self.sink, self.number = sink, number
        self.host = b"sink.test"
        self.txn: _Transaction | None = None
        self.mail_line = self.rcpt_line = b""
        self._utf8_txn = False  # this transaction's MAIL said SMTPUTF8
        self._stand_ins: dict[str, str] = {}  # ASCII stand-in -> the UTF-8 address
        if sink.auth:
            checker = InMemoryUsernamePasswordDatabaseDontUse(
                **{u: p.encode() for u, p in sink.auth.items()})
            self.portal = Portal(_Realm(self), [checker])

    def connectionMade(self) -> None:
        super().connectionMade()
        self.delivery = _Delivery(self)
        self.sink.open_connections += 1
        self.sink.most_connections = max(self.sink.most_connections, self.sink.open_connections)
        self.sink.live.add(self)

    def connectionLost(self, reason) -> None:
        self.sink.open_connections -= 1
        self.sink.live.discard(self)
        super().connectionLost(reason)

    def extensions(self):
        ext = super().extensions()
        if not self.sink.auth:
            ext.pop(b"AUTH", None)
        if self.sink.size is not None:
            ext[b"SIZE"] = [b"%d" % self.sink.size]
        if self.sink.pipelining:  # its checks are synchronous: replies come in order
            ext[b"PIPELINING"] = None
        if self.sink.dsn:
            ext[b"DSN"] = None
        if self.sink.eightbitmime:
            ext[b"8BITMIME"] = None
        if self.sink.smtputf8:
            ext[b"SMTPUTF8"] = None
        if self.sink.requiretls and self.startedTLS:
            ext[b"REQUIRETLS"] = None
        return ext

    params = ""  # the ESMTP parameters of the MAIL or RCPT being handled

    @staticmethod
    def _params(regex, rest: bytes) -> str:
        m = regex.match(rest)
        return (m.group("opts") or b"").decode("ascii", "replace").strip() if m else ""

    # Twisted's address parser takes ASCII only: a UTF-8 address is handed to it as an
    # ASCII stand-in, and the transaction records the real one.
    def do_MAIL(self, rest):
        self.params = self._params(self.mail_re, rest)
        self.mail_line = b"MAIL " + rest
        self._utf8_txn = self.sink.smtputf8 and b"SMTPUTF8" in rest.upper().split()
        return self._utf8_command(super().do_MAIL, rest)

    def do_RCPT(self, rest):
        self.params = self._params(self.rcpt_re, rest)
        self.rcpt_line = b"RCPT " + rest
        return self._utf8_command(super().do_RCPT, rest)

    def _utf8_command(self, handler, rest: bytes):
        path = rest.partition(b"<")[2].partition(b">")[0]
        if path.isascii():
            return handler(rest)
        if not self._utf8_txn:
            self.sendCode(553, b"5.6.7 Non-ASCII addresses need SMTPUTF8")
            return None
        stand_in = f"utf8-{len(self._stand_ins)}@stand-in.test"
        self._stand_ins[stand_in] = path.decode("utf-8")
        return handler(rest.replace(path, stand_in.encode()))

    def real(self, address: str) -> str:
        return self._stand_ins.get(address, address)

    def do_DATA(self, rest):
        self.sink._reload_rules()
        lie = self.sink.data_command_reply
        if lie is not None and self._from is not None and self._to:
            self._from, self._to = None, []
            self.sendCode(lie[0], lie[1].encode())
            return
        super().do_DATA(rest)
        # Twisted inserts a blank line before a body without headers; record it as sent.
        self._SMTP__inheader = 1

    def _messageHandled(self, resultList):
        reply = self.sink.data_reply
        if reply is not None:
            self.sendCode(reply[0], reply[1].encode())
        else:
            super()._messageHandled(resultList)


class _Factory(protocol.ServerFactory):
    noisy = False

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    def buildProtocol(self, addr):
        self.sink.connections += 1
        p = _SinkProtocol(self.sink, self.sink.connections)
        p.factory = self
        return p


class SMTPSink:
    def __init__(self, rules: dict[str, Rule] | None = None, default: Rule = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 auth: dict[str, str] | None = None, require_auth: bool = False,
                 mechanisms: list[str] | None = None,
                 size: int | None = None, pipelining: bool = False, dsn: bool = False,
                 eightbitmime: bool = True, smtputf8: bool = False, requiretls: bool = False,
                 record_dir: str | None = None, rules_file: str | None = None,
                 reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.rules: dict[str, Rule] = {k.lower(): v for k, v in (rules or {}).items()}
        self.default = default
        self.data_reply: Rule = None  # a reply at the end of DATA instead of 250
        self.data_command_reply: Rule = None  # a reply to DATA instead of 354
        self.auth = dict(auth or {})
        self.mechanisms = [m.upper() for m in (mechanisms or ["PLAIN", "LOGIN"])]
        self.require_auth = require_auth
        self.size = size
        self.pipelining = pipelining
        self.dsn = dsn
        self.eightbitmime = eightbitmime
        self.smtputf8 = smtputf8
        self.requiretls = requiretls  # offered inside TLS only (RFC 8689)
        self.record_dir = record_dir
        self.rules_file = rules_file
        self._rules_mtime: float | None = None
        self.tls_options = None
        if tls_cert:
            from mailrelay.tls import server_options

            self.tls_options = server_options(tls_cert, tls_key or tls_cert, False, "sink.test")
        self.messages: list[Received] = []
        self.transactions = 0  # MAIL commands accepted
        self.live: set[_SinkProtocol] = set()
        self.connections = 0
        self.open_connections = 0
        self.most_connections = 0  # the most open at the same time
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self._port = None
        self.port: int | None = None

    def rule_for(self, recipient: str) -> Rule:
        self._reload_rules()
        return self.rules.get(recipient.lower(), self.default)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        self._port = self.reactor.listenTCP(port, _Factory(self), interface=interface)
        self.port = self._port.getHost().port
        return self.port

    def stop(self) -> defer.Deferred:
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)

    def drop_connections(self) -> None:
        """Close every open connection, as a server timing out idle clients does."""
        for proto in list(self.live):
            proto.transport.loseConnection()

    def wait_for(self, count: int) -> defer.Deferred:
        """Fires with the messages once at least ``count`` have arrived."""
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((count, d))
        self._wake()
        return d

    def _record(self, txn: _Transaction) -> None:
        data = b"".join(line + b"\r\n" for line in txn.lines)
        message = Received(txn.sender, list(txn.recipients), data, txn.tls, txn.user,
                           txn.connection, txn.mail_params, dict(txn.rcpt_params),
                           list(txn.commands))
        self.messages.append(message)
        if self.record_dir:
            base = os.path.join(self.record_dir, str(len(self.messages)))
            with open(base + ".eml", "wb") as f:
                f.write(data)
            meta = {"sender": message.sender, "recipients": message.recipients,
                    "tls": message.tls, "user": message.user,
                    "connection": message.connection, "mail_params": message.mail_params,
                    "rcpt_params": message.rcpt_params,
                    "commands": [c.decode("utf-8") for c in message.commands]}
            with open(base + ".tmp", "w") as f:
                json.dump(meta, f)
            os.rename(base + ".tmp", base + ".json")
        self._wake()

    def _wake(self) -> None:
        ready = [(n, d) for n, d in self._waiters if len(self.messages) >= n]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, d in ready:
            d.callback(list(self.messages))

    def _reload_rules(self) -> None:
        if not self.rules_file:
            return
        try:
            mtime = os.stat(self.rules_file).st_mtime
        except FileNotFoundError:
            return
        if mtime == self._rules_mtime:
            return
        self._rules_mtime = mtime
        with open(self.rules_file, encoding="utf-8") as f:
            raw = json.load(f)
        data = raw.pop("data", None)
        self.data_reply = tuple(data) if data else None
        data_command = raw.pop("data_command", None)
        self.data_command_reply = tuple(data_command) if data_command else None
        default = raw.pop("*", None)
        self.default = tuple(default) if default else None
        self.rules = {k.lower(): tuple(v) if v else None for k, v in raw.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--record-dir", required=True)
    parser.add_argument("--rules", help="JSON rules file, re-read when it changes")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--auth", action="append", default=[], help="user:password")
    parser.add_argument("--require-auth", action="store_true")
    parser.add_argument("--size", type=int)
    parser.add_argument("--pipelining", action="store_true")
    parser.add_argument("--dsn", action="store_true", help="offer DSN (RFC 3461)")
    parser.add_argument("--no-8bitmime", dest="eightbitmime", action="store_false")
    parser.add_argument("--smtputf8", action="store_true")
    parser.add_argument("--requiretls", action="store_true", help="offer REQUIRETLS in TLS")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="a loopback address (several sinks share a port as MX hosts)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    # mailrelay.tls loads the certificate: importable without PYTHONPATH too
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.makedirs(args.record_dir, exist_ok=True)
    sink = SMTPSink(tls_cert=args.tls_cert, tls_key=args.tls_key,
                    auth=dict(a.split(":", 1) for a in args.auth),
                    require_auth=args.require_auth, size=args.size,
                    pipelining=args.pipelining, dsn=args.dsn, eightbitmime=args.eightbitmime,
                    smtputf8=args.smtputf8, requiretls=args.requiretls,
                    record_dir=args.record_dir, rules_file=args.rules, reactor=reactor)
    port = sink.listen(args.port, args.interface)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.rename(args.port_file + ".tmp", args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
