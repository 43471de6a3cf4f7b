"""mailrelay-admin domain check, run as an admin runs it (the real command, in a
subprocess), against tests/dns_server.py on loopback serving correct, missing and wrong
SPF, DKIM and DMARC records."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from harness import ROOT, env
from test_dkim_admin import Admin

OUTBOUND = "192.0.2.25 2001:db8::25"


@pytest.fixture
def dns(tmp_path):
    """Start the DNS server with ``zone``; returns its port."""
    procs = []

    def start(zone: dict[str, list[str]]) -> int:
        zone_file, port_file = tmp_path / "zone.json", tmp_path / "dns.port"
        zone_file.write_text(json.dumps(zone))
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "dns_server.py"), "--zone", str(zone_file),
             "--port-file", str(port_file)], cwd=ROOT, env=env()))  # fmt: skip
        for _ in range(200):
            if port_file.exists():
                return int(port_file.read_text())
            assert procs[0].poll() is None, "the DNS server exited"
            time.sleep(0.05)
        raise AssertionError("the DNS server did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def configure(admin: Admin, port: int, outbound: str = OUTBOUND) -> None:
    admin.config.write_text(f"[server]\ndata_dir = {admin.data}\n[delivery]\n"
                            f"dns_servers = 127.0.0.1:{port}\noutbound_addresses = {outbound}\n")


def check(admin: Admin, domain: str) -> tuple[int, dict, str]:
    proc = admin("domain", "check", domain, "--json")
    text = admin("domain", "check", domain)
    assert proc.returncode == text.returncode, (proc, text)
    return proc.returncode, json.loads(proc.stdout), text.stdout


@pytest.fixture
def admin(tmp_path, dns):
    a = Admin(tmp_path)
    a.ok("account", "add", "acme", "--domains", "good.test;bare.test;bad.test")
    a.ok("account", "add", "other", "--domains", "other.test")
    keys = {}
    for domain in ("good.test", "bare.test", "bad.test", "other.test"):
        a.ok("dkim", "add", domain, "--selector", "s1")
        keys[domain] = json.loads(a.ok("dkim", "show", domain, "--json"))[0]["dns_value"]
    port = dns({
        # ip4 directly, the IPv6 address through an include.
        "good.test": ["TXT v=spf1 ip4:192.0.2.0/24 include:_spf.good.test -all"],
        "_spf.good.test": ["TXT v=spf1 ip6:2001:db8::/32 -all"],
        "s1._domainkey.good.test": [f"TXT {keys['good.test']}"],
        "_dmarc.good.test": ["TXT v=DMARC1; p=reject; rua=mailto:dmarc@good.test"],
        # SPF authorizes other addresses (its mx host among them); another domain's key;
        # DMARC without p=.
        "bad.test": ["TXT v=spf1 ip4:198.51.100.1 mx -all", "MX 10 mx.bad.test"],
        "mx.bad.test": ["A 198.51.100.2", "AAAA 2001:db8:1::2"],
        "s1._domainkey.bad.test": [f"TXT {keys['other.test']}"],
        "_dmarc.bad.test": ["TXT v=DMARC1; rua=mailto:dmarc@bad.test"],
    })
    configure(a, port)
    a.port = port
    return a


def test_correct_records_are_ok(admin):
    status, report, text = check(admin, "good.test")
    assert status == 0, report
    assert report["spf"]["status"] == "ok"
    assert report["spf"]["addresses"] == {"192.0.2.25": "pass", "2001:db8::25": "pass"}
    assert [(k["selector"], k["status"]) for k in report["dkim"]] == [("s1", "ok")]
    dmarc = report["dmarc"]
    assert (dmarc["status"], dmarc["policy"], dmarc["dkim_aligned"]) == ("ok", "reject", True)
    assert "publish:" not in text and text.count(" ok ") == 3


def test_missing_records_give_the_record_to_publish(admin):
    status, report, text = check(admin, "bare.test")
    assert status == 3
    spf, dkim, dmarc = report["spf"], report["dkim"][0], report["dmarc"]
    assert spf["status"] == dkim["status"] == dmarc["status"] == "missing"
    assert spf["publish"] == {"name": "bare.test", "type": "TXT",
                              "value": "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ~all"}
    shown = json.loads(admin.ok("dkim", "show", "bare.test", "--json"))[0]
    assert dkim["publish"]["name"] == "s1._domainkey.bare.test"
    assert dkim["publish"]["value"] == shown["dns_value"]
    assert dmarc["publish"] == {"name": "_dmarc.bare.test", "type": "TXT",
                                "value": "v=DMARC1; p=none"}
    assert 'publish: bare.test. IN TXT ( "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ~all" )' \
        in text
    assert 'publish: _dmarc.bare.test. IN TXT ( "v=DMARC1; p=none" )' in text


def test_wrong_records_are_wrong(admin):
    status, report, text = check(admin, "bad.test")
    assert status == 3
    spf, dkim, dmarc = report["spf"], report["dkim"][0], report["dmarc"]
    assert spf["status"] == "wrong"
    assert spf["addresses"] == {"192.0.2.25": "fail", "2001:db8::25": "fail"}
    assert spf["publish"]["value"] \
        == "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ip4:198.51.100.1 mx -all"
    assert dkim["status"] == "wrong" and dkim["publish"]["name"] == "s1._domainkey.bad.test"
    assert dmarc["status"] == "wrong"
    assert dmarc["publish"]["value"] == "v=DMARC1; p=none; rua=mailto:dmarc@bad.test"
    assert "wrong" in text and "found:   v=DMARC1; rua=mailto:dmarc@bad.test" in text


def test_spf_of_the_mx_host_and_without_outbound_addresses(admin):
    # The mx mechanism authorizes the MX host's addresses.
    configure(admin, admin.port, "198.51.100.2 2001:db8:1::2")
    _, report, _ = check(admin, "bad.test")
    assert report["spf"]["status"] == "ok", report["spf"]
    # Not configured: SPF is unknown, whatever the domain publishes.
    configure(admin, admin.port, "")
    status, report, _ = check(admin, "good.test")
    assert status == 3 and report["spf"]["status"] == "unknown"
    assert "outbound_addresses" in report["spf"]["detail"]
