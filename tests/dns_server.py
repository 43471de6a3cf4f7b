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

DNSSEC-signed zones (for a validating resolver in front: tests/unbound.py) are served by
SignedServer: dnspython zones, signed by ``sign(zone_text, origin)``, answered with their
RRSIGs and NSEC records as an authoritative server does::

    zone, anchor = sign(ZONE_TEXT, "signed.test")   # anchor: the DNSKEY, for unbound
    signed = SignedServer([zone]); signed.listen()

As a subprocess::

    python tests/dns_server.py --port-file F --record "example.test MX 10 mx.example.test"
    python tests/dns_server.py --port-file F --zone zone.json   # re-read when it changes
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from twisted.internet import defer, protocol
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


def _reload_on_change(path: str, records: list[str], zone: dict[str, list[str]]) -> None:
    """Re-read the zone file (and add ``records`` again) whenever it changes, so a test
    can publish a record while the server runs (write a new file and rename it over)."""
    from twisted.internet import task

    seen = [os.stat(path).st_mtime_ns]

    def reload() -> None:
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime == seen[0]:
                return
            with open(path, encoding="utf-8") as f:
                new = json.load(f)
        except (OSError, ValueError):
            return  # being replaced: next time
        seen[0] = mtime
        for spec in records:
            name, _, record = spec.strip().partition(" ")
            new.setdefault(name, []).append(record)
        zone.clear()
        zone.update(new)

    task.LoopingCall(reload).start(0.1, now=False)


def sign(text: str, origin: str, lifetime: int = 86400):
    """``text`` (a zone file's records, relative to ``origin``; SOA and NS are added)
    signed with a new ECDSA P-256 key (with NSEC); and that key's DNSKEY record as a
    trust anchor line (``signed.test. DNSKEY 257 3 13 ...``)."""
    import dns.dnssec
    import dns.zone
    from cryptography.hazmat.primitives.asymmetric import ec

    head = (f"@ 300 IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n"
            f"@ 300 IN NS ns.{origin}.\nns 300 IN A 127.0.0.1\n")
    zone = dns.zone.from_text(head + text, origin=origin + ".", relativize=False)
    key = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256,
                                    flags=257)
    dns.dnssec.sign_zone(zone, keys=[(key, dnskey)], lifetime=lifetime)
    return zone, f"{origin}. DNSKEY {dnskey.to_text()}"


def _signed_answer(zones, data: bytes):
    """The response to the query ``data`` from ``zones`` (dnspython), or None."""
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype

    try:
        query = dns.message.from_wire(data)
    except Exception:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    want_dnssec = bool(query.ednsflags & dns.flags.DO)
    qname, qtype = query.question[0].name, query.question[0].rdtype
    zone = next((z for z in zones if qname.is_subdomain(z.origin)), None)
    if zone is None:
        response.set_rcode(dns.rcode.REFUSED)
        return response

    def add(section, name, node, rdtype):
        rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
        if rdataset is None:
            return False
        response.find_rrset(section, name, dns.rdataclass.IN, rdtype,
                            create=True).update(rdataset)
        if want_dnssec:
            sigs = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, rdtype)
            if sigs is not None:
                rrsig = response.find_rrset(section, name, dns.rdataclass.IN,
                                            dns.rdatatype.RRSIG, rdtype, create=True)
                rrsig.update(sigs)
        return True

    node = zone.get_node(qname)
    apex = zone.get_node(zone.origin)
    if node is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        add(response.authority, zone.origin, apex, dns.rdatatype.SOA)
    elif not add(response.answer, qname, node, qtype):  # no data: SOA and the name's NSEC
        add(response.authority, zone.origin, apex, dns.rdatatype.SOA)
        if want_dnssec:
            add(response.authority, qname, node, dns.rdatatype.NSEC)
    return response


class _SignedDatagrams(protocol.DatagramProtocol):
    noisy = False

    def __init__(self, zones) -> None:
        self.zones = zones

    def datagramReceived(self, data, addr):
        response = _signed_answer(self.zones, data)
        if response is not None:
            self.transport.write(response.to_wire(max_size=65535), addr)


class SignedServer:
    """Authoritative for signed dnspython zones on 127.0.0.1 (UDP; answers are small)."""

    def __init__(self, zones, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.zones = list(zones)
        self._port = None
        self.address: tuple[str, int] | None = None

    def listen(self) -> tuple[str, int]:
        self._port = self.reactor.listenUDP(0, _SignedDatagrams(self.zones),
                                            interface="127.0.0.1")
        self.address = ("127.0.0.1", self._port.getHost().port)
        return self.address

    def stop(self):
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)


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
    if args.zone:
        _reload_on_change(args.zone, args.record, dns_server.zone)
    _, port = dns_server.listen(args.port)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.rename(tmp, args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
