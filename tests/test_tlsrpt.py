"""TLS reporting (RFC 8460): result types, sessions counted on disk per day, the
aggregate report, rua records, and a report POSTed to a real HTTPS server."""

from __future__ import annotations

import base64
import gzip
import io
import json
from pathlib import Path

import certs
from harness import TempPaths
from https_server import HTTPSServer
from smtp_sink import SMTPSink
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.delivery import mtasts, tlsrpt
from mailrelay.delivery.client import Courier, Job
from mailrelay.delivery.dane import TlsPolicy
from mailrelay.delivery.dnssec import TLSA, Answer
from mailrelay.delivery.router import Hop


def sync(f, *args):
    return defer.succeed(f(*args))


STS = mtasts.parse_policy("version: STSv1\nmode: enforce\nmx: mx.x.test\nmax_age: 60\n",
                          "x.test", "1", 0)


class Lookup:
    """A DNS answer for the _smtp._tls record, as the relay's lookups give it."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records

    def lookup(self, name: str, rdtype: str):
        return defer.succeed(Answer(self.records.get(name, []), [], False))


class ClassifyTests(unittest.TestCase):
    def test_reasons_as_the_client_words_them(self):
        cases = {
            "TLS policy mta-sts (x): the server does not offer STARTTLS":
                "starttls-not-supported",
            "TLS policy mta-sts (x): TLS certificate does not match the host name":
                "certificate-host-mismatch",
            "the certificate chains to a DANE-TA record, but its names (a) do not include b":
                "certificate-host-mismatch",
            "the certificate of CN=x has expired or is not yet valid": "certificate-expired",
            "TLS handshake failed: certificate verify failed": "certificate-not-trusted",
            "no TLSA record matches the certificate chain": "tlsa-invalid",
            "connection closed by the server": "validation-failure",
        }
        for text, kind in cases.items():
            self.assertEqual(tlsrpt.classify(text), kind, text)

    def test_rua(self):
        self.assertEqual(tlsrpt.parse_rua(["v=TLSRPTv1; rua=mailto:a@x.test,https://r.test/x"]),
                         ["mailto:a@x.test", "https://r.test/x"])
        self.assertEqual(tlsrpt.parse_rua(["v=TLSRPTv1;rua=mailto:a@x.test", "v=TLSRPTv1;"]), [])
        self.assertEqual(tlsrpt.parse_rua(["v=spf1 -all"]), [])


class CounterTests(TempPaths, unittest.TestCase):
    def test_sessions_per_day_and_the_report(self):
        clock = task.Clock()
        clock.advance(86400 * 20000 + 3600)  # 2024-10-04, 01:00 UTC
        directory = self.mktemp()
        counter = tlsrpt.Counter(directory, clock, in_thread=sync)
        sts = Hop("mx.x.test", address="192.0.2.1",
                  policy=TlsPolicy("mta-sts", sts=STS, domain="x.test"))
        dane = Hop("mx.y.test", address="192.0.2.2",
                   policy=TlsPolicy("dane", tlsa=(TLSA(3, 1, 1, b"\x01" * 32),),
                                    domain="y.test"))
        counter.session(sts, None)
        counter.session(sts, None)
        counter.session(sts, "TLS policy mta-sts: the server does not offer STARTTLS")
        counter.session(dane, "no TLSA record matches the certificate chain")
        counter.fetch_failed("z.test", mtasts.PolicyInvalid("no mx line"))
        self.assertEqual(list(Path(directory).glob("*")) if Path(directory).exists() else [],
                         [])  # nothing written before the batch's second
        clock.advance(tlsrpt.FLUSH)
        lines = (Path(directory) / "2024-10-04.jsonl").read_text().splitlines()
        self.assertEqual(len(lines), 5)

        domains = tlsrpt.aggregate(json.loads(x) for x in lines)
        self.assertEqual(sorted(domains), ["x.test", "y.test", "z.test"])
        [x] = domains["x.test"]
        self.assertEqual(x["policy"], {"policy-type": "sts", "policy-domain": "x.test",
                                       "policy-string": STS.text.splitlines(),
                                       "mx-host": ["mx.x.test"]})
        self.assertEqual(x["summary"], {"total-successful-session-count": 2,
                                        "total-failure-session-count": 1})
        self.assertEqual(x["failure-details"], [{
            "result-type": "starttls-not-supported", "failed-session-count": 1,
            "receiving-mx-hostname": "mx.x.test", "receiving-ip": "192.0.2.1",
            "failure-reason-code": "TLS policy mta-sts: the server does not offer STARTTLS"}])
        [y] = domains["y.test"]
        self.assertEqual(y["policy"]["policy-string"], ["3 1 1 " + "01" * 32])
        self.assertEqual(y["failure-details"][0]["result-type"], "tlsa-invalid")
        [z] = domains["z.test"]
        self.assertEqual(z["failure-details"][0]["result-type"], "sts-policy-invalid")
        report = tlsrpt.report("2024-10-04", domains["x.test"], "relay.test", "pm@relay.test")
        self.assertEqual(report["date-range"], {"start-datetime": "2024-10-04T00:00:00Z",
                                                "end-datetime": "2024-10-04T23:59:59Z"})


class PostTests(TempPaths, unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_finished_day_is_posted_once_and_today_waits(self):
        ca = certs.TestCA(Path(self.mktemp()))
        cert, key = ca.issue("reports.test", chain=True)  # valid for 127.0.0.1 too
        https = HTTPSServer(str(cert), str(key))
        port = https.listen()
        self.addCleanup(https.stop)
        directory = Path(self.mktemp())
        directory.mkdir()
        entry = {"policy": tlsrpt.describe(TlsPolicy("mta-sts", sts=STS, domain="x.test")),
                 "mx": "mx.x.test", "ip": "", "result": "success"}
        for day in ("2024-10-03", "2024-10-04"):
            (directory / f"{day}.jsonl").write_text(json.dumps(entry) + "\n")
        clock = task.Clock()
        clock.advance(86400 * 20000 + 3600)  # 2024-10-04
        lookup = Lookup({"_smtp._tls.x.test": [
            f"v=TLSRPTv1; rua=https://127.0.0.1:{port}/tlsrpt"]})
        reporter = tlsrpt.Reporter(str(directory), lookup, None, clock, "relay.test",
                                   "pm@relay.test", "pm@relay.test",
                                   trust=mtasts.trust_root(str(ca.cert_path)), in_thread=sync,
                                   reactor=reactor)
        yield reporter.run()
        [post] = https.posts
        self.assertEqual((post["path"], post["content_type"]),
                         ("/tlsrpt", "application/tlsrpt+gzip"))
        doc = json.loads(gzip.decompress(base64.b64decode(post["body"])))
        self.assertEqual(doc["policies"][0]["summary"]["total-successful-session-count"], 1)
        self.assertEqual(doc["date-range"]["start-datetime"], "2024-10-03T00:00:00Z")
        self.assertEqual(sorted(p.name for p in directory.iterdir()),
                         ["2024-10-03.jsonl.sent", "2024-10-04.jsonl"])
        yield reporter.run()
        self.assertEqual(len(https.posts), 1)


class SessionTests(TempPaths, unittest.TestCase):
    """What the courier reports of each session, against real sinks."""

    @defer.inlineCallbacks
    def sessions(self, hop: Hop, sink: SMTPSink) -> list:
        sessions = []
        courier = Courier(reactor, "relay.test", 5, 10)
        courier.on_session = lambda hop, problem: sessions.append((hop.host, problem))
        jobs = iter([Job("q1", "s@a.test", ["bob@x.test"],
                         lambda: io.BytesIO(b"Subject: x\r\n\r\nhi\r\n"))])
        yield courier.send([hop], lambda: next(jobs, None), lambda j, results: None)
        return sessions

    @defer.inlineCallbacks
    def test_mta_sts_testing_delivers_and_reports(self):
        ca = certs.TestCA(Path(self.mktemp()))
        cert, key = ca.issue("mx.other.test", chain=True)
        pkix = mtasts.Pkix(str(ca.cert_path))
        policy = TlsPolicy("may", "test", names=("mx.x.test",), sts=STS, domain="x.test",
                           pkix=pkix)
        plain, wrong = SMTPSink(), SMTPSink(tls_cert=str(cert), tls_key=str(key))
        for sink in (plain, wrong):
            sink.listen()
            self.addCleanup(sink.stop)
        for sink, problem in ((plain, "the server does not offer STARTTLS"),
                              (wrong, "TLS certificate does not match the host name")):
            hop = Hop("mx.x.test", sink.port, address="127.0.0.1", policy=policy)
            sessions = yield self.sessions(hop, sink)
            self.assertEqual(sessions, [("mx.x.test", problem)])
            self.assertEqual(len(sink.messages), 1)  # delivered all the same
            self.assertEqual(tlsrpt.classify(problem), {
                plain: "starttls-not-supported", wrong: "certificate-host-mismatch"}[sink])
        right, key = ca.issue("mx.x.test", chain=True)
        good = SMTPSink(tls_cert=str(right), tls_key=str(key))
        good.listen()
        self.addCleanup(good.stop)
        hop = Hop("mx.x.test", good.port, address="127.0.0.1", policy=policy)
        self.assertEqual((yield self.sessions(hop, good)), [("mx.x.test", None)])
