"""An authoritative twisted.names DNS server on 127.0.0.1 for tests.

Serves the records of a small zone given as ``{name: ["MX 10 mx1.example.test", "A
127.0.0.1", "AAAA ::1", "TXT text", "CNAME other.test", "TLSA 3 1 1 <hex>"]}``; the
special records ``SERVFAIL`` and ``TIMEOUT`` make the name fail or never answer. Names
not in the zone are NXDOMAIN. UDP and TCP listen on the same ephemeral port.

``secure`` names the zones (a name and everything under it) whose answers carry the AD
bit, as a validating resolver sets it for data it validated; the others' answers are
"insecure" (AD clear). A bogus zone is one whose names are ``SERVFAIL``, as a validating
resolver answers them.

In-process (trial tests)::

    dns = DNSServer({"example.test": ["MX 10 mx.example.test"], ...})
    dns.listen()                        # dns.address == ("127.0.0.1", port)
    dns.zone["other.test"] = ["A 127.0.0.2"]   # change at any time
    yield dns.stop()

As a subprocess::

    python tests/dns_server.py --port-file F --record "example.test MX 10 mx.example.test"
    python tests/dns_server.py --port-file F --zone zone.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from twisted.internet import defer
from twisted.names import dns, server
from twisted.names import error as dnserror
from twisted.names.common import ResolverBase

LISTEN_TRIES = 20  # UDP and TCP must share a port: retry when TCP's is taken


class ServFail(Exception):
    """Raised for SERVFAIL records; answered as SERVFAIL without a logged traceback."""


def parse_record(text: str, ttl: int = 60):
    kind, _, data = text.strip().partition(" ")
    kind = kind.upper()
    data = data.strip()
    if kind == "MX":
        preference, _, host = data.partition(" ")
        host = host.strip()
        return dns.Record_MX(int(preference), b"" if host == "." else host.encode(), ttl=ttl)
    if kind == "A":
        return dns.Record_A(data, ttl=ttl)
    if kind == "AAAA":
        return dns.Record_AAAA(data, ttl=ttl)
    if kind == "TXT":  # a long value becomes several strings of at most 255 bytes
        raw = data.encode()
        return dns.Record_TXT(*[raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""],
                              ttl=ttl)
    if kind == "CNAME":
        return dns.Record_CNAME(data.encode(), ttl=ttl)
    if kind == "TLSA":  # twisted.names has no TLSA type: its RDATA as bytes (RFC 6698 2.1)
        usage, selector, mtype, hexdata = data.split(None, 3)
        return RecordTLSA(bytes([int(usage), int(selector), int(mtype)])
                          + bytes.fromhex("".join(hexdata.split())), ttl=ttl)
    raise ValueError(f"unsupported record {text!r}")


class RecordTLSA(dns.UnknownRecord):
    TYPE = 52


class ZoneResolver(ResolverBase):
    """Answers from ``zone`` (read at each query, so tests may change it)."""

    def __init__(self, zone: dict[str, list[str]]) -> None:
        super().__init__()
        self.zone = zone

    def _lookup(self, name, cls, qtype, timeout=None):
        key = name.decode().lower().rstrip(".")
        entries = {k.lower().rstrip("."): v for k, v in self.zone.items()}.get(key)
        if entries is None:
            return defer.fail(dnserror.AuthoritativeDomainError(name))
        if "TIMEOUT" in entries:
            return defer.Deferred()  # never answers; the client times out
        if "SERVFAIL" in entries:
            return defer.fail(ServFail(key))
        records = [parse_record(e) for e in entries]
        answers = [dns.RRHeader(name, r.TYPE, dns.IN, r.ttl, r, auth=True)
                   for r in records if qtype == r.TYPE]
        if not answers:
            answers = [dns.RRHeader(name, r.TYPE, dns.IN, r.ttl, r, auth=True)
                       for r in records if r.TYPE == dns.CNAME]
        return defer.succeed((answers, [], []))


class _Factory(server.DNSServerFactory):
    secure: set[str] = set()

    def sendReply(self, protocol, message, address):
        if message.queries and message.rCode in (dns.OK, dns.ENAME):
            name = message.queries[0].name.name.decode().lower().rstrip(".")
            message.authenticData = int(any(name == z or name.endswith("." + z)
                                            for z in self.secure))
        return super().sendReply(protocol, message, address)

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(ServFail):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        return super().gotResolverError(failure, protocol, message, address)


class _Datagrams(dns.DNSDatagramProtocol):
    """Keeps each query as it came (twisted.names drops its EDNS part, the DO bit)."""

    def datagramReceived(self, data, addr):
        self.controller.queries.append(data)
        return super().datagramReceived(data, addr)


class DNSServer:
    def __init__(self, zone: dict[str, list[str]] | None = None, reactor=None,
                 secure: set[str] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.zone: dict[str, list[str]] = dict(zone or {})
        self.factory = _Factory(authorities=[ZoneResolver(self.zone)])
        self.factory.noisy = False
        self.secure = self.factory.secure = {z.lower().rstrip(".") for z in secure or ()}
        self.factory.queries = self.queries = []  # the UDP queries received, as bytes
        self._ports: list = []
        self.address: tuple[str, int] | None = None

    def listen(self, port: int = 0) -> tuple[str, int]:
        from twisted.internet.error import CannotListenError

        for _ in range(LISTEN_TRIES):
            protocol = _Datagrams(self.factory)
            protocol.noisy = False
            # Each try asks for ``port`` again (0: a new ephemeral one), never for the one
            # the last try got: its UDP socket closes only at the next reactor turn.
            udp = self.reactor.listenUDP(port, protocol, interface="127.0.0.1")
            got = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(got, self.factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                if port:
                    raise
                continue
            self._ports = [udp, tcp]
            self.address = ("127.0.0.1", got)
            return self.address
        raise RuntimeError("no free port for both UDP and TCP")

    def stop(self):
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True, help="write the port here once listening")
    parser.add_argument("--port", type=int, default=0, help="the port (default: any free)")
    parser.add_argument("--zone", help="JSON file: {name: [records]}")
    parser.add_argument("--record", action="append", default=[],
                        help='"NAME TYPE DATA", e.g. "example.test MX 10 mx.example.test"')
    parser.add_argument("--secure", action="append", default=[],
                        help="a zone whose answers carry the AD bit")
    args = parser.parse_args(argv)
    zone: dict[str, list[str]] = {}
    if args.zone:
        with open(args.zone, encoding="utf-8") as f:
            zone.update(json.load(f))
    for spec in args.record:
        name, _, record = spec.strip().partition(" ")
        zone.setdefault(name, []).append(record)
    from twisted.internet import reactor

    dns_server = DNSServer(zone, reactor, secure=set(args.secure))
    _, port = dns_server.listen(args.port)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.rename(tmp, args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
