"""DKIM records looked up by dkim list/show, and key rotation (rotate, activate, retire),
through the real mailrelay-admin against tests/dns_server.py on loopback."""

from __future__ import annotations

import json

from test_dkim_admin import Admin
from test_domain_check import configure, dns  # noqa: F401 (the fixture)

from mailrelay.dkim import Signer

MESSAGE = (b"From: a@good.test\r\nTo: b@example.test\r\nSubject: hi\r\n"
           b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\nMessage-ID: <1@good.test>\r\n\r\nhello\r\n")


def value(admin: Admin, domain: str, selector: str) -> str:
    shown = json.loads(admin.ok("dkim", "show", domain, "--json", "--no-dns"))
    return next(k["dns_value"] for k in shown if k["selector"] == selector)


def test_show_and_list_say_whether_each_record_is_published(tmp_path, dns):  # noqa: F811
    admin = Admin(tmp_path)
    admin.ok("account", "add", "acme", "--domains", "good.test")
    # Two RSA keys and an Ed25519 one: the second RSA key is pending.
    for selector, kind in (("ok", "rsa"), ("gone", "ed25519"), ("other", "rsa")):
        admin.ok("dkim", "add", "good.test", "--selector", selector, "--type", kind)
    configure(admin, dns({
        "ok._domainkey.good.test": [f"TXT {value(admin, 'good.test', 'ok')}"],
        "other._domainkey.good.test": [f"TXT {value(admin, 'good.test', 'gone')}"],
    }))
    shown = json.loads(admin.ok("dkim", "show", "good.test", "--json"))
    assert {k["selector"]: k["published"] for k in shown} \
        == {"ok": "ok", "gone": "missing", "other": "different"}  # fmt: skip
    # A second key of a type waits for its record: it would sign before it is published.
    assert {k["selector"]: k["state"] for k in shown} \
        == {"ok": "active", "gone": "active", "other": "pending"}  # fmt: skip
    listed = json.loads(admin.ok("dkim", "list", "--json"))
    assert {k["selector"]: k["published"] for k in listed} \
        == {"ok": "ok", "gone": "missing", "other": "different"}  # fmt: skip
    assert "in DNS: different" in admin.ok("dkim", "show", "good.test")


def test_rotation_switches_signing_only_once_the_new_record_is_published(tmp_path,
                                                                        dns):  # noqa: F811
    admin = Admin(tmp_path)
    admin.ok("account", "add", "acme", "--domains", "good.test")
    admin.ok("dkim", "add", "good.test", "--selector", "old")
    zone = {"old._domainkey.good.test": [f"TXT {value(admin, 'good.test', 'old')}"]}
    configure(admin, dns(zone))
    assert "pending" in admin.ok("dkim", "rotate", "good.test", "--selector", "new")
    states = {k["selector"]: k["state"] for k in
              json.loads(admin.ok("dkim", "list", "--json", "--no-dns"))}  # fmt: skip
    assert states == {"old": "active", "new": "pending"}

    refused = admin("dkim", "activate", "good.test")
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "new._domainkey.good.test is missing in DNS" in refused.stderr
    assert json.loads(admin.ok("dkim", "show", "good.test", "--json"))[0]["published"] \
        == "missing"  # fmt: skip

    zone["new._domainkey.good.test"] = [f"TXT {value(admin, 'good.test', 'new')}"]
    (tmp_path / "dns.port").unlink()  # a second server, serving the new record
    configure(admin, dns(zone))
    out = admin.ok("dkim", "activate", "good.test")
    assert "signed with selector 'new'" in out
    assert "dkim retire good.test old" in out
    keys = {k["selector"]: k for k in json.loads(admin.ok("dkim", "list", "--json"))}
    assert {s: (k["state"], k["published"]) for s, k in keys.items()} \
        == {"old": ("retiring", "ok"), "new": ("active", "ok")}  # fmt: skip
    assert keys["old"]["changed"] is not None

    signer = Signer(str(admin.data / "dkim"))
    signer.refresh()
    signed = signer.sign(MESSAGE, "acme")
    assert signed.count(b"DKIM-Signature:") == 1
    assert b"s=new;" in signed and b"s=old;" not in signed

    refused = admin("dkim", "retire", "good.test", "new")
    assert refused.returncode != 0 and "is active, not retiring" in refused.stderr
    out = admin.ok("dkim", "retire", "good.test", "old")
    assert "old._domainkey.good.test can now be withdrawn" in out
    assert [k["selector"] for k in json.loads(admin.ok("dkim", "list", "--json", "--no-dns"))] \
        == ["new"]  # fmt: skip
    assert not (admin.data / "dkim" / "good.test.old.pem").exists()
