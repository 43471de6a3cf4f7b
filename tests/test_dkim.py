"""The signer of the delivery process (mailrelay/dkim.py): which messages it signs, with
which keys, and that it sees keys added and deleted without a restart."""

from __future__ import annotations

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from mailrelay.dkim import Signer, header_domain
from mailrelay.manage.dkim import DkimKeys
from mailrelay.manage.stores import at_once

MSG = (b"From: News <news@example.com>\r\nTo: a@example.org\r\nSubject: hi\r\n"
       b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\n\r\nhello\r\n")  # fmt: skip


class Clock:
    now = 1000.0

    def time(self) -> float:
        return self.now


def value(d):
    """The result of a Deferred fired at once (the stores with at_once)."""
    out: list = []
    d.addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def keys(tmp_path):
    return DkimKeys(str(tmp_path / "dkim"), at_once)


def record(keys: DkimKeys, domain: str, selector: str) -> bytes:
    (key,) = [k for k in value(keys.ofDomain(domain)) if k.selector == selector]
    return value(keys.txtRecord(key))[1].encode()


def test_signs_only_the_accounts_own_from_domain(keys):
    value(keys.add("example.com", "acme", "s1", "rsa", 1024))
    signer = Signer(keys.directory)
    signer.refresh()
    assert signer.signs_for("acme") and not signer.signs_for("other")
    assert not signer.signs_for(None)
    sig = signer.sign(MSG, "acme")
    assert sig.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;") and sig.count(b"DKIM-") == 1
    txt = record(keys, "example.com", "s1")
    assert dkim.verify(sig + MSG, dnsfunc=lambda name, timeout=5: txt)
    assert signer.sign(MSG, "other") == b""  # a key of example.com, but not this account's
    assert signer.sign(MSG.replace(b"example.com>", b"example.net>"), "acme") == b""


@pytest.mark.parametrize("head, domain", [
    (b"From: a@Example.COM", "example.com"),
    (b"From: \"x, y\" <a@sub.example.com>", "sub.example.com"),
    (b"From: a@example.com, b@example.com", None),  # two authors: whose domain?
    (b"From: a@example.com\r\nFrom: b@example.com", None),
    (b"Subject: no author", None),
    (b"From: undisclosed", None),
])  # fmt: skip
def test_the_from_domain(head, domain):
    headers = [tuple(line.split(b":", 1)) for line in head.split(b"\r\n")]
    assert header_domain(headers) == domain


def test_ed25519_is_a_second_signature_below_rsa(keys):
    value(keys.add("example.com", "acme", "ed", "ed25519", 0))
    value(keys.add("example.com", "acme", "rsa", "rsa", 1024))
    signer = Signer(keys.directory)
    signer.refresh()
    sig = signer.sign(MSG, "acme")
    assert sig.index(b"a=rsa-sha256") < sig.index(b"a=ed25519-sha256")
    assert b"s=rsa;" in sig and b"s=ed;" in sig


def test_keys_added_and_deleted_are_seen_without_a_restart(keys):
    clock = Clock()
    signer = Signer(keys.directory, clock=clock, every=2.0)
    assert signer.due()
    signer.refresh()  # no directory yet: nothing to sign
    assert not signer.signs_for("acme") and not signer.due()
    value(keys.add("example.com", "acme", "s1", "rsa", 1024))
    clock.now += 2
    assert signer.due()
    signer.refresh()
    assert signer.signs_for("acme")
    value(keys.remove("example.com", "s1"))
    clock.now += 2
    signer.refresh()
    assert not signer.signs_for("acme") and signer.sign(MSG, "acme") == b""


def test_key_files_are_private_pem(keys, tmp_path):
    key = value(keys.add("example.com", "acme", "s1", "rsa", 1024))
    pem = (tmp_path / "dkim" / key.file_name).read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert serialization.load_pem_private_key(pem, None).key_size == 1024
