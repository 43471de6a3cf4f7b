"""End to end through twistd: /metrics on the control panel's listener, scraped over HTTP
and read with prometheus-client's own parser after a scripted day of a relay (logins good
and bad, refusals, a rate limit, deliveries by MX and by route, a bounce, a sender
notification, a held message), with the exact counts that day must give."""

from __future__ import annotations

import base64
import os
import re
import signal
import urllib.error
import urllib.request

import pytest
import test_e2e_delivery
from harness import Relay, free_port, message, wait_for
from prometheus_client.parser import text_string_to_metric_families

PASSWORD = "correct horse battery"
TOKEN = "scrape-me-7f3a"

sink, dns = test_e2e_delivery.sink, test_e2e_delivery.dns  # fixtures: a sink and its MX


def scrape(url: str, token: str | None = TOKEN) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def plain_auth(client, username: str, password: str):
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


def test_metrics_after_a_scripted_scenario(tmp_path, sink, dns):
    sink.rules({"nobody@example.test": [550, "5.1.1 no such user"]})
    port = free_port()
    relay = Relay(tmp_path / "relay", config=(
        f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n\n"
        f"[metrics]\ntoken = {TOKEN}\n\n"
        f"[delivery]\ndns_servers = 127.0.0.1:{dns.port}\nport = {sink.port}\n"
        "allow_local_mx = yes\nmx_tls = none\n\n"
        f"[routes]\ndoe.test = 127.0.0.1:{sink.port}\n"))
    relay.admin("account", "set", "default", "--domains", "doe.test",
                "--notify", "postmaster@doe.test")
    relay.add_user("doe.test", PASSWORD)
    relay.add_user("app", PASSWORD, "--domains", "doe.test", "--rate-limit", "1")
    relay.add_user("h@doe.test", PASSWORD, "--status", "sandboxed")
    url = f"http://127.0.0.1:{port}/metrics"
    relay.start()
    try:
        wait_for(lambda: _answers(url), what="the panel's listener")
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(url, token=None)
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            scrape(url, token="not-the-token")
        assert wrong.value.code == 401

        # smtp (STARTTLS): a wrong password, then a message with a recipient that bounces.
        with relay.smtp() as c:
            assert plain_auth(c, "doe.test", "wrong")[0] == 535
        with relay.smtp(login=("doe.test", PASSWORD)) as c:
            c.sendmail("a@doe.test", ["bob@example.test", "nobody@example.test"],
                       message("a@doe.test", "bob@example.test"))
        # smtps (implicit TLS): a sender outside the scope (a notification), then the
        # rate-limited user's first message and its refused second one.
        with relay.smtps(login=("doe.test", PASSWORD)) as c:
            assert c.mail("someone@elsewhere.test")[0] == 550
        with relay.smtps(login=("app", PASSWORD)) as c:
            c.sendmail("x@doe.test", ["carol@example.test"],
                       message("x@doe.test", "carol@example.test"))
            assert c.mail("x@doe.test")[0] == 451
        # smtp: a sandboxed user's message stays held.
        with relay.smtp(login=("h@doe.test", PASSWORD)) as c:
            c.sendmail("h@doe.test", ["dave@example.test"],
                       message("h@doe.test", "dave@example.test"))

        # bob, carol, the bounce to a@doe.test and the notification to postmaster@doe.test
        sink.wait(4)
        samples = wait_for(
            lambda: (s := scrape(url))
            and sum(v for (n, _), v in s.items() if n == "mailrelay_delivery_attempts_total") == 5
            and value(s, "mailrelay_smtp_sessions_open", listener="smtps", tls="yes") == 0
            and value(s, "mailrelay_smtp_sessions_open", listener="smtp", tls="yes") == 0
            # the queue's gauges come from the delivery process once a second
            and value(s, "mailrelay_queue_messages", state="ready") == 0
            and value(s, "mailrelay_queue_messages", state="held") == 1
            and s, timeout=30, what="the deliveries counted")
    finally:
        relay.stop()

    expected = {
        # and the harness's connection that waits for the listener (no command sent)
        ("mailrelay_smtp_sessions_total", (("listener", "smtp"), ("tls", "no"))): 4,
        ("mailrelay_smtp_sessions_total", (("listener", "smtps"), ("tls", "yes"))): 2,
        ("mailrelay_smtp_starttls_total", (("listener", "smtp"),)): 3,
        ("mailrelay_smtp_logins_total", (("method", "password"), ("result", "success"))): 4,
        ("mailrelay_smtp_logins_total", (("method", "password"), ("result", "failure"))): 1,
        ("mailrelay_smtp_messages_accepted_total", (("listener", "smtp"),)): 2,
        ("mailrelay_smtp_messages_accepted_total", (("listener", "smtps"),)): 1,
        ("mailrelay_smtp_refusals_total", (("code", "535"), ("status", "5.7.8"))): 1,
        ("mailrelay_smtp_refusals_total", (("code", "550"), ("status", "5.7.1"))): 1,
        ("mailrelay_smtp_refusals_total", (("code", "451"), ("status", "4.7.1"))): 1,
        ("mailrelay_spool_commit_seconds_count", ()): 3,
        ("mailrelay_policy_refusals_total", (("reason", "rate_limit"),)): 1,
        ("mailrelay_delivery_attempts_total", (("destination", "mx"), ("outcome", "sent"))): 2,
        ("mailrelay_delivery_attempts_total", (("destination", "mx"),
                                               ("outcome", "bounced"))): 1,
        ("mailrelay_delivery_attempts_total", (("destination", "route"),
                                               ("outcome", "sent"))): 2,
        ("mailrelay_delivery_seconds_count", ()): 4,
        ("mailrelay_notifications_queued_total", (("kind", "bounce"),)): 1,
        ("mailrelay_notifications_queued_total", (("kind", "sender"),)): 1,
        ("mailrelay_queue_messages", (("state", "ready"),)): 0,
        ("mailrelay_queue_messages", (("state", "deferred"),)): 0,
        ("mailrelay_queue_messages", (("state", "held"),)): 1,
        ("mailrelay_delivery_process_up", ()): 1,
        ("mailrelay_delivery_process_restarts_total", ()): 0,
    }
    for (name, labels), count in expected.items():
        assert samples.get((name, labels)) == count, (name, labels, samples.get((name, labels)))
    # every sample of these families is one of the above: nothing else was counted
    for family in ("mailrelay_smtp_refusals_total", "mailrelay_delivery_attempts_total",
                   "mailrelay_smtp_logins_total", "mailrelay_policy_refusals_total",
                   "mailrelay_notifications_queued_total", "mailrelay_smtp_sessions_total"):
        counted = {k: v for k, v in samples.items() if k[0] == family and v}
        assert counted == {k: v for k, v in expected.items() if k[0] == family}, family
    for labels in ((("listener", "smtp"), ("tls", "no")), (("listener", "smtp"), ("tls", "yes")),
                   (("listener", "smtps"), ("tls", "yes"))):
        assert samples[("mailrelay_smtp_sessions_open", labels)] == 0
    sizes = [int(n) for n in re.findall(r"accepted \w+: .* size=(\d+)", relay.log())]
    assert len(sizes) == 3
    assert value(samples, "mailrelay_smtp_received_bytes_total", listener="smtp") + value(
        samples, "mailrelay_smtp_received_bytes_total", listener="smtps") == sum(sizes)
    assert value(samples, "mailrelay_queue_oldest_seconds", state="held") > 0
    assert value(samples, "mailrelay_delivery_process_report_age_seconds") < 10
    # no label carries an address or a username
    labels = " ".join(str(k[1]) for k in samples)
    assert "@" not in labels and "doe.test" not in labels and "app" not in labels.split("'")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def test_own_listener_and_the_delivery_process_health(tmp_path):
    """``[metrics] endpoint`` of its own (the panel off): only /metrics answers there, with
    no token asked; a delivery process killed is counted as restarted, and up again."""
    port = free_port()
    relay = Relay(tmp_path / "relay", config=(
        f"[metrics]\nendpoint = tcp:{port}:interface=127.0.0.1\n"))
    url = f"http://127.0.0.1:{port}"
    relay.start()
    try:
        wait_for(lambda: _answers(url + "/metrics"), what="the metrics listener")
        for path in ("/", "/api/v1/users", "/metrics/more"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(url + path, timeout=10)
            assert missing.value.code == 404
        first = wait_for(lambda: (s := scrape(url + "/metrics", token=None))
                         and value(s, "mailrelay_delivery_process_up") == 1
                         and (s, delivery_pids(relay)), what="the delivery process")
        samples, pids = first
        assert value(samples, "mailrelay_delivery_process_restarts_total") == 0
        os.kill(pids[0], signal.SIGKILL)
        samples = wait_for(lambda: (s := scrape(url + "/metrics", token=None))
                           and value(s, "mailrelay_delivery_process_restarts_total") == 1
                           and value(s, "mailrelay_delivery_process_up") == 1
                           and s, timeout=20, what="the restart counted")
        assert len(delivery_pids(relay)) == 2
        assert value(samples, "mailrelay_queue_messages", state="ready") == 0
    finally:
        relay.stop()


def delivery_pids(relay: Relay) -> list[int]:
    return [int(p) for p in re.findall(r"delivery process (\d+) started", relay.log())]
