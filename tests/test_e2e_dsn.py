"""End to end through twistd: delivery status notifications as the sender asks for them
(RFC 3461 DSN: RET, ENVID, NOTIFY, ORCPT) from smtplib, swaks and a private Postfix as the
client, toward a next hop that offers DSN and one that does not, both recording the exact
parameters they get. One relay for the module; every test uses addresses of its own.

dsn.test goes to the sink that offers DSN, plain.test to the one that does not, and so
does doe.test: the notices to our senders arrive there.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import subprocess
import tempfile

import pytest
from certs import TestCA
from harness import Relay, Sink, message, wait_for

from bench.postfix import POSTFIX, PostfixInstance

PASSWORD = "correct horse battery"
LOGIN = ("doe.test", PASSWORD)
SENDER = "a@doe.test"
POSTFIX_IP = "127.0.0.2"  # the private Postfix's address: IP authentication as doe.test

# Replies of the two sinks, by recipient (re-read when changed).
PLAIN_RULES = {f"{who}@plain.test": [550, "5.1.1 no such user"]
               for who in ("never", "default", "asked", "swaks-bounce")}
DSN_RULES: dict[str, list] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("dsn")
    dsn_sink = Sink(base / "dsn-sink", "--dsn", "--pipelining")
    plain_sink = Sink(base / "plain-sink")
    plain_sink.rules(PLAIN_RULES)
    relay = Relay(base / "relay", config=(
        "[delivery]\nretry_first = 1s\nretry_max = 2s\nmx_tls = none\n"
        "dsn_delay_warning = 3s\n"
        f"[routes]\ndsn.test = 127.0.0.1:{dsn_sink.port}\n"
        f"plain.test = 127.0.0.1:{plain_sink.port}\n"
        f"doe.test = 127.0.0.1:{plain_sink.port}\n"
        f"[policy]\nip_auth = {POSTFIX_IP} = doe.test\n"))
    relay.domain_login("doe.test", PASSWORD)
    relay.start()
    try:
        yield relay, dsn_sink, plain_sink
    finally:
        relay.stop()
        dsn_sink.stop()
        plain_sink.stop()


def submit(relay: Relay, rcpts: dict[str, list[str]], mail_options=(),
           subject: str = "test") -> str:
    """smtplib, with the DSN parameters as an application gives them; the queue id."""
    with relay.smtp(login=LOGIN) as c:
        assert c.has_extn("dsn")
        code, text = c.mail(SENDER, list(mail_options))
        assert code == 250, text
        for rcpt, options in rcpts.items():
            code, text = c.rcpt(rcpt, options)
            assert code == 250, text
        code, text = c.data(message(SENDER, next(iter(rcpts)), subject=subject))
    assert code == 250
    return text.decode().rsplit(" ", 1)[-1]


def arrived(sink: Sink, subject: str, timeout: float = 60.0) -> tuple[dict, bytes]:
    """The message with ``subject`` at ``sink``, once there."""
    def find():
        for meta, data in sink.messages():
            if email.message_from_bytes(data, policy=email.policy.SMTP)["Subject"] == subject:
                return meta, data
        return None
    return wait_for(find, timeout=timeout, what=f"{subject!r} at the sink")


def notices(sink: Sink, queue_id: str) -> list[tuple[dict, email.message.Message]]:
    """The DSNs about ``queue_id`` that reached ``sink`` (to our sender, from <>)."""
    found = []
    for meta, data in sink.messages():
        msg = email.message_from_bytes(data, policy=email.policy.SMTP)
        if meta["sender"] == "" and f"X-Mailrelay-Queue-ID: {queue_id}" in data.decode(
                "ascii", "replace"):
            found.append((meta, msg))
    return found


def notice(sink: Sink, queue_id: str, timeout: float = 60.0):
    return wait_for(lambda: notices(sink, queue_id), timeout=timeout,
                    what=f"a DSN about {queue_id}")[0]


def report(msg) -> tuple[dict, list[dict]]:
    """The delivery-status part: its per-message fields and each recipient's."""
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    fields = [dict(b.items()) for b in blocks]
    return fields[0], fields[1:]


def settled(relay: Relay, queue_id: str) -> None:
    wait_for(lambda: not (relay.data / "spool" / "queue" / queue_id).exists(), timeout=60,
             what=f"{queue_id} to leave the queue")


def test_a_hop_offering_dsn_gets_the_parameters_exactly_and_no_notice_comes_from_us(world):
    relay, dsn_sink, _ = world
    queue_id = submit(relay, {
        "app@dsn.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;list+2Btag@lists.test"],
        "plain@dsn.test": [],
        "intl@dsn.test": ["NOTIFY=DELAY", "ORCPT=utf-8;j\\x{E9}r\\x{F4}me@b.test"],
    }, mail_options=["RET=HDRS", "ENVID=batch+2B7"], subject="passed on")
    meta, _ = arrived(dsn_sink, "passed on")
    assert meta["mail_params"] == "RET=HDRS ENVID=batch+2B7"
    assert meta["rcpt_params"] == {
        "app@dsn.test": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;list+2Btag@lists.test",
        "plain@dsn.test": "",
        "intl@dsn.test": "NOTIFY=DELAY ORCPT=utf-8;j\\x{E9}r\\x{F4}me@b.test",
    }
    # A notice would be queued before the message leaves the queue, and delivered
    # before the queue is empty.
    wait_for(lambda: not relay.spool_files("queue"), timeout=60, what="an empty queue")
    assert notices(dsn_sink, queue_id) == [] and notices(world[2], queue_id) == []


def test_success_past_a_hop_without_dsn_is_reported_relayed(world):
    relay, _, plain_sink = world
    queue_id = submit(relay, {
        "told@plain.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;told-orig@plain.test"],
        "quiet@plain.test": [],
    }, mail_options=["ENVID=rel-1"], subject="relayed")
    meta, _ = arrived(plain_sink, "relayed")
    assert meta["mail_params"] == "" and set(meta["rcpt_params"].values()) == {""}
    dsn_meta, msg = notice(plain_sink, queue_id)
    assert dsn_meta["recipients"] == [SENDER]
    assert msg["Subject"] == "Successful Mail Delivery Report"
    fields, recipients = report(msg)
    assert fields["Original-Envelope-Id"] == "rel-1"
    assert recipients == [{
        "Original-Recipient": "rfc822; told-orig@plain.test",
        "Final-Recipient": "rfc822; told@plain.test", "Action": "relayed",
        "Status": "2.0.0", "Remote-MTA": "dns; 127.0.0.1",
        "Diagnostic-Code": recipients[0]["Diagnostic-Code"],
        "Last-Attempt-Date": recipients[0]["Last-Attempt-Date"]}]
    assert recipients[0]["Diagnostic-Code"].startswith("smtp; 250")
    returned = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert len(returned) == 1 and b"hello" not in returned[0].get_payload(decode=True)


def test_failures_bounce_as_notify_asks_and_ret_full_returns_the_message(world):
    relay, _, plain_sink = world
    queue_id = submit(relay, {
        "never@plain.test": ["NOTIFY=NEVER"],
        "default@plain.test": [],
        "asked@plain.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;asked-orig@plain.test"],
    }, mail_options=["RET=FULL", "ENVID=fail-1"], subject="refused")
    _, msg = notice(plain_sink, queue_id)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    fields, recipients = report(msg)
    assert fields["Original-Envelope-Id"] == "fail-1"
    assert [(r.get("Original-Recipient"), r["Final-Recipient"], r["Action"], r["Status"])
            for r in recipients] == [
        (None, "rfc822; default@plain.test", "failed", "5.1.1"),
        ("rfc822; asked-orig@plain.test", "rfc822; asked@plain.test", "failed", "5.1.1")]
    returned = next(p for p in msg.walk() if p.get_content_type() == "message/rfc822")
    original = returned.get_payload()[0]
    assert original["Subject"] == "refused" and original.get_content().strip() == "hello"
    wait_for(lambda: f"{queue_id}: no bounce for never@plain.test (NOTIFY without "
             "FAILURE)" in relay.log(), what="the log line")
    assert len(notices(plain_sink, queue_id)) == 1


def test_swaks_without_dsn_parameters_bounces_as_before(world):
    relay, _, plain_sink = world
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by test.sh"
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{relay.smtp_port}", "--tls",
         "--auth", "PLAIN", "--auth-user", "doe.test", "--auth-password", PASSWORD,
         "--from", SENDER, "--to", "swaks-bounce@plain.test", "--helo", "client.test",
         "--h-From", f"<{SENDER}>", "--h-Subject", "swaks bounce"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250-DSN" in result.stdout  # offered
    queue_id = result.stdout.rsplit("queued as ", 1)[1].split()[0]
    _, msg = notice(plain_sink, queue_id)
    fields, recipients = report(msg)
    assert "Original-Envelope-Id" not in fields
    assert [(r["Final-Recipient"], r["Action"]) for r in recipients] == [
        ("rfc822; swaks-bounce@plain.test", "failed")]
    assert "Original-Recipient" not in recipients[0]
    assert [p.get_content_type() for p in msg.walk()][-1] == "text/rfc822-headers"


def test_delay_notice_once_for_notify_delay_and_requests_survive_a_restart(world):
    relay, dsn_sink, plain_sink = world
    DSN_RULES.update({"wait@dsn.test": [451, "4.2.0 try later"],
                      "nodelay@dsn.test": [451, "4.2.0 try later"]})
    dsn_sink.rules(DSN_RULES)
    queue_id = submit(relay, {
        "wait@dsn.test": ["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;w@orig.test"],
        "nodelay@dsn.test": ["NOTIFY=FAILURE"],
    }, mail_options=["ENVID=delay-1"], subject="delayed")
    _, msg = notice(plain_sink, queue_id)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    fields, recipients = report(msg)
    assert fields["Original-Envelope-Id"] == "delay-1"
    assert [(r["Original-Recipient"], r["Final-Recipient"], r["Action"])
            for r in recipients] == [("rfc822; w@orig.test", "rfc822; wait@dsn.test",
                                      "delayed")]
    relay.stop()  # what was asked is in the spool, and read back
    relay.start()
    for rcpt in ("wait@dsn.test", "nodelay@dsn.test"):
        DSN_RULES.pop(rcpt)
    dsn_sink.rules(DSN_RULES)
    meta, _ = arrived(dsn_sink, "delayed")
    assert meta["mail_params"] == "ENVID=delay-1"
    assert meta["rcpt_params"] == {
        "wait@dsn.test": "NOTIFY=DELAY,FAILURE ORCPT=rfc822;w@orig.test",
        "nodelay@dsn.test": "NOTIFY=FAILURE"}
    settled(relay, queue_id)
    assert len(notices(plain_sink, queue_id)) == 1  # once


@pytest.fixture
def postfix(world, tmp_path):
    """A private Postfix (bench/postfix.py) relaying everything to the relay, which takes
    it from POSTFIX_IP by IP authentication."""
    relay, _, _ = world
    assert os.access(POSTFIX, os.X_OK), "postfix is installed by test.sh"
    cert, key = TestCA(tmp_path / "ca").issue("postfix.test")
    # Postfix's own user must reach its directories: not under pytest's 0700 tmp_path.
    base = tempfile.mkdtemp(prefix="mailrelay-dsn-postfix-")
    instance = PostfixInstance(base, str(cert), str(key), sink_port=relay.smtp_port)
    instance.configure({"smtp_bind_address": POSTFIX_IP, "smtp_tls_security_level": "none",
                        "smtpd_sasl_auth_enable": "no", "smtpd_sender_restrictions": "",
                        "smtpd_tls_security_level": "none", "smtpd_tls_auth_only": "no"})
    instance.start()
    try:
        yield instance
    finally:
        instance.cleanup()


def test_postfix_as_the_client_passes_dsn_parameters_through_the_relay(world, postfix):
    relay, dsn_sink, plain_sink = world
    with smtplib.SMTP("127.0.0.1", postfix.plain_port, local_hostname="client.test",
                      timeout=30) as c:
        c.ehlo()
        c.mail(SENDER, ["RET=HDRS", "ENVID=pf+2B1"])
        c.rcpt("pf@dsn.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;pf-orig@dsn.test"])
        c.rcpt("pf@plain.test", ["NOTIFY=SUCCESS"])
        code, _ = c.data(message(SENDER, "pf@dsn.test", subject="through postfix"))
        assert code == 250
    meta, _ = arrived(dsn_sink, "through postfix")
    assert meta["mail_params"] == "RET=HDRS ENVID=pf+2B1"
    assert meta["rcpt_params"] == {
        "pf@dsn.test": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;pf-orig@dsn.test"}
    # Postfix gives every recipient an ORCPT of its own: the relay reports it.
    meta, _ = arrived(plain_sink, "through postfix")
    assert meta["rcpt_params"] == {"pf@plain.test": ""}

    def relayed_notice():
        for _, msg in notices_all(plain_sink):
            fields, recipients = report(msg)
            if fields.get("Original-Envelope-Id") == "pf+1":
                return recipients
        return None

    recipients = wait_for(relayed_notice, timeout=60, what="the relayed notice")
    assert [(r["Original-Recipient"], r["Final-Recipient"], r["Action"])
            for r in recipients] == [("rfc822; pf@plain.test", "rfc822; pf@plain.test",
                                      "relayed")]


def notices_all(sink: Sink):
    for meta, data in sink.messages():
        if meta["sender"] == "":
            yield meta, email.message_from_bytes(data, policy=email.policy.SMTP)
