"""mailrelay-admin domain check of a domain whose account has a bounce domain: the
return-path item (the bounce domain's MX names the relay, its SPF authorizes the relay's
addresses) and DMARC's SPF alignment through it, against tests/dns_server.py."""

from __future__ import annotations

import pytest
from test_dkim_admin import Admin
from test_domain_check import OUTBOUND, check, dns  # noqa: F401 (dns: a fixture)


@pytest.fixture
def admin(tmp_path, dns):  # noqa: F811
    a = Admin(tmp_path)
    for account, domain in (("good", "good.test"), ("bare", "bare.test"), ("bad", "bad.test"),
                            ("plain", "plain.test")):
        a.ok("account", "add", account, "--domains", domain)
        if account != "plain":
            a.ok("account", "set", account, "--bounce-domain", f"bounces.{domain}")
    port = dns({
        "good.test": ["TXT v=spf1 -all"],  # the From: domain itself sends nothing
        "_dmarc.good.test": ["TXT v=DMARC1; p=reject"],
        "bounces.good.test": ["MX 10 relay.test",
                              "TXT v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 -all"],
        "bounces.bad.test": ["MX 10 mx.elsewhere.test", "TXT v=spf1 ip4:198.51.100.1 -all"],
        "_dmarc.bad.test": ["TXT v=DMARC1; p=quarantine"],
    })  # fmt: skip
    a.config.write_text(f"[server]\ndata_dir = {a.data}\nhostname = relay.test\n"
                        f"[delivery]\ndns_servers = 127.0.0.1:{port}\n"
                        f"outbound_addresses = {OUTBOUND}\n")
    return a


def test_a_correct_return_path_is_ok_and_aligns_dmarc_by_spf(admin):
    _, report, text = check(admin, "good.test")
    rp = report["return_path"]
    assert (rp["domain"], rp["status"], rp["mx"]["status"], rp["spf"]["status"]) == (
        "bounces.good.test", "ok", "ok", "ok")
    assert rp["mx"]["record"] == "10 relay.test."
    # No DKIM key, yet DMARC p=reject is met: SPF of the bounce domain aligns (relaxed).
    dmarc = report["dmarc"]
    assert (dmarc["status"], dmarc["spf_aligned"], dmarc["dkim_aligned"]) == ("ok", True, False)
    assert "return-path MX   ok       bounces.good.test: MX relay.test" in text


def test_missing_and_wrong_return_paths_say_what_to_publish(admin):
    status, report, text = check(admin, "bare.test")
    rp = report["return_path"]
    assert status == 3 and rp["status"] == rp["mx"]["status"] == rp["spf"]["status"] == "missing"
    assert rp["mx"]["publish"] == {"name": "bounces.bare.test", "type": "MX",
                                   "value": "10 relay.test."}
    assert rp["spf"]["publish"]["value"] == "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ~all"
    assert "publish: bounces.bare.test. IN MX 10 relay.test." in text
    status, report, text = check(admin, "bad.test")
    rp = report["return_path"]
    assert status == 3 and rp["status"] == rp["mx"]["status"] == rp["spf"]["status"] == "wrong"
    assert "mx.elsewhere.test, not relay.test" in rp["mx"]["detail"]
    assert rp["spf"]["publish"]["value"] == \
        "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 ip4:198.51.100.1 -all"
    assert report["dmarc"]["status"] == "wrong"  # p=quarantine, aligned neither way


def test_an_account_without_bounce_domain_has_no_return_path_item(admin):
    _, report, text = check(admin, "plain.test")
    assert "return_path" not in report and "return-path" not in text
