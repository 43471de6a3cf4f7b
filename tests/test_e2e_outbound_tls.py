"""End to end through twistd: outbound TLS that cannot be downgraded, beyond DANE.

MTA-STS (RFC 8461) policies served over HTTPS by a twisted.web server whose certificate
a test CA signed (the relay trusts it through ``[delivery] tls_ca_file``), TXT records
from a DNS server on loopback, and SMTP sinks on 127.0.0.1-4: one with a valid
certificate, one with a certificate for another name, one that does not offer STARTTLS,
one valid but not in its domain's policy. Every downgrade attempt keeps its message
queued with the reason, and nothing reaches a server that failed its check.

REQUIRETLS (RFC 8689): offered inside TLS only; such a message goes over MTA-STS-checked
TLS to a sink that offers it, and is returned with 5.7.30 where TLS is not checked or
the next hop does not offer REQUIRETLS.

TLS reporting (RFC 8460): the day's sessions (successes, failures of each kind) are
reported the next day to each domain's ``_smtp._tls`` rua by mail through the relay's
own queue; the reports validate against the JSON schema of RFC 8460 4.4."""

from __future__ import annotations

import base64
import datetime
import email
import gzip
import json
import os
import time

import pytest
from certs import TestCA
from harness import DNS, Peer, Relay, Sink, message, wait_for

PASSWORD = "correct horse battery"
LOGIN = ("doe.test", PASSWORD)
WELL_KNOWN = ".well-known/mta-sts.txt"


def policy(mode: str, *mx: str) -> str:
    lines = "".join(f"mx: {m}\r\n" for m in mx)
    return f"version: STSv1\r\nmode: {mode}\r\n{lines}max_age: 604800\r\n"


POLICIES = {
    "good": policy("enforce", "mx.good.test"),
    "wrong": policy("enforce", "mx.wrong.test"),
    "strip": policy("enforce", "mx.strip.test"),
    "evil": policy("enforce", "mx.real.test"),  # its MX host is not listed
    "testing": policy("testing", "mx.testing.test"),
    "norequire": policy("enforce", "mx.evil.test"),  # verified, without REQUIRETLS
}


@pytest.fixture
def world(tmp_path):
    ca = TestCA(tmp_path / "ca")
    certs = {name: ca.issue(f"mx.{name}.test", chain=True) for name in ("good", "evil")}
    certs["wrong"] = ca.issue("mx.other.test", chain=True)  # valid, for another name
    for attempt in range(5):  # the first sink's port, free on 127.0.0.1, may be taken on
        sinks = {}            # another loopback address by something else: pick again
        try:
            for n, name in enumerate(["good", "wrong", "strip", "evil"], start=1):
                tls = ["--tls-cert", str(certs[name][0]), "--tls-key",
                       str(certs[name][1])] if name in certs else []
                port = ["--port", str(sinks["good"].port)] if sinks else ["--requiretls"]
                sinks[name] = Sink(tmp_path / f"{name}-{attempt}", "--interface",
                                   f"127.0.0.{n}", *port, *tls)
            break
        except RuntimeError as e:
            for sink in sinks.values():
                sink.stop()
            if "Address already in use" not in str(e) or attempt == 4:
                raise
    root = tmp_path / "https"
    for name, text in POLICIES.items():
        path = root / f"mta-sts.{name}.test" / WELL_KNOWN
        path.parent.mkdir(parents=True)
        path.write_text(text)
    names = tuple(f"mta-sts.{name}.test" for name in POLICIES)
    cert, key = ca.issue(names[0], names=names[1:], chain=True)
    https = Peer(tmp_path / "https-server", "https_server.py", "--root", str(root),
                 "--tls-cert", str(cert), "--tls-key", str(key))
    records = []
    for n, name in enumerate(["good", "wrong", "strip", "evil"], start=1):
        records += [f"{name}.test MX 10 mx.{name}.test", f"mx.{name}.test A 127.0.0.{n}"]
    records += ["testing.test MX 10 mx.testing.test", "mx.testing.test A 127.0.0.2",
                "norequire.test MX 10 mx.evil.test",
                "doe.test MX 10 mx.good.test"]  # the bounces come back to the good sink
    for name in POLICIES:
        records += [f"_mta-sts.{name}.test TXT v=STSv1; id=2026{name}",
                    f"mta-sts.{name}.test A 127.0.0.1"]
    for name in ("good", "wrong", "testing", "evil"):
        records.append(f"_smtp._tls.{name}.test TXT v=TLSRPTv1; rua=mailto:tlsrpt@good.test")
    dns = DNS(tmp_path / "dns", records)
    yield ca, sinks, https, dns
    dns.stop()
    https.stop()
    for sink in sinks.values():
        sink.stop()


def to(sink: Sink, recipient: str, count: int = 0) -> list[tuple[dict, bytes]]:
    """The messages at ``sink`` for recipients ending with ``recipient``; waits for
    ``count`` of them."""
    def found():
        return [(m, d) for m, d in sink.messages() if m["recipients"][0].endswith(recipient)]
    if count:
        wait_for(lambda: len(found()) >= count, timeout=60, what=f"{count} for {recipient}")
    return found()


def send(relay: Relay, rcpt: str, subject: str, *options: str) -> str:
    with relay.smtp(login=LOGIN) as c:
        c.mail("a@doe.test", list(options))
        c.rcpt(rcpt)
        code, text = c.data(message("a@doe.test", rcpt, subject=subject))
        assert code == 250
        return text.decode().rsplit(" ", 1)[-1]


def test_outbound_tls_policies(tmp_path, world):
    ca, sinks, https, dns = world
    relay = Relay(tmp_path / "relay", config=(
        f"[delivery]\ndns_servers = 127.0.0.1:{dns.port}\nport = {sinks['good'].port}\n"
        f"allow_local_mx = yes\nretry_first = 1s\nretry_max = 2s\n"
        f"tls_ca_file = {ca.cert_path}\nmta_sts_port = {https.port}\n"))
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.add_user("doe.test", PASSWORD)
    relay.start()
    try:
        ids = {name: send(relay, f"bob@{name}.test", name) for name in POLICIES
               if name != "norequire"}
        required = {name: send(relay, f"carol@{name}.test", name, "REQUIRETLS", "RET=FULL")
                    for name in ("good", "testing", "norequire")}

        # enforce: delivered over TLS, the certificate verified for the MX host name; the
        # REQUIRETLS message too, on its own connection, with REQUIRETLS passed on
        received = {m["recipients"][0]: m for m, _ in to(sinks["good"], ".test", 2)
                    if m["recipients"][0].endswith("@good.test")}
        assert received["bob@good.test"]["tls"] and received["carol@good.test"]["tls"]
        assert "REQUIRETLS" in received["carol@good.test"]["mail_params"].split()
        assert "REQUIRETLS" not in received["bob@good.test"]["mail_params"].split()
        assert received["carol@good.test"]["connection"] != received["bob@good.test"][
            "connection"]
        # testing: delivered although the certificate names another host
        [(meta, _)] = sinks["wrong"].wait(1)
        assert meta["recipients"] == ["bob@testing.test"] and meta["tls"]

        sts = "MTA-STS enforce (policy 2026{0} of {0}.test)"
        expected = {
            "wrong": ("mx.wrong.test[127.0.0.2]: TLS policy mta-sts (", sts.format("wrong"),
                      "): TLS certificate does not match the host name"),
            "strip": ("mx.strip.test[127.0.0.3]: TLS policy mta-sts (", sts.format("strip"),
                      "): the server does not offer STARTTLS"),
            "evil": ("mx.evil.test: not an MX host of " + sts.format("evil"),
                     " (mx: mx.real.test), not used"),
        }
        for name, parts in expected.items():
            state = relay.data / "spool" / "state" / f"{ids[name]}.json"
            wait_for(state.exists, timeout=30, what=f"a deferred attempt for {name}")
            shown = relay.admin("queue", "show", ids[name]).stdout
            assert "last error:  451 4.7.5 " in shown, shown
            for part in parts:
                assert part in shown, (part, shown)
            doc = json.loads(relay.admin("queue", "show", ids[name], "--json").stdout)
            assert doc["pending"] == [f"bob@{name}.test"]
        # nothing reached a server that failed its check
        assert sinks["strip"].messages() == [] and sinks["evil"].messages() == []
        assert [m["recipients"] for m, _ in sinks["wrong"].messages()] == [
            ["bob@testing.test"]]
        assert len(to(sinks["good"], "@good.test")) == 2

        # REQUIRETLS without checked TLS (MTA-STS testing), or to a next hop that does not
        # offer it: returned to the sender, never sent
        reasons = {"testing": "the next hop is not authenticated by DANE or MTA-STS (TLS "
                              "policy may)",
                   "norequire": "the next hop does not offer REQUIRETLS"}
        for name, reason in reasons.items():
            line = f"{required[name]} to=<carol@{name}.test> via "
            wait_for(lambda line=line: line in relay.log(), what=f"the attempt of {name}")
            [found] = [x for x in relay.log().splitlines() if line in x]
            assert f": 550 5.7.30 REQUIRETLS: {reason}" in found, found
            wait_for(lambda name=name: all(required[name] not in p.name
                                           for p in relay.spool_files()),
                     what=f"the REQUIRETLS message for {name} out of the queue")
        # the bounces hold the headers only, whatever RET= asked (RFC 8689 5)
        for _, data in to(sinks["good"], "a@doe.test", 2):
            bounce = email.message_from_bytes(data)
            kinds = [p.get_content_type() for p in bounce.walk()]
            assert "text/rfc822-headers" in kinds and "message/rfc822" not in kinds, kinds
            assert b"hello" not in data
        check_tls_reports(relay, sinks["good"])

        with relay.smtp(starttls=False) as c:
            c.ehlo()
            assert not c.has_extn("requiretls")  # offered inside TLS only
        with relay.smtp() as c:
            c.ehlo()
            assert c.has_extn("requiretls")
        log = relay.log()
        assert (f"{ids['good']} to=<bob@good.test> via mx.good.test[127.0.0.1] sent: 250 "
                in log)
        assert "tls=yes tls_policy=mta-sts" in log
        assert "delivery: MTA-STS policy 2026good of good.test: mode enforce" in log
        cached = json.loads((relay.data / "mta-sts" / "good.test.json").read_text())
        assert cached["id"] == "2026good" and cached["max_age"] == 604800
    finally:
        relay.stop()


RESULT_TYPES = ["starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid",
                "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
                "sts-policy-invalid", "sts-webpki-invalid"]
STRING = {"type": "string"}
COUNT = {"type": "integer", "minimum": 0}
# RFC 8460 4.4 (the report's fields), as a JSON schema.
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": STRING,
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                           "end-datetime": {"type": "string", "format": "date-time"}}},
        "contact-info": STRING,
        "report-id": STRING,
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object", "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": STRING},
                        "policy-domain": STRING,
                        "mx-host": {"type": "array", "items": STRING}}},
                "summary": {
                    "type": "object",
                    "required": ["total-successful-session-count",
                                 "total-failure-session-count"],
                    "properties": {"total-successful-session-count": COUNT,
                                   "total-failure-session-count": COUNT}},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": RESULT_TYPES},
                        "sending-mta-ip": STRING, "receiving-mx-hostname": STRING,
                        "receiving-mx-helo": STRING, "receiving-ip": STRING,
                        "failed-session-count": COUNT, "additional-information": STRING,
                        "failure-reason-code": STRING}}}}}},
    },
}


def check_tls_reports(relay: Relay, sink: Sink) -> None:
    """Today's sessions counted; as if the day were over (its file dated yesterday), a
    restarted relay reports them to each domain's rua."""
    import jsonschema  # a test extra (setup.cfg)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    counts = relay.data / "tls-rpt" / f"{today}.jsonl"
    wait_for(lambda: counts.exists() and "certificate-host-mismatch" in counts.read_text()
             and "starttls-not-supported" in counts.read_text(), what="sessions counted")
    relay.stop()
    yesterday = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).strftime(
        "%Y-%m-%d")
    os.rename(counts, counts.with_name(f"{yesterday}.jsonl"))
    relay.start()
    reports = {}
    for meta, data in to(sink, "tlsrpt@good.test", 4):
        msg = email.message_from_bytes(data)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        [part] = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
        doc = json.loads(gzip.decompress(base64.b64decode(part.get_payload())))
        jsonschema.validate(doc, SCHEMA)
        assert msg["TLS-Report-Domain"] in msg["Subject"]
        assert part.get_filename().startswith(f"relay.test!{msg['TLS-Report-Domain']}!")
        assert meta["sender"] == ""  # a report never bounces
        reports[msg["TLS-Report-Domain"]] = doc
    assert sorted(reports) == ["evil.test", "good.test", "testing.test", "wrong.test"]
    assert relay.data.joinpath("tls-rpt", f"{yesterday}.jsonl.sent").exists()

    def summary(domain):
        [policy] = reports[domain]["policies"]
        assert policy["policy"]["policy-type"] == "sts"
        assert policy["policy"]["policy-string"] == POLICIES[domain.split(".")[0]].splitlines()
        s = policy["summary"]
        kinds = {d["result-type"] for d in policy.get("failure-details", [])}
        return s["total-successful-session-count"], s["total-failure-session-count"], kinds

    for doc in reports.values():
        assert doc["date-range"]["start-datetime"] == f"{yesterday}T00:00:00Z"
    ok, failed, kinds = summary("good.test")
    assert ok >= 2 and failed == 0 and kinds == set()
    ok, failed, kinds = summary("wrong.test")
    assert ok == 0 and failed >= 1 and kinds == {"certificate-host-mismatch"}
    ok, failed, kinds = summary("testing.test")  # delivered, and reported
    assert ok == 0 and failed >= 1 and kinds == {"certificate-host-mismatch"}
    ok, failed, kinds = summary("evil.test")  # its MX host is not in the policy
    assert ok == 0 and failed >= 1 and kinds == {"validation-failure"}
