"""End to end through twistd: the log a sysadmin reads. No input loses a line of it or
stops a sender notification; it holds the relay's own lines, not Twisted's chatter."""

from __future__ import annotations

import email
import email.policy
import json
import re

from harness import DNS, Relay, Sink, message, wait_for
from rawsmtp import Raw, plain

PASSWORD = "correct horse battery"
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")


def notifications(relay: Relay) -> list[bytes]:
    """The messages to it@acme.test in the queue, oldest first."""
    found = []
    for path in relay.spool_files("queue"):
        envelope, _, data = path.read_bytes().partition(b"\n")
        if json.loads(envelope)["recipients"] == ["it@acme.test"]:
            found.append((path.stat().st_mtime_ns, data))
    return [data for _, data in sorted(found)]


def body(data: bytes) -> str:
    return email.message_from_bytes(data, policy=email.policy.default).get_content()


def test_a_header_that_is_not_utf8_loses_no_line_and_stops_no_notification(tmp_path):
    relay = Relay(tmp_path / "relay",
                  config="[delivery]\nenabled = no\n\n[policy]\nnotify_interval = 1s\n")
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.admin("account", "add", "acme", "--domains", "acme.test", "--notify", "it@acme.test")
    relay.add_user("doe.test", PASSWORD)
    relay.add_user("acme.test", PASSWORD, "--account", "acme")
    relay.start()
    tls = relay.tls_context()
    try:
        with Raw(relay.smtps_port, tls) as attacker, Raw(relay.smtps_port, tls) as other, \
                Raw(relay.smtps_port, tls) as guesser:
            for client, login in ((attacker, "acme.test"), (other, "doe.test")):
                assert client.cmd(b"EHLO client.test")[0] == 250
                assert client.cmd(plain(login, PASSWORD))[0] == 235
                assert client.cmd(b"MAIL FROM:<x@" + login.encode() + b">")[0] == 250
                assert client.cmd(b"RCPT TO:<bob@example.net>")[0] == 250
                assert client.cmd(b"DATA")[0] == 354
            assert guesser.cmd(b"EHLO client.test")[0] == 250
            attacker.send(b"From: <x@ev\xffil.example>\r\nSubject: hi\r\n\r\nhi\r\n")
            other.send(message("x@doe.test", "bob@example.net"))
            # The three land together: in one gathering of the log's lines.
            other.send(b".\r\n")
            attacker.send(b".\r\nQUIT\r\n")
            guesser.send(plain("doe.test", "wrong") + b"\r\n")
            code, text = other.reply()
            assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
            queue_id = text.rsplit(b" ", 1)[1].decode()
            code, text = attacker.reply()
            assert code == 550 and text.startswith(b"5.7.1 From: header address x@ev")
            assert attacker.reply()[0] == 221
            assert guesser.reply()[0] == 535
        first = wait_for(lambda: notifications(relay), timeout=10, what="a notification")
        assert re.search(r"x@ev.il\.example \(header From:\)", body(first[0]))
        # A second refusal for the same login is still reported, at the interval's end.
        with Raw(relay.smtps_port, tls) as attacker:
            assert attacker.cmd(b"EHLO client.test")[0] == 250
            assert attacker.cmd(plain("acme.test", PASSWORD))[0] == 235
            assert attacker.cmd(b"MAIL FROM:<ceo@doe.test>")[0] == 550
        second = wait_for(lambda: notifications(relay)[1:], timeout=10,
                          what="the second notification")
        assert "ceo@doe.test (envelope MAIL FROM)" in body(second[0])
        # the four sessions, and the harness's probe of the port at startup
        wait_for(lambda: relay.log().count("disconnected after") >= 5, what="the log")
    finally:
        relay.stop()
    text = relay.log_path.read_bytes().decode("utf-8")  # strictly UTF-8
    assert f"accepted {queue_id}: session=" in text
    assert re.search("refused 550 5.7.1 From: header address x@ev\ufffdil.example not "
                     "allowed for user acme.test", text)
    assert "login failed: ip=127.0.0.1 user=doe.test failures=1" in text  # fail2ban's line
    assert "authentication failed for doe.test from 127.0.0.1" in text
    assert text.count("disconnected after") == 5
    assert text.count("sender notification to it@acme.test") == 2
    assert "Traceback" not in text and "Unhandled" not in text
    assert all(STAMP.match(line) or line.startswith("\t") for line in text.splitlines())


TWISTED_CHATTER = re.compile(r"0x[0-9a-f]{6,}|Starting protocol|Stopping protocol|"
                             r"DNSDatagramProtocol|UDP Port|Starting factory|Stopping factory|"
                             r"resolv\.conf|Resolver added|connection established|"
                             r"connection lost \(HOST")


def test_a_delivery_by_mx_logs_the_relays_lines_only(tmp_path):
    sink = Sink(tmp_path / "sink")
    dns = DNS(tmp_path / "dns", ["example.test MX 10 mx.example.test",
                                 "mx.example.test A 127.0.0.1"])
    relay = Relay(tmp_path / "relay",
                  config=(f"[delivery]\ndns_servers = 127.0.0.1:{dns.port}\n"
                          f"port = {sink.port}\nallow_local_mx = yes\nmx_tls = none\n"))
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.add_user("doe.test", PASSWORD)
    try:
        relay.start()
        with relay.smtp(login=("doe.test", PASSWORD)) as client:
            client.sendmail("a@doe.test", ["bob@example.test", "carol@example.test"],
                            message("a@doe.test", "bob@example.test"))
        sink.wait(1)
        wait_for(lambda: relay.log().count(" sent: 250") == 2, what="the delivery lines")
    finally:
        relay.stop()
        sink.stop()
        dns.stop()
    text = relay.log()
    assert "to=<bob@example.test> via mx.example.test[127.0.0.1] sent: 250" in text
    assert "SubmissionFactory starting on" in text  # twistd's line naming each listener
    assert [line for line in text.splitlines() if TWISTED_CHATTER.search(line)] == []


def test_json_lines_for_machines_the_delivery_process_included(tmp_path):
    sink = Sink(tmp_path / "sink")
    relay = Relay(tmp_path / "relay", config=(
        f"[delivery]\nmx_tls = none\n[routes]\nexample.test = 127.0.0.1:{sink.port}\n"))
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "[server]\n", "[server]\nlog_format = json\n"))
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.add_user("doe.test", PASSWORD)
    try:
        relay.start()
        with relay.smtp(login=("doe.test", PASSWORD)) as client:
            client.sendmail("a@doe.test", ["bob@example.test"],
                            message("a@doe.test", "bob@example.test"))
        sink.wait(1)
        wait_for(lambda: " sent: 250" in relay.log(), what="the delivery line")
    finally:
        relay.stop()
        sink.stop()
    records = [json.loads(line) for line in relay.log().splitlines()]  # every line is JSON
    assert all({"time", "level", "system", "text"} <= set(r) for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["time"])
               for r in records)
    accepted = [r for r in records if r["text"].startswith("accepted ")]
    assert len(accepted) == 1
    queue_id = accepted[0]["queue_id"]
    assert accepted[0]["text"].startswith(f"accepted {queue_id}: session=")
    assert (accepted[0]["system"], accepted[0]["level"], accepted[0]["user"]) == (
        "mailrelay.smtp.server", "info", "doe.test")
    sent = [r for r in records if " sent: 250" in r["text"]]  # the delivery process's line
    assert len(sent) == 1 and sent[0]["queue_id"] == queue_id
    assert sent[0]["text"].startswith(f"{queue_id} to=<bob@example.test> via ")
    assert (sent[0]["system"], sent[0]["recipient"]) == ("mailrelay.delivery.manager",
                                                         "bob@example.test")
    assert any(r["text"].startswith("SubmissionFactory starting on") for r in records)
