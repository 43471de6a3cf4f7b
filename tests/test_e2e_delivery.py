"""End to end through twistd: delivery by MX and smarthost, retries, DSNs, priority,
restarts (issue 3). Real SMTP sinks and a real DNS server, all on 127.0.0.1."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
from collections import Counter

import pytest
from certs import TestCA
from harness import DNS, Relay, Sink, env, message, wait_for

PASSWORD = "correct horse battery"
LOGIN = ("doe.test", PASSWORD)


def make_relay(tmp_path, sink: Sink, dns: DNS | None = None, extra: str = "",
               delivery: str = "") -> Relay:
    """A relay whose MX lookups go to ``dns`` and whose MX port is the sink's; mail for
    doe.test (bounces to our senders) is routed to the sink as well."""
    dns_line = f"dns_servers = 127.0.0.1:{dns.port}\n" if dns else ""
    relay = Relay(
        tmp_path / "relay",
        config=(f"[delivery]\n{dns_line}port = {sink.port}\nallow_local_mx = yes\n"
                f"retry_first = 1s\nretry_max = 2s\nmx_tls = none\n{delivery}"
                f"[routes]\ndoe.test = 127.0.0.1:{sink.port}\n{extra}"),
    )
    relay.domain_login("doe.test", PASSWORD)
    return relay


def submit(relay: Relay, sender: str, rcpts: list[str], subject: str = "test",
           login=LOGIN) -> str:
    with relay.smtp(login=login) as c:
        c.mail(sender)
        for r in rcpts:
            c.rcpt(r)
        code, text = c.data(message(sender, rcpts[0], subject=subject))
    assert code == 250
    return text.decode().rsplit(" ", 1)[-1]


def spool_empty(relay: Relay) -> bool:
    return not relay.spool_files("queue") and not list((relay.data / "spool" / "state").glob(
        "*.json"))


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path / "sink")
    yield s
    s.stop()


@pytest.fixture
def dns(tmp_path):
    d = DNS(tmp_path / "dns", ["example.test MX 10 mx.example.test",
                               "mx.example.test A 127.0.0.1",
                               "nomx.test A 127.0.0.1",
                               "nullmx.test MX 0 ."])
    yield d
    d.stop()


def test_mx_delivery_arrives_with_headers_intact(tmp_path, sink, dns):
    relay = make_relay(tmp_path, sink, dns)
    relay.start()
    try:
        queue_id = submit(relay, "a@doe.test", ["bob@example.test", "carol@nomx.test"],
                          subject="héllo? no: plain ascii")
        received = sink.wait(2)
        rcpts = sorted(r for meta, _ in received for r in meta["recipients"])
        assert rcpts == ["bob@example.test", "carol@nomx.test"]  # MX, then A fallback
        meta, data = received[0]
        assert meta["sender"] == "a@doe.test"
        msg = email.message_from_bytes(data, policy=email.policy.SMTP)
        assert msg["Subject"] == "héllo? no: plain ascii"
        assert queue_id in msg["Received"] and "relay.test" in msg["Received"]
        assert data.endswith(b"\r\n\r\nhello\r\n")
        wait_for(lambda: spool_empty(relay), timeout=20, what="the spool to empty")
        wait_for(lambda: f"{queue_id} to=<bob@example.test>" in relay.log(),
                 what="the delivery's line in the log")
    finally:
        relay.stop()


def test_4xx_is_retried_until_it_succeeds(tmp_path, sink, dns):
    sink.rules({"later@example.test": [451, "4.2.0 greylisted, try later"]})
    relay = make_relay(tmp_path, sink, dns)
    relay.start()
    try:
        queue_id = submit(relay, "a@doe.test", ["later@example.test"])
        state = relay.data / "spool" / "state" / f"{queue_id}.json"
        wait_for(state.exists, timeout=20, what="a deferred attempt")
        assert json.loads(state.read_text())["attempts"] >= 1
        assert sink.messages() == []
        sink.rules({})
        received = sink.wait(1, timeout=60)
        assert received[0][0]["recipients"] == ["later@example.test"]
        wait_for(lambda: spool_empty(relay), timeout=20, what="the spool to empty")
    finally:
        relay.stop()


def test_a_hop_answering_data_with_250_keeps_the_message_queued(tmp_path, dns):
    """A next hop that says 250 to DATA (pipelined, as real servers offer it) got no
    message: it stays in the queue with the reason, and goes out once the hop is honest."""
    sink = Sink(tmp_path / "sink", "--pipelining")
    sink.rules({"data_command": [250, "2.0.0 ok"]})
    relay = make_relay(tmp_path, sink, dns)
    relay.start()
    try:
        queue_id = submit(relay, "a@doe.test", ["bob@example.test"], subject="lied to")
        state = relay.data / "spool" / "state" / f"{queue_id}.json"
        wait_for(state.exists, timeout=20, what="a deferred attempt")
        [entry] = json.loads(relay.admin("queue", "list", "--json").stdout)
        assert entry["id"] == queue_id and entry["attempts"] >= 1
        assert entry["last_error"] == ("451 4.5.0 protocol error: unexpected reply to DATA: "
                                       "250 2.0.0 ok")
        assert entry["pending"] == ["bob@example.test"]
        assert sink.messages() == []
        sink.rules({})
        [(meta, data)] = sink.wait(1, timeout=30)
        assert meta["recipients"] == ["bob@example.test"]
        assert email.message_from_bytes(data)["Subject"] == "lied to"
        wait_for(lambda: spool_empty(relay), timeout=20, what="the spool to empty")
        line = f"{queue_id} to=<bob@example.test> via mx.example.test[127.0.0.1]"
        wait_for(lambda: f"{line} sent: 250" in relay.log(), what="the delivery's log line")
        assert (f"{line} deferred: 451 4.5.0 protocol error: unexpected reply to DATA: "
                "250 2.0.0 ok") in relay.log()
    finally:
        relay.stop()
        sink.stop()


def test_5xx_bounces_with_a_dsn_to_the_sender(tmp_path, sink, dns):
    sink.rules({"nobody@example.test": [550, "5.1.1 no such user"]})
    relay = make_relay(tmp_path, sink, dns)
    relay.start()
    try:
        queue_id = submit(relay, "a@doe.test", ["nobody@example.test", "bob@example.test"])
        received = sink.wait(2)
        by_sender = {meta["sender"]: (meta, data) for meta, data in received}
        assert by_sender["a@doe.test"][0]["recipients"] == ["bob@example.test"]
        meta, data = by_sender[""]  # the DSN, with the null sender
        assert meta["recipients"] == ["a@doe.test"]
        dsn = email.message_from_bytes(data, policy=email.policy.SMTP)
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        parts = [p.get_content_type() for p in dsn.iter_parts()]
        assert parts[:2] == ["text/plain", "message/delivery-status"]
        status = [p for p in dsn.iter_parts()
                  if p.get_content_type() == "message/delivery-status"][0]
        text = status.as_string()
        assert "nobody@example.test" in text and "5.1.1" in text and "failed" in text
        assert queue_id in data.decode("ascii", "replace") or "Subject: test" in text + str(
            data)
        wait_for(lambda: spool_empty(relay), timeout=20, what="the spool to empty")
    finally:
        relay.stop()


def test_null_mx_and_nxdomain_bounce_without_delivery(tmp_path, sink, dns):
    relay = make_relay(tmp_path, sink, dns)
    relay.start()
    try:
        submit(relay, "a@doe.test", ["x@nullmx.test", "y@nxdomain.test"])
        received = sink.wait(1)
        assert [meta["sender"] for meta, _ in received] == [""]
        wait_for(lambda: spool_empty(relay), timeout=20, what="the spool to empty")
    finally:
        relay.stop()


def test_smarthost_with_starttls_and_auth(tmp_path):
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("localhost")
    sink = Sink(tmp_path / "sink", "--tls-cert", str(cert), "--tls-key", str(key),
                "--auth", "relayuser:relaypass", "--require-auth")
    relay = Relay(tmp_path / "relay", config=(
        "[delivery]\nmode = smarthost\n"
        f"smarthost = localhost:{sink.port}\nsmarthost_tls = required\n"
        f"smarthost_verify = yes\nsmarthost_ca_file = {ca.cert_path}\n"
        "smarthost_username = relayuser\nsmarthost_password = relaypass\n"))
    relay.domain_login("doe.test", PASSWORD)
    relay.start()
    try:
        submit(relay, "a@doe.test", ["anyone@example.net"])
        meta, _ = sink.wait(1)[0]
        assert meta["tls"] is True and meta["user"] == "relayuser"
        assert meta["recipients"] == ["anyone@example.net"]
    finally:
        relay.stop()
        sink.stop()


def test_priority_1_goes_before_a_backlog(tmp_path, sink):
    relay = make_relay(tmp_path, sink, delivery="enabled = no\n",
                       extra=f"example.test = 127.0.0.1:{sink.port}\n")
    relay.admin("account", "set", "default", "--add-domain", "urgent.test")
    relay.add_user("urgent.test", PASSWORD, "--priority", "1")
    relay.start()
    with relay.smtp(login=LOGIN) as c:
        for i in range(300):
            c.sendmail("a@doe.test", ["bulk@example.test"],
                       message("a@doe.test", "bulk@example.test", subject=f"bulk {i}"))
    submit(relay, "ops@urgent.test", ["pager@example.test"], subject="urgent",
           login=("urgent.test", PASSWORD))
    relay.stop()
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "enabled = no\n[routes]", "max_per_host = 1\n[routes]", 1))
    relay.start()
    try:
        received = sink.wait(301, timeout=120)
        subjects = [email.message_from_bytes(data)["Subject"] for _, data in received]
        # Envelopes are read in parallel at startup, so the first connection may already
        # carry a bulk message or two when the urgent one is routed; it still overtakes the
        # backlog of 300.
        assert subjects.index("urgent") < 5, subjects[:10]
        assert sorted(s for s in subjects if s != "urgent") == sorted(
            f"bulk {i}" for i in range(300))
        wait_for(lambda: spool_empty(relay), timeout=30, what="the spool to empty")
    finally:
        relay.stop()


def test_restart_with_a_full_queue_then_kill9_mid_delivery(tmp_path, sink):
    relay = make_relay(tmp_path, sink, delivery="enabled = no\n",
                       extra=f"example.test = 127.0.0.1:{sink.port}\n")
    relay.start()
    count, connections = 400, 2
    with relay.smtp(login=LOGIN) as c:
        for i in range(count):
            c.sendmail("a@doe.test", ["r@example.test"],
                       message("a@doe.test", "r@example.test", subject=f"m {i}"))
    relay.stop()
    assert len(relay.spool_files("queue")) == count
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "enabled = no\n[routes]", f"max_per_host = {connections}\n[routes]", 1))
    relay.start()
    wait_for(lambda: len(list(sink.records.glob("*.json"))) >= count // 4, timeout=60,
             what="some deliveries before the kill")
    relay.kill9()
    relay.start()
    try:
        wait_for(lambda: spool_empty(relay), timeout=120, what="the queue to drain")
        received = [(meta["connection"], email.message_from_bytes(data)["Subject"])
                    for meta, data in sink.messages()]
        times = Counter(subject for _, subject in received)
        assert set(times) == {f"m {i}" for i in range(count)}  # none forgotten
        # Only what was in flight at the kill may arrive twice: at most the last message
        # of each connection open then, never one its connection had gone on from.
        last = {connection: subject for connection, subject in received}
        first: dict[str, int] = {}
        for connection, subject in received:
            first.setdefault(subject, connection)
        again = sorted(subject for subject, n in times.items() if n > 1)
        assert all(times[subject] == 2 for subject in again), again
        assert all(last[first[subject]] == subject for subject in again), again
        assert len(again) <= connections
    finally:
        relay.stop()


def test_sandboxed_mail_is_held_and_visible(tmp_path, sink, dns):
    relay = make_relay(tmp_path, sink, dns)
    relay.admin("account", "set", "default", "--add-domain", "sandbox.test")
    relay.add_user("sandbox.test", PASSWORD, "--status", "sandboxed")
    relay.start()
    try:
        queue_id = submit(relay, "a@sandbox.test", ["bob@example.test"],
                          login=("sandbox.test", PASSWORD))
        submit(relay, "a@doe.test", ["bob@example.test"])
        sink.wait(1)
        listing = json.loads(relay.admin("queue", "list", "--json").stdout)
        held = [m for m in listing if m["id"] == queue_id]
        assert held and held[0]["state"] == "held"
        assert [meta["sender"] for meta, _ in sink.messages()] == ["a@doe.test"]
    finally:
        relay.stop()


def test_queue_admin_retry_reaches_the_running_daemon(tmp_path, sink, dns):
    sink.rules({"later@example.test": [451, "4.2.0 later"]})
    relay = make_relay(tmp_path, sink, dns)
    # Retries an hour apart: only the admin's retry can bring the message out in time.
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "retry_first = 1s\nretry_max = 2s\n", "retry_first = 1h\nretry_max = 2h\n"))
    relay.start()
    try:
        queue_id = submit(relay, "a@doe.test", ["later@example.test"])
        state = relay.data / "spool" / "state" / f"{queue_id}.json"
        wait_for(state.exists, timeout=20, what="a deferred attempt")
        listing = json.loads(relay.admin("queue", "list", "--json").stdout)
        assert [m["id"] for m in listing] == [queue_id]
        doomed = submit(relay, "a@doe.test", ["later@example.test"])
        wait_for((relay.data / "spool" / "state" / f"{doomed}.json").exists, timeout=20,
                 what="a second deferred attempt")
        deleted = relay.admin("queue", "delete", doomed).stdout
        assert deleted.startswith(f"{doomed}: deleted from queue") and "not running" not in deleted
        sink.rules({})
        retried = relay.admin("queue", "retry", queue_id).stdout
        assert retried == f"{queue_id}: due now\n"  # said by the running relay
        sink.wait(1, timeout=30)
        wait_for(lambda: spool_empty(relay), timeout=20, what="the spool to empty")
        assert [meta["recipients"] for meta, _ in sink.messages()] == [["later@example.test"]]
        shown = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c",
                                str(relay.config_path), "queue", "show", queue_id],
                               capture_output=True, text=True, env=env())
        assert shown.returncode == 1
        assert relay.admin("queue", "flush").stdout == "0 deferred messages due now\n"
    finally:
        relay.stop()
    # With the relay stopped, the same command acts on the spool and says so.
    assert "mailrelay is not running" in relay.admin("queue", "flush").stdout
