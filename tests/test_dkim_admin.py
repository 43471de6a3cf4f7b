"""DKIM keys: the store (manage/dkim.py) and mailrelay-admin dkim, run as an admin runs it
(the real command, in a subprocess)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from harness import ROOT, env
from test_dkim import MSG, value

from mailrelay.dkim import Signer, signature
from mailrelay.manage.dkim import DkimError, DkimKeys, txt_strings
from mailrelay.manage.stores import at_once


class Admin:
    def __init__(self, tmp_path) -> None:
        self.data = tmp_path / "data"
        self.config = tmp_path / "mailrelay.ini"
        self.config.write_text(f"[server]\ndata_dir = {self.data}\n")

    def __call__(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mailrelay.admin.cli", "-c", str(self.config), *argv],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env())  # fmt: skip

    def ok(self, *argv: str) -> str:
        proc = self(*argv)
        assert proc.returncode == 0, proc
        return proc.stdout


@pytest.fixture
def admin(tmp_path) -> Admin:
    a = Admin(tmp_path)
    a.ok("account", "add", "acme", "--domains", "example.com;b.org")
    a.ok("account", "add", "other", "--domains", "other.net")
    return a


def test_add_list_show_del_through_the_command(admin):
    assert "rsa key 's1' made for example.com (account acme)" in admin.ok(
        "dkim", "add", "Example.COM", "--selector", "s1")
    admin.ok("dkim", "add", "example.com", "--selector", "ed", "--type", "ed25519")
    listed = json.loads(admin.ok("dkim", "list", "--json", "--no-dns"))
    assert [(k["domain"], k["selector"], k["type"], k["state"], k["account"]) for k in listed] \
        == [("example.com", "ed", "ed25519", "active", "acme"),
            ("example.com", "s1", "rsa", "active", "acme")]  # fmt: skip
    keydir = admin.data / "dkim"
    for name in ("example.com.s1.pem", "example.com.ed.pem", "keys.json"):
        assert stat.S_IMODE(os.stat(keydir / name).st_mode) == 0o600
    shown = {k["selector"]: k for k in json.loads(admin.ok("dkim", "show", "example.com",
                                                           "--json", "--no-dns"))}
    rsa = shown["s1"]
    assert rsa["dns_name"] == "s1._domainkey.example.com"
    assert rsa["dns_value"].startswith("v=DKIM1; k=rsa; p=")
    assert all(len(s) <= 255 for s in rsa["dns_strings"]) and len(rsa["dns_strings"]) == 2
    assert "".join(rsa["dns_strings"]) == rsa["dns_value"]
    assert shown["ed"]["dns_value"].startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(shown["ed"]["dns_value"].rpartition("p=")[2])) == 32
    # The published record verifies what the stored private key signs.
    pem = (keydir / "example.com.s1.pem").read_bytes()
    private = serialization.load_pem_private_key(pem, None)
    msg = b"From: a@example.com\r\nTo: b@x.org\r\nSubject: t\r\n\r\nhello\r\n"
    signed = signature(msg, "example.com", "s1", "rsa", private) + msg
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: rsa["dns_value"].encode())
    # The private key is never printed.
    text = (admin.ok("dkim", "show", "example.com", "--no-dns")
            + admin.ok("dkim", "list", "--no-dns"))
    secret = b"".join(pem.splitlines()[1:-1]).decode()
    assert secret[:40] not in text.replace("\n", "") and "PRIVATE" not in text
    assert '"v=DKIM1; k=rsa; p=' in text and "s1._domainkey.example.com. IN TXT" in text
    deleted = admin.ok("dkim", "del", "example.com", "ed")
    assert deleted == "deleted ed25519 key 'ed' of example.com\n"
    assert not (keydir / "example.com.ed.pem").exists()
    listed = json.loads(admin.ok("dkim", "list", "--json", "--no-dns"))
    assert [k["selector"] for k in listed] == ["s1"]


@pytest.mark.parametrize("argv, error", [
    (("dkim", "add", "nobody.org"), "nobody.org is not an authorized domain of any account"),
    (("dkim", "add", "example.com", "--selector", "bad_sel"), "selector 'bad_sel'"),
    (("dkim", "add", "example.com", "--bits", "512"), "--bits 512"),
    (("dkim", "add", "not a domain"), "is not a domain name"),
    (("dkim", "show", "b.org", "--no-dns"), "b.org has no DKIM key"),
    (("dkim", "del", "example.com", "nope"), "example.com has no key with selector 'nope'"),
])  # fmt: skip
def test_refusals_are_one_line(admin, argv, error):
    proc = admin(*argv)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("mailrelay-admin: ") and error in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_selector_is_not_made_twice(tmp_path):
    keys = DkimKeys(str(tmp_path / "dkim"), at_once)
    value(keys.add("example.com", "acme", "s", "rsa", 1024))
    with pytest.raises(DkimError, match="already has a key with selector 's'"):
        value(keys.add("example.com", "acme", "s", "ed25519", 0))
    assert [k.selector for k in value(keys.list())] == ["s"]
    assert value(keys.ofDomain("other.net")) == []


def test_txt_strings_are_at_most_255_bytes():
    assert txt_strings("a" * 600) == ["a" * 255, "a" * 255, "a" * 90]
    assert txt_strings("") == [""]


def test_a_domain_of_two_accounts_gets_no_key(admin):
    admin.ok("account", "set", "other", "--add-domain", "b.org")
    proc = admin("dkim", "add", "b.org")
    assert proc.returncode == 1
    assert proc.stderr == ("mailrelay-admin: b.org is authorized for several accounts "
                           "(acme, other): it can be signed for one only\n")
    assert admin("dkim", "list", "--no-dns").stderr == "no DKIM keys\n"


def test_a_relay_domain_key_signs_what_no_key_of_the_account_signs(admin):
    admin.config.write_text(admin.config.read_text() + "[dkim]\nrelay_domain = Relay.Test.\n")
    out = admin.ok("dkim", "add", "relay.test", "--selector", "r1")  # no account has it
    assert "made for relay.test (the relay domain's, for every account), active" in out
    admin.ok("dkim", "add", "example.com", "--selector", "s1")
    listed = json.loads(admin.ok("dkim", "list", "--json", "--no-dns"))
    assert [(k["domain"], k["account"]) for k in listed] \
        == [("example.com", "acme"), ("relay.test", None)]  # fmt: skip
    assert "(relay)" in admin.ok("dkim", "list", "--no-dns")
    records = {}
    for domain in ("example.com", "relay.test"):
        (k,) = json.loads(admin.ok("dkim", "show", domain, "--json", "--no-dns"))
        records[k["dns_name"]] = k["dns_value"].encode()

    def verifies(signed: bytes, message: bytes) -> bool:
        return dkim.verify(signed + message, dnsfunc=lambda name, timeout=5:
                           records.get(name.decode().rstrip(".")))  # fmt: skip

    signer = Signer(str(admin.data / "dkim"), relay_domain="relay.test")
    signer.refresh()
    own = signer.sign(MSG, "acme")  # From: example.com, acme's key: that one only
    assert own.count(b"DKIM-Signature") == 1 and b"d=example.com;" in own
    assert verifies(own, MSG)
    for account in ("other", None):  # another account's mail; the relay's own
        assert signer.signs_for(account)
        signed = signer.sign(MSG, account)
        assert signed.count(b"DKIM-Signature") == 1 and b"d=relay.test; s=r1;" in signed
        assert verifies(signed, MSG)
    unset = Signer(str(admin.data / "dkim"))  # the key of no account signs nothing unset
    unset.refresh()
    assert not unset.signs_for(None) and unset.sign(MSG, "other") == b""
