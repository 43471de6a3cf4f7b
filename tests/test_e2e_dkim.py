"""DKIM signing end to end through twistd: keys made with mailrelay-admin, mail submitted
with smtplib, delivered to tests/smtp_sink.py, and every message that arrives checked by
two independent verifiers (dkimpy, Debian's opendkim-testmsg) against the records
``dkim show`` prints, served by tests/dns_server.py. The relay itself looks the records
up on that server too (``[delivery] dns_servers``), every second here."""

from __future__ import annotations

import json
import os
import time
import uuid
from email.utils import formatdate
from pathlib import Path

import pytest
from dkim_verify import dkimpy_verify, opendkim_verify
from harness import Peer, Relay, Sink, free_port, wait_for
from test_e2e_features import arrived, html_message, links, parse, send

PASSWORD = "correct horse battery"
USERS = {  # user -> (account, `user set` options)
    "plain@doe.test": ("default", []),
    "news@doe.test": ("default", ["--unsubscribe-footer", "--open-tracking",
                                  "--click-tracking"]),
    "nokey.test": ("default", []),
    "doe.test": ("ally", []),  # ally's user for doe.test, whose keys are default's
    "mail@rot.test": ("default", []),
}  # fmt: skip


class Zone(Peer):
    """tests/dns_server.py serving a zone file that the test may change (re-read)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "zone.json"
        self.records: dict[str, str] = {}
        self.publish({})
        super().__init__(directory, "dns_server.py", "--zone", str(self.path))

    def publish(self, records: dict[str, str]) -> None:
        """Serve the TXT ``records`` (name -> value) besides those served already."""
        self.records.update(records)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: [f"TXT {v}"] for n, v in self.records.items()}))
        os.replace(tmp, self.path)


@pytest.fixture(scope="module")
def zone(tmp_path_factory):
    z = Zone(tmp_path_factory.mktemp("dns"))
    yield z
    z.stop()


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    s = Sink(tmp_path_factory.mktemp("sink"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink, zone):
    port = free_port()
    relay = Relay(tmp_path_factory.mktemp("relay"), config=(
        f"[delivery]\nport = {sink.port}\nallow_local_mx = yes\nretry_first = 1s\n"
        f"retry_max = 2s\nmx_tls = none\ndns_servers = 127.0.0.1:{zone.port}\n\n"
        f"[dkim]\ncheck_interval = 1s\nrelay_domain = relay.test\n\n"
        f"[routes]\nexample.test = 127.0.0.1:{sink.port}\n\n"
        f"[tracking]\nenabled = yes\nendpoint = tcp:{port}:interface=127.0.0.1\n"
        f"base_url = http://127.0.0.1:{port}\n"))  # fmt: skip
    relay.admin("account", "set", "default", "--domains", "doe.test;nokey.test;rot.test")
    relay.admin("account", "add", "ally", "--domains", "ally.test")
    relay.admin("dkim", "add", "doe.test", "--selector", "rsa1")
    relay.admin("dkim", "add", "doe.test", "--selector", "ed1", "--type", "ed25519")
    relay.admin("dkim", "add", "rot.test", "--selector", "old")
    relay.admin("dkim", "add", "relay.test", "--selector", "relay1")  # of no account
    # ally may send as doe.test too, but the keys of doe.test are the default account's.
    relay.admin("account", "set", "ally", "--add-domain", "doe.test")
    for user, (account, options) in USERS.items():
        relay.add_user(user, PASSWORD, "--account", account, *options)
    relay.records = {}
    for domain in ("doe.test", "rot.test", "relay.test"):
        shown = json.loads(relay.admin("dkim", "show", domain, "--json", "--no-dns").stdout)
        relay.records.update({k["dns_name"]: "".join(k["dns_strings"]) for k in shown})
    zone.publish(relay.records)
    relay.start()
    yield relay
    relay.stop()


def mail(sender: str, to: str) -> bytes:
    """A message as mail programs write it: with a Date (libopendkim refuses one without,
    RFC 5322 3.6 requires it)."""
    return b"Date: " + formatdate().encode() + b"\r\n" + html_message(sender, to)


def rcpt(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@example.test"


def signatures(data: bytes) -> list[str]:
    return [str(v) for v in parse(data).get_all("DKIM-Signature") or []]


def drop_signature(data: bytes, index: int) -> bytes:
    """The message without its ``index``-th DKIM-Signature field (opendkim-testmsg checks
    the first one only; dkimpy here cannot check Ed25519)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    sigs = [i for i, f in enumerate(fields) if f[0].lower().startswith(b"dkim-signature:")]
    del fields[sigs[index]]
    return b"\r\n".join(b"\r\n".join(f) for f in fields) + sep + body


def submit(relay: Relay, login: str, sender: str, to: str, data: bytes) -> None:
    with relay.smtp(login=(login, PASSWORD)) as client:
        client.mail(sender)
        assert client.rcpt(to)[0] == 250
        code, text = client.data(data)
    assert code == 250, text


def assert_verifies(relay: Relay, data: bytes) -> None:
    sigs = signatures(data)
    assert len(sigs) == 2, data[:600]
    assert "a=rsa-sha256" in sigs[0] and "s=rsa1" in sigs[0] and "d=doe.test" in sigs[0]
    assert "a=ed25519-sha256" in sigs[1] and "s=ed1" in sigs[1]
    for sig in sigs:
        assert "c=relaxed/relaxed" in sig and "l=" not in sig and "h=from:from:to:to:" in sig
    assert dkimpy_verify(drop_signature(data, 1), relay.records) == [True]
    for variant in (data, drop_signature(data, 0)):  # the RSA one, then the Ed25519 one
        result = opendkim_verify(variant, relay.records)
        assert result.returncode == 0, result.stderr


def test_plain_mail_is_signed_and_verifies(relay, sink):
    to = rcpt("plain")
    send(relay, "plain@doe.test", [to], mail("plain@doe.test", to))
    ((_, data),) = arrived(sink, to)
    assert_verifies(relay, data)
    # Changed after signing, it no longer verifies: the check can fail.
    altered = data.replace(b"news", b"nevs", 1)
    assert altered != data
    assert dkimpy_verify(drop_signature(altered, 1), relay.records) == [False]
    for variant in (altered, drop_signature(altered, 0)):
        assert opendkim_verify(variant, relay.records).returncode != 0


def test_each_copy_with_footer_and_tracking_is_signed(relay, sink):
    to = [rcpt("news1"), rcpt("news2")]
    send(relay, "news@doe.test", to, mail("news@doe.test", to[0]))
    copies = [arrived(sink, r)[0][1] for r in to]
    assert copies[0] != copies[1]  # each its own links: each signed on its own
    for data in copies:
        msg = parse(data)
        assert msg["List-Unsubscribe"] and links(msg, "c")  # footer and tracking applied
        assert_verifies(relay, data)


def test_without_a_key_of_the_account_the_relay_domain_signs(relay, sink):
    to = rcpt("nokey")
    submit(relay, "nokey.test", "x@nokey.test", to, mail("x@nokey.test", to))
    to2 = rcpt("ally")  # From: doe.test, by a user of the account ally
    submit(relay, "doe.test", "x@doe.test", to2, mail("x@doe.test", to2))
    for r in (to, to2):
        ((_, data),) = arrived(sink, r)
        (sig,) = signatures(data)  # not doe.test's key: that is the default account's
        assert "d=relay.test" in sig and "s=relay1;" in sig
        assert dkimpy_verify(data, relay.records) == [True]
    assert opendkim_verify(data, relay.records).returncode == 0


def test_a_client_signature_is_kept_below_ours(relay, sink):
    to = rcpt("presigned")
    original = mail("plain@doe.test", to)
    theirs = b"DKIM-Signature: v=1; a=rsa-sha256; d=client.test; s=x; h=from; bh=AA==; b=AA==\r\n"
    send(relay, "plain@doe.test", [to], theirs + original)
    ((_, data),) = arrived(sink, to)
    assert theirs in data and data.index(theirs) > data.index(b"a=ed25519")  # ours on top
    data = drop_signature(data, 2)
    assert_verifies(relay, data)


def keys_of(relay: Relay, domain: str) -> dict[str, dict]:
    listed = json.loads(relay.admin("dkim", "list", "--json", "--no-dns").stdout)
    return {k["selector"]: k for k in listed if k["domain"] == domain}


def test_rotation_switches_to_the_new_key_once_the_relay_sees_its_record(relay, sink,
                                                                          zone):  # fmt: skip
    assert "pending" in relay.admin("dkim", "rotate", "rot.test", "--selector", "new").stdout
    shown = json.loads(relay.admin("dkim", "show", "rot.test", "--json", "--no-dns").stdout)
    (new,) = [k for k in shown if k["selector"] == "new"]
    # Not in DNS yet: the relay's checks find it missing, and mail is signed by the old key.
    wait_for(lambda: keys_of(relay, "rot.test")["new"]["dns_status"] == "missing",
             timeout=30, interval=0.5, what="the relay's check of the new record")
    to = rcpt("rot")
    send(relay, "mail@rot.test", [to], mail("mail@rot.test", to))
    ((_, data),) = arrived(sink, to)
    (sig,) = signatures(data)
    assert "d=rot.test" in sig and "s=old;" in sig
    assert dkimpy_verify(data, relay.records) == [True]
    assert keys_of(relay, "rot.test")["new"]["state"] == "pending"

    zone.publish({new["dns_name"]: new["dns_value"]})
    relay.records[new["dns_name"]] = new["dns_value"]
    keys = wait_for(lambda: (k := keys_of(relay, "rot.test"))["new"]["state"] == "active" and k,
                    timeout=30, interval=0.5, what="the relay to activate the new key")
    assert keys["new"]["dns_status"] == "ok" and keys["old"]["state"] == "retiring"
    assert "rot.test is signed with selector new from now on" in relay.log()
    time.sleep(2.5)  # the delivery process reads a changed key index within 2 s
    to = rcpt("rot")
    send(relay, "mail@rot.test", [to], mail("mail@rot.test", to))
    ((_, data),) = arrived(sink, to)
    (sig,) = signatures(data)
    assert "d=rot.test" in sig and "s=new;" in sig
    assert dkimpy_verify(data, relay.records) == [True]
