"""DKIM signing end to end through twistd: keys made with mailrelay-admin, mail submitted
with smtplib, delivered to tests/smtp_sink.py, and every message that arrives checked by
two independent verifiers (dkimpy, Debian's opendkim-testmsg) against the records
``dkim show`` prints, served by tests/dns_server.py."""

from __future__ import annotations

import json
import uuid
from email.utils import formatdate

import pytest
from dkim_verify import dkimpy_verify, opendkim_verify
from harness import Relay, Sink, free_port
from test_e2e_features import arrived, html_message, links, parse, send

PASSWORD = "correct horse battery"
USERS = {  # user -> (account, `user set` options)
    "plain@doe.test": ("default", []),
    "news@doe.test": ("default", ["--unsubscribe-footer", "--open-tracking",
                                  "--click-tracking"]),
    "nokey.test": ("default", []),
    "doe.test": ("ally", []),  # ally's user for doe.test, whose keys are default's
}  # fmt: skip


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    s = Sink(tmp_path_factory.mktemp("sink"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    port = free_port()
    relay = Relay(tmp_path_factory.mktemp("relay"), config=(
        f"[delivery]\nport = {sink.port}\nallow_local_mx = yes\nretry_first = 1s\n"
        f"retry_max = 2s\nmx_tls = none\n\n"
        f"[routes]\nexample.test = 127.0.0.1:{sink.port}\n\n"
        f"[tracking]\nenabled = yes\nendpoint = tcp:{port}:interface=127.0.0.1\n"
        f"base_url = http://127.0.0.1:{port}\n"))  # fmt: skip
    relay.admin("account", "set", "default", "--domains", "doe.test;nokey.test")
    relay.admin("account", "add", "ally", "--domains", "ally.test")
    relay.admin("dkim", "add", "doe.test", "--selector", "rsa1")
    relay.admin("dkim", "add", "doe.test", "--selector", "ed1", "--type", "ed25519")
    # ally may send as doe.test too, but the keys of doe.test are the default account's.
    relay.admin("account", "set", "ally", "--add-domain", "doe.test")
    for user, (account, options) in USERS.items():
        relay.add_user(user, PASSWORD, "--account", account, *options)
    shown = json.loads(relay.admin("dkim", "show", "doe.test", "--json").stdout)
    relay.records = {k["dns_name"]: "".join(k["dns_strings"]) for k in shown}
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


def test_not_signed_without_a_key_of_the_account(relay, sink):
    to = rcpt("nokey")
    submit(relay, "nokey.test", "x@nokey.test", to, mail("x@nokey.test", to))
    to2 = rcpt("ally")  # From: doe.test, by a user of the account ally
    submit(relay, "doe.test", "x@doe.test", to2, mail("x@doe.test", to2))
    for r in (to, to2):
        ((_, data),) = arrived(sink, r)
        assert signatures(data) == []


def test_a_client_signature_is_kept_below_ours(relay, sink):
    to = rcpt("presigned")
    original = mail("plain@doe.test", to)
    theirs = b"DKIM-Signature: v=1; a=rsa-sha256; d=client.test; s=x; h=from; bh=AA==; b=AA==\r\n"
    send(relay, "plain@doe.test", [to], theirs + original)
    ((_, data),) = arrived(sink, to)
    assert theirs in data and data.index(theirs) > data.index(b"a=ed25519")  # ours on top
    data = drop_signature(data, 2)
    assert_verifies(relay, data)
