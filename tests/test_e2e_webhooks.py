"""Webhooks end to end through the real twistd: a loopback receiver (its own process)
that answers 500 then 200, 410, or too slowly; every request's signature verified with
the standardwebhooks package; failed events sent again with mailrelay-admin and the API;
an event being sent when twistd is killed with kill -9 sent again after the restart, also
one answered 2xx whose outcome was not yet written; the
requests counted in /metrics; the sending done by the delivery process (killed under a
request, restarted by the relay, sending it again; its 410 notice mailed, its requests
counted in the relay's /metrics); two nodes sharing their endpoints in PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from contextlib import closing

import pg_server
import pytest
from harness import Peer, Relay, Sink, free_port, message, wait_for
from standardwebhooks.webhooks import Webhook
from test_e2e_metrics import scrape, value

PASSWORD = "correct horse battery"
FAST = ("[delivery]\nenabled = no\n\n[webhooks]\nallow_private = 127.0.0.0/8\n"
        "poll_interval = 0.2s\n")


class Receiver(Peer):
    """tests/webhook_receiver.py: per-path answers, every request recorded."""

    def __init__(self, directory) -> None:
        super().__init__(directory, "webhook_receiver.py", "--record-dir",
                         str(self._dirs(directory)), "--rules", str(self.rules_path))

    def _dirs(self, directory):
        self.records = directory / "requests"
        self.records.mkdir(parents=True, exist_ok=True)
        self.rules_path = directory / "rules.json"
        self.rules({})
        return self.records

    def rules(self, rules: dict) -> None:
        tmp = self.rules_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.rules_path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests(self, path: str) -> list[dict]:
        found = sorted(self.records.glob("*.json"), key=lambda p: int(p.stem))
        return [r for r in (json.loads(p.read_text()) for p in found) if r["path"] == path]

    def wait(self, path: str, count: int, timeout: float = 30.0) -> list[dict]:
        return wait_for(lambda: len(r := self.requests(path)) >= count and r, timeout=timeout,
                        interval=0.1, what=f"{count} requests at {path}")


def verified(secret: str, requests: list[dict]) -> list[dict]:
    """The payloads, each request's signature checked by standardwebhooks."""
    return [Webhook(secret).verify(r["body"], r["headers"]) for r in requests]


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    r = Receiver(tmp_path_factory.mktemp("receiver"))
    r.rules({"/flaky": [500, 200], "/gone": [410, 200], "/slow": ["slow", "slow", 200],
             "/hang": ["slow", 200], "/late": ["late", 200], "/counted": [500, 200],
             "/refused": [400]})
    yield r
    r.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, receiver):
    port = free_port()
    r = Relay(tmp_path_factory.mktemp("relay"), config=(
        FAST + "retry_delays = 1s\ntimeout = 1s\n\n"
        f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"))
    r.panel_url = f"http://127.0.0.1:{port}"
    r.admin("account", "add", "acme", "--domains", "a.test;b.test;c.test;d.test",
            "--notify", "ops@acme.test")
    for domain in ("a.test", "b.test", "c.test", "d.test"):
        r.add_user(domain, PASSWORD, "--account", "acme")
    r.api_key = r.admin("apikey", "add", "e2e", "--read-write").stdout.splitlines()[1]
    r.start()
    wait_for(lambda: _listening(port), what="the control panel")
    yield r
    r.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def endpoint(relay, url: str, user: str) -> dict:
    return json.loads(relay.admin("webhook", "add", "acme", url, "--user", user,
                                  "--json").stdout)


def submit(relay, login: str) -> str:
    """One message accepted for ``login``; its queue id."""
    with relay.smtp(login=(login, PASSWORD)) as client:
        sender = f"app@{login}"
        client.mail(sender)
        client.rcpt("someone@example.net")
        code, reply = client.data(message(sender, "someone@example.net"))
    assert code == 250, reply
    return reply.decode().rpartition(" ")[2]


def admin_json(relay, *args: str):
    return json.loads(relay.admin(*args, "--json").stdout)


def api(relay, method: str, path: str, doc: dict | None = None):
    headers = {"authorization": f"Bearer {relay.api_key}"}
    if doc is not None:
        headers["content-type"] = "application/json"
    request = urllib.request.Request(relay.panel_url + "/api/v1" + path, method=method,
                                     headers=headers,
                                     data=None if doc is None else json.dumps(doc).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_requests_counted_in_metrics(relay, receiver):
    """/metrics, read with prometheus-client's parser: a 500 then a 200 are one retried
    and one sent, a 400 one failed; nothing left in the outbox."""
    before = scrape(relay.panel_url + "/metrics", token=None)
    endpoint(relay, receiver.url("/counted"), "d.test")
    refused = endpoint(relay, receiver.url("/refused"), "d.test")
    submit(relay, "d.test")
    receiver.wait("/counted", 2)
    receiver.wait("/refused", 1)

    def counted():
        now = scrape(relay.panel_url + "/metrics", token=None)
        seen = {o: value(now, "mailrelay_webhook_deliveries_total", outcome=o) -
                value(before, "mailrelay_webhook_deliveries_total", outcome=o)
                for o in ("sent", "retried", "failed")}  # fmt: skip
        return seen == {"sent": 1, "retried": 1, "failed": 1} and now

    now = wait_for(counted, what="the requests counted")
    assert ("mailrelay_webhook_outbox_pending", ()) in now
    assert value(now, "mailrelay_webhook_outbox_pending") == 0
    relay.admin("webhook", "del", str(refused["id"]))  # its failed event goes with it


def test_500_then_200_delivers_the_event_once_signed(relay, receiver):
    hook = endpoint(relay, receiver.url("/flaky"), "a.test")
    queue_id = submit(relay, "a.test")
    first, second = verified(hook["secrets"][0], receiver.wait("/flaky", 2))
    assert first == second  # the same event, the same webhook-id
    assert second["type"] == "message.processed" and second["id"].startswith("evt_")
    assert second["data"]["queue_id"] == queue_id
    assert (second["data"]["account"], second["data"]["user"],
            second["data"]["auth_method"]) == ("acme", "a.test", "password")
    wait_for(lambda: f"webhook {second['id']} (message.processed) sent to" in relay.log(),
             what="the event sent")
    assert admin_json(relay, "webhook", "failed") == []
    assert len(receiver.requests("/flaky")) == 2


def test_410_disables_the_endpoint_and_tells_the_account(relay, receiver):
    hook = endpoint(relay, receiver.url("/gone"), "b.test")
    submit(relay, "b.test")

    def disabled():
        (listed,) = [e for e in admin_json(relay, "webhook", "list") if e["id"] == hook["id"]]
        return not listed["enabled"] and listed

    assert "410" in wait_for(disabled, what="the endpoint disabled")["disabled_reason"]
    notices = wait_for(lambda: [p.read_bytes() for p in relay.spool_files()
                                if b"ops@acme.test" in p.read_bytes().partition(b"\n")[0]],
                       what="the notice to the account")
    assert (f"Subject: Webhook endpoint {hook['id']} disabled: it answered 410 Gone".encode()
            in notices[0])
    assert receiver.url("/gone").encode() in notices[0]
    (failed,) = [f for f in admin_json(relay, "webhook", "failed")
                 if f["endpoint"] == hook["id"]]
    assert failed["last_status"] == 410
    # Back: enabled and sent again by hand, it now answers 200.
    relay.admin("webhook", "enable", str(hook["id"]))
    relay.admin("webhook", "retry", "--endpoint", str(hook["id"]))
    payloads = verified(hook["secrets"][0], receiver.wait("/gone", 2))
    assert payloads[0] == payloads[1]
    wait_for(lambda: not [f for f in admin_json(relay, "webhook", "failed")
                          if f["endpoint"] == hook["id"]], what="no failed event left")


def test_slow_endpoint_times_out_is_retried_and_sent_again_through_the_api(relay, receiver):
    hook = endpoint(relay, receiver.url("/slow"), "c.test")
    submit(relay, "c.test")
    receiver.wait("/slow", 2)  # timed out, tried again after retry_delays, timed out

    def failed():
        status, doc = api(relay, "GET", "/webhooks/failed?account=acme")
        assert status == 200
        return [f for f in doc if f["endpoint"] == hook["id"]]

    (event,) = wait_for(failed, what="the event failed")
    assert event["attempts"] == 2 and "timed out after 1s" in event["last_error"]
    assert api(relay, "POST", f"/webhooks/failed/{event['id']}/retry")[0] == 202
    payloads = verified(hook["secrets"][0], receiver.wait("/slow", 3))
    assert payloads[0] == payloads[2] and payloads[0]["id"] == event["event_id"]
    wait_for(lambda: not failed(), what="no failed event left")


def one_user(directory, config: str, domain: str, url: str) -> tuple[Relay, dict]:
    """A relay started with one user of acme, ``domain``, and an endpoint for it."""
    relay = Relay(directory, config=config)
    relay.admin("account", "add", "acme", "--domains", domain)
    relay.add_user(domain, PASSWORD, "--account", "acme")
    hook = endpoint(relay, url, domain)
    relay.start()
    return relay, hook


def test_event_being_sent_survives_kill_9_and_is_sent_after_restart(tmp_path, receiver):
    relay, hook = one_user(tmp_path / "killed", FAST + "timeout = 60s\n", "k.test",
                           receiver.url("/hang"))
    try:
        queue_id = submit(relay, "k.test")
        receiver.wait("/hang", 1)  # its answer never comes: the request is under way
        relay.kill9()
        relay.start()
        first, second = verified(hook["secrets"][0], receiver.wait("/hang", 2))
        assert first == second and second["data"]["queue_id"] == queue_id
        wait_for(lambda: "(message.processed) sent to" in relay.log(), what="the event sent")
    finally:
        relay.stop()


def test_kill_9_after_the_2xx_before_its_outcome_is_written_only_sends_it_again(
        tmp_path, receiver):  # fmt: skip
    # The relay records answers in batches: until its batch is written, a 2xx answered
    # event is still in the outbox. The outbox is held locked (another writer) from
    # the request to the kill, so the 2xx cannot be written; after the restart the
    # event goes once more, with the same webhook-id, and then leaves the outbox.
    relay, hook = one_user(tmp_path / "batched", FAST, "l.test", receiver.url("/late"))
    try:
        queue_id = submit(relay, "l.test")
        receiver.wait("/late", 1)  # under way; its 200 comes in a second
        lock = sqlite3.connect(relay.data / "webhooks.sqlite", isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            wait_for(lambda: receiver.requests("/late")[0].get("answered"), what="the 200")
            time.sleep(0.3)  # the relay reads the answer, cannot record it
            relay.kill9()
        finally:
            lock.close()
        relay.start()
        first, second = verified(hook["secrets"][0], receiver.wait("/late", 2))
        assert first == second and second["data"]["queue_id"] == queue_id
        wait_for(lambda: "(message.processed) sent to" in relay.log(), what="the event sent")
        wait_for(lambda: not outbox(relay), what="the outbox empty")
        time.sleep(0.5)  # no third request
        assert len(receiver.requests("/late")) == 2
    finally:
        relay.stop()


def outbox(relay) -> list[tuple]:
    with closing(sqlite3.connect(relay.data / "webhooks.sqlite")) as db:
        return db.execute("SELECT id, state FROM outbox").fetchall()


def test_a_session_and_the_delivery_process_report_to_the_endpoint(tmp_path, receiver):
    """The whole chain: a refused MAIL and an accepted message in the relay, their delivery
    in the delivery process, each event signed and sent with its message's fields."""
    sink = Sink(tmp_path / "sink")
    r = Relay(tmp_path / "relay", config=(
        f"[delivery]\nallow_local_mx = yes\nmx_tls = none\n\n"
        f"[routes]\nexample.test = 127.0.0.1:{sink.port}\n\n"
        "[webhooks]\nallow_private = 127.0.0.0/8\npoll_interval = 0.2s\n"))
    r.admin("account", "add", "acme", "--domains", "a.test")
    r.add_user("a.test", PASSWORD, "--account", "acme")
    r.start()
    try:
        hook = endpoint(r, receiver.url("/chain"), "a.test")
        with r.smtp(login=("a.test", PASSWORD)) as c:
            assert c.mail("x@other.test")[0] == 550
            c.mail("app@a.test")
            c.rcpt("ok@example.test")
            code, reply = c.data(message("app@a.test", "ok@example.test"))
        assert code == 250
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        got = {e["type"]: e for e in verified(hook["secrets"][0],
                                              receiver.wait("/chain", 3))}
        assert sorted(got) == ["message.delivered", "message.processed", "message.rejected"]
        rejected = got["message.rejected"]["data"]
        assert (rejected["reply"]["code"], rejected["sender"]) == (550, "x@other.test")
        for kind in ("message.processed", "message.delivered"):
            data = got[kind]["data"]
            assert (data["account"], data["user"], data["queue_id"]) == ("acme", "a.test",
                                                                         queue_id)
        delivered = got["message.delivered"]["data"]
        assert delivered["recipient"] == "ok@example.test"
        assert delivered["remote_reply"].startswith("250")
    finally:
        r.stop()
        sink.stop()


def delivery_pids(relay) -> list[int]:
    return [int(p) for p in re.findall(r"delivery process (\d+) started", relay.log())]


def test_the_delivery_process_sends_and_a_restarted_one_goes_on(tmp_path):
    """The relay's SMTP sessions do not pay for the requests: the delivery process sends.
    Killed with kill -9 under a request, it is restarted by the relay and the new one
    sends that event again from the outbox; its 410 notice is mailed out, and its
    requests are counted in the relay's /metrics."""
    receiver = Receiver(tmp_path / "receiver")
    receiver.rules({"/hang": ["slow", 200], "/gone": [410]})
    sink = Sink(tmp_path / "sink")
    port = free_port()
    relay = Relay(tmp_path / "relay", config=(
        "[delivery]\nallow_local_mx = yes\nmx_tls = none\n\n"
        f"[routes]\nexample.test = 127.0.0.1:{sink.port}\n\n"
        "[webhooks]\nallow_private = 127.0.0.0/8\npoll_interval = 0.2s\ntimeout = 60s\n\n"
        f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"))
    relay.admin("account", "add", "acme", "--domains", "a.test;b.test",
                "--notify", "ops@example.test")
    for domain in ("a.test", "b.test"):
        relay.add_user(domain, PASSWORD, "--account", "acme")
    hook, gone = (json.loads(relay.admin(
        "webhook", "add", "acme", receiver.url(path), "--user", user,
        "--event", "message.processed", "--json").stdout)
        for path, user in (("/hang", "a.test"), ("/gone", "b.test")))
    relay.start()
    try:
        (first_pid,) = wait_for(lambda: delivery_pids(relay), what="the delivery process")
        queue_id = submit(relay, "a.test")
        receiver.wait("/hang", 1)  # its answer never comes: the request is under way
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: len(delivery_pids(relay)) == 2, what="the process restarted")
        first, second = verified(hook["secrets"][0], receiver.wait("/hang", 2))
        assert first == second and second["data"]["queue_id"] == queue_id
        wait_for(lambda: "(message.processed) sent to" in relay.log(), what="the event sent")

        submit(relay, "b.test")
        subject = f"Webhook endpoint {gone['id']} disabled: it answered 410 Gone".encode()
        wait_for(lambda: [m for e, m in sink.messages() if subject in m],
                 what="the notice delivered")
        samples = wait_for(lambda: (s := scrape(f"http://127.0.0.1:{port}/metrics",
                                                token=None))
                           and value(s, "mailrelay_webhook_deliveries_total",
                                     outcome="failed") == 1 and s,
                           what="the 410 counted")
        assert value(samples, "mailrelay_webhook_deliveries_total", outcome="sent") == 1
    finally:
        relay.stop()
        sink.stop()
        receiver.stop()


def test_endpoint_added_on_one_node_receives_the_events_of_another(tmp_path, receiver):
    """Two twistd nodes sharing one PostgreSQL ([cluster] postgres): an endpoint added
    through node A's API receives, signed, the event of a message node B accepted."""
    dsn = pg_server.shared_server().create_database()
    nodes = []
    for name in ("a", "b"):
        port = free_port()
        node = Relay(tmp_path / name, config=(
            FAST + f"\n[cluster]\npostgres = {dsn}\nnode_id = {name}\n\n"
            f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"))
        node.panel_url = f"http://127.0.0.1:{port}"
        nodes.append(node)
    a, b = nodes
    # Users, accounts and API keys are in the database too: made once, on a.
    a.admin("account", "add", "acme", "--domains", "n.test")
    a.add_user("n.test", PASSWORD, "--account", "acme")
    a.api_key = b.api_key = a.admin("apikey", "add", "e2e",
                                    "--read-write").stdout.splitlines()[1]
    try:
        for node in nodes:
            node.start()
            wait_for(lambda n=node: _listening(int(n.panel_url.rpartition(":")[2])),
                     what="the control panel")
        status, hook = api(a, "POST", "/webhooks", {"account": "acme",
                                                   "url": receiver.url("/shared")})
        assert status == 201, hook
        assert [e["id"] for e in api(b, "GET", "/webhooks")[1]] == [hook["id"]]
        queue_id = submit(b, "n.test")
        (payload,) = verified(hook["secrets"][0], receiver.wait("/shared", 1))
        assert (payload["type"], payload["data"]["queue_id"]) == ("message.processed",
                                                                  queue_id)
        wait_for(lambda: "(message.processed) sent to" in b.log(), what="b sent it")
        assert "(message.processed) sent to" not in a.log()  # b's outbox, b's sender
    finally:
        for node in nodes:
            node.stop()
