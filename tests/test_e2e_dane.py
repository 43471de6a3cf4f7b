"""End to end through twistd: DANE (RFC 7672) against SMTP sinks on loopback addresses,
with a DNS server that sets the AD bit for the zones a validating resolver would have
validated. Every downgrade attempt keeps its message queued, with the reason in
``mailrelay-admin queue show``, and nothing reaches a server that failed its check."""

from __future__ import annotations

import hashlib
import json

import pytest
from certs import TestCA
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from harness import DNS, Relay, Sink, message, wait_for

PASSWORD = "correct horse battery"
LOGIN = ("doe.test", PASSWORD)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def world(tmp_path):
    """Sinks on 127.0.0.1-5, one port; DNS for good, self, wrong, expired, strip, fail."""
    from cryptography import x509

    ca = TestCA(tmp_path / "ca")
    good = ca.issue("mx.good.test", chain=True)
    self_signed = ca.issue("mx.self.test", self_signed=True)
    wrong = ca.issue("mx.other.test", chain=True)  # a valid certificate, another name
    expired = ca.issue("mx.expired.test", expired=True, chain=True)
    sinks = {}
    first = Sink(tmp_path / "good", "--tls-cert", str(good[0]), "--tls-key", str(good[1]))
    sinks["good"] = first
    for n, (name, cert) in enumerate([("self", self_signed), ("wrong", wrong),
                                      ("expired", expired), ("strip", None)], start=2):
        tls = ["--tls-cert", str(cert[0]), "--tls-key", str(cert[1])] if cert else []
        sinks[name] = Sink(tmp_path / name, "--interface", f"127.0.0.{n}", "--port",
                           str(first.port), *tls)
    ta = sha256_hex(ca.cert.public_bytes(Encoding.DER))
    [self_cert] = x509.load_pem_x509_certificates(self_signed[0].read_bytes())
    ee = sha256_hex(self_cert.public_key().public_bytes(Encoding.DER,
                                                         PublicFormat.SubjectPublicKeyInfo))
    records = []
    for n, name in enumerate(["good", "self", "wrong", "expired", "strip"], start=1):
        records += [f"{name}.test MX 10 mx.{name}.test", f"mx.{name}.test A 127.0.0.{n}"]
        tlsa = f"TLSA 3 1 1 {ee}" if name in ("self", "strip") else f"TLSA 2 0 1 {ta}"
        records.append(f"_{first.port}._tcp.mx.{name}.test {tlsa}")  # the port MX use
    records += ["fail.test MX 10 mx.fail.test", "mx.fail.test A 127.0.0.1",
                f"_{first.port}._tcp.mx.fail.test SERVFAIL"]
    zones = ["good.test", "self.test", "wrong.test", "expired.test", "strip.test", "fail.test"]
    dns = DNS(tmp_path / "dns", records, secure=zones)
    yield sinks, dns
    dns.stop()
    for sink in sinks.values():
        sink.stop()


def test_dane_delivers_only_where_the_certificate_matches(tmp_path, world):
    sinks, dns = world
    relay = Relay(tmp_path / "relay", config=(
        f"[delivery]\ndns_servers = 127.0.0.1:{dns.port}\nport = {sinks['good'].port}\n"
        "allow_local_mx = yes\nretry_first = 1s\nretry_max = 2s\n"))
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.add_user("doe.test", PASSWORD)
    relay.start()
    try:
        ids = {}
        for name in ("good", "self", "wrong", "expired", "strip", "fail"):
            with relay.smtp(login=LOGIN) as c:
                rcpt = f"bob@{name}.test"
                c.mail("a@doe.test")
                c.rcpt(rcpt)
                code, text = c.data(message("a@doe.test", rcpt, subject=name))
                assert code == 250
                ids[name] = text.decode().rsplit(" ", 1)[-1]
        [(meta, _)] = sinks["good"].wait(1)
        assert meta["recipients"] == ["bob@good.test"] and meta["tls"]
        [(meta, _)] = sinks["self"].wait(1)
        assert meta["recipients"] == ["bob@self.test"] and meta["tls"]

        expected = {
            "wrong": "mx.wrong.test[127.0.0.3]: TLS policy dane (default; DNSSEC-validated "
                     "TLSA for mx.wrong.test): the certificate chains to a DANE-TA record, "
                     "but its names (mx.other.test) do not include mx.wrong.test",
            "expired": "mx.expired.test[127.0.0.4]: TLS policy dane (default; "
                       "DNSSEC-validated TLSA for mx.expired.test): the certificate chains "
                       "to a DANE-TA record, but the certificate of CN=mx.expired.test has "
                       "expired or is not yet valid",
            "strip": "mx.strip.test[127.0.0.5]: TLS policy dane (default; DNSSEC-validated "
                     "TLSA for mx.strip.test): the server does not offer STARTTLS",
            "fail": f"mx.fail.test: TLSA lookup for _{sinks['good'].port}._tcp.mx.fail.test "
                    "failed (SERVFAIL), TLS policy dane (default): not sent",
        }
        for name, reason in expected.items():
            state = relay.data / "spool" / "state" / f"{ids[name]}.json"
            wait_for(state.exists, timeout=30, what=f"a deferred attempt for {name}")
            shown = relay.admin("queue", "show", ids[name]).stdout
            assert f"last error:  451 4.7.5 {reason}" in shown, shown
            assert f"bob@{name}.test  pending  451 4.7.5 {reason}" in shown, shown
            doc = json.loads(relay.admin("queue", "show", ids[name], "--json").stdout)
            assert doc["pending"] == [f"bob@{name}.test"]
        # nothing reached a server that failed its check, nor another one
        for name in ("wrong", "expired", "strip"):
            assert sinks[name].messages() == [], name
        assert len(sinks["good"].messages()) == 1 and len(sinks["self"].messages()) == 1
        log = relay.log()
        assert log.count(f"delivery: DANE on: DNSSEC status from 127.0.0.1:{dns.port}") == 1
        assert (f"{ids['good']} to=<bob@good.test> via mx.good.test[127.0.0.1] sent: 250 "
                in log)
        assert "tls=yes tls_policy=dane" in log
        assert "UDP Port" not in log and "_UDPQuery" not in log  # each DNS query is quiet
    finally:
        relay.stop()
