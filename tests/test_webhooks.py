"""Webhooks without the daemon: signatures (checked by the standardwebhooks package), the
store and its filters, what an answer means, the target check, and the sender against a
real loopback receiver."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import pytest
from harness import env
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from webhook_receiver import Receiver

from mailrelay.events import EventKind
from mailrelay.manage.stores import threaded
from mailrelay.webhooks import signing
from mailrelay.webhooks.sender import GONE, PERMANENT, RETRY, SENT, WebhookSender, classify
from mailrelay.webhooks.sink import WebhookSink
from mailrelay.webhooks.store import FAILED, PENDING, Event, WebhookStore
from mailrelay.webhooks.targetcheck import refused

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture
def store(tmp_path):
    s = WebhookStore(str(tmp_path / "webhooks.sqlite"))
    yield s
    s.close()


def test_signature_verified_by_standardwebhooks_also_while_a_secret_rotates():
    old, new = signing.new_secret(), signing.new_secret()
    body = b'{"id":"evt_1","type":"message.delivered"}'
    now = int(reactor.seconds())
    headers = signing.headers([new, old], "evt_1", now, body)
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["id"] == "evt_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body + b" ", headers)


def test_rotate_keeps_the_old_secret_for_the_overlap_only(store):
    e = store.add_endpoint("acme", "https://hooks.example/x", [], [], now=1000.0)
    first = e.secrets[0][0]
    rotated = store.rotate_secret(e.id, "acme", now=2000.0, overlap=60.0)
    assert rotated.active_secrets(2000.0) == [rotated.secrets[0][0], first]
    assert rotated.active_secrets(2061.0) == [rotated.secrets[0][0]]
    assert store.rotate_secret(e.id, "other", now=2000.0, overlap=60.0) is None


def test_events_go_to_the_endpoints_of_their_account_user_and_kind(store, tmp_path):
    everything = store.add_endpoint("acme", "https://a.example/", [], [], 1.0)
    alice = store.add_endpoint("acme", "https://b.example/", ["Alice@acme.test"], [], 1.0)
    bounces = store.add_endpoint("acme", "https://c.example/", [], ["message.bounced"], 1.0)
    store.add_endpoint("other", "https://d.example/", [], [], 1.0)
    sink = WebhookSink(store, reactor)
    sink.emit(EventKind.DELIVERED, "acme", "alice@acme.test",
              {"queue_id": "q1", "recipient": "x@y.test", "remote_reply": "250 ok",
               "auth_method": "password"})
    sink.emit(EventKind.BOUNCED, "acme", "bob@acme.test", {"bounce": "hard"})
    sink.emit(EventKind.PROCESSED, None, None, {})  # no account: no endpoint
    sink._write(sink._take())
    rows = store.due(now=1e12, limit=100)
    got = sorted((d.endpoint, d.kind) for d, _ in rows)
    assert got == sorted([(everything.id, "message.delivered"), (alice.id, "message.delivered"),
                          (everything.id, "message.bounced"), (bounces.id, "message.bounced")])
    doc = json.loads(next(d.body for d, _ in rows if d.kind == "message.delivered"))
    assert doc["type"] == "message.delivered" and doc["id"].startswith("evt_")
    assert doc["timestamp"].endswith("Z") and "T" in doc["timestamp"]
    assert doc["data"] == {"account": "acme", "user": "alice@acme.test",
                           "auth_method": "password", "queue_id": "q1",
                           "recipient": "x@y.test", "remote_reply": "250 ok"}
    bounced = json.loads(next(d.body for d, _ in rows if d.kind == "message.bounced"))
    assert bounced["data"]["bounce"] == "hard" and bounced["data"]["recipient"] is None


def test_failed_rows_listed_per_account_and_retried(store):
    e = store.add_endpoint("acme", "https://a.example/", [], [], 1.0)
    store.add_endpoint("other", "https://b.example/", [], [], 1.0)
    sink = WebhookSink(store, reactor)
    sink.emit(EventKind.DELIVERED, "acme", "u", {})
    sink.emit(EventKind.DELIVERED, "other", "u", {})
    sink._write(sink._take())
    (mine, _), = [r for r in store.due(1e12, 10) if r[1].account == "acme"]
    store.attempted(mine.id, FAILED, 5.0, 400, "HTTP 400: no")
    assert [d.id for d in store.failed("acme")] == [mine.id]
    assert store.failed("other") == []
    assert store.retry(mine.id, "other", 6.0) == "unknown"
    store.set_enabled(e.id, "acme", False, "gone")
    assert store.retry(mine.id, "acme", 6.0) == "disabled"
    store.set_enabled(e.id, "acme", True)
    assert store.retry(mine.id, "acme", 6.0) == "retried"
    again = [d for d, _ in store.due(6.0, 10) if d.id == mine.id]
    assert again and again[0].state == PENDING and again[0].attempts == 0


@pytest.mark.parametrize("status, outcome", [
    (200, SENT), (204, SENT), (500, RETRY), (503, RETRY), (408, RETRY), (429, RETRY),
    (None, RETRY), (410, GONE), (400, PERMANENT), (404, PERMANENT), (301, PERMANENT)])
def test_what_an_answer_means(status, outcome):
    assert classify(status) == outcome


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2a00:1450::1", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("224.0.0.1", False), ("0.0.0.0", False), ("::1", False), ("fe80::1", False),
    ("fd00::1", False), ("::ffff:127.0.0.1", False), ("ff02::1", False)])
def test_private_and_local_targets_refused(address, allowed):
    assert refused(ipaddress.ip_address(address)) is not allowed


def test_allowed_networks_let_loopback_through():
    assert not refused(ipaddress.ip_address("127.0.0.1"), LOOPBACK)
    assert refused(ipaddress.ip_address("10.0.0.1"), LOOPBACK)


class CountingStore(WebhookStore):
    """The outbox, its transactions counted (one per commit)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits: list[None] = []

    @contextmanager
    def transaction(self):
        with super().transaction() as db:
            yield db
        self.commits.append(None)


class SenderTests(unittest.TestCase):
    """The sender against a real twisted.web receiver on 127.0.0.1."""

    def setUp(self):
        directory = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.store = WebhookStore(f"{directory}/webhooks.sqlite")
        self.addCleanup(self.store.close)
        self.receiver = Receiver({"/flaky": [500, 200], "/gone": [410], "/bad": [400],
                                  "/slow": ["slow"], "/keep": [200, "drop", 200]})
        self.port = self.receiver.listen()
        self.addCleanup(self.port.stopListening)
        self.gone = []

    def sender(self, allowed=LOOPBACK, timeout=5.0, poll_interval=0.05, retry_delays=(0.2,),
               concurrency=10):  # fmt: skip
        s = WebhookSender(self.store, threaded(reactor), reactor, allowed=allowed,
                          retry_delays=retry_delays, timeout=timeout,
                          poll_interval=poll_interval, concurrency=concurrency,
                          gone=lambda account, e: self.gone.append((account, e.id)))
        s.startService()
        self.addCleanup(s.stopService)
        return s

    def event(self, path: str, host: str = "127.0.0.1"):
        url = f"http://{host}:{self.port.getHost().port}{path}"
        endpoint = self.store.add_endpoint("acme", url, [], [], reactor.seconds())
        self.emit()
        return endpoint

    def emit(self, count: int = 1) -> None:
        sink = WebhookSink(self.store, reactor)
        for i in range(count):
            sink.emit(EventKind.DELIVERED, "acme", "u@acme.test", {"queue_id": f"q{i}"})
        sink._write(sink._take())

    @defer.inlineCallbacks
    def settle(self, done, timeout: float = 10.0):
        for _ in range(int(timeout / 0.05)):
            if done():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("timed out")

    def verified(self, endpoint) -> list[dict]:
        webhook = Webhook(endpoint.secrets[0][0])
        return [webhook.verify(r["body"], r["headers"]) for r in self.receiver.requests]

    @defer.inlineCallbacks
    def test_a_backlog_past_concurrency_goes_out_without_waiting_for_the_next_look(self):
        # 35 events, 10 requests at a time, the next tick in an hour: each batch
        # answered makes room for the next at once.
        url = f"http://127.0.0.1:{self.port.getHost().port}/ok"
        self.store.add_endpoint("acme", url, [], [], reactor.seconds())
        sink = WebhookSink(self.store, reactor)
        for i in range(35):
            sink.emit(EventKind.DELIVERED, "acme", "u@acme.test", {"queue_id": f"q{i}"})
        sink._write(sink._take())
        self.sender(poll_interval=3600)
        yield self.settle(lambda: not self.store.pending_count())
        assert len(self.receiver.requests) == 35

    @defer.inlineCallbacks
    def test_events_to_one_endpoint_share_kept_connections(self):
        # 20 events, 2 requests at a time: 2 TCP connections, not one per request.
        endpoint = self.event("/ok")
        self.emit(19)
        self.sender(concurrency=2)
        yield self.settle(lambda: not self.store.pending_count())
        assert len(self.verified(endpoint)) == 20
        assert len({r["peer"] for r in self.receiver.requests}) <= 2

    @defer.inlineCallbacks
    def test_a_kept_connection_closed_by_the_endpoint_is_sent_again_at_once(self):
        # The endpoint closes the kept connection as the second event comes: the event
        # goes again on a new connection now, not after the retry delay (an hour).
        endpoint = self.event("/keep")
        self.sender(retry_delays=(3600.0,))
        yield self.settle(lambda: not self.store.pending_count())
        self.emit()
        yield self.settle(lambda: not self.store.pending_count())
        first, dropped, again = self.receiver.requests
        assert dropped["peer"] == first["peer"] != again["peer"]
        docs = self.verified(endpoint)  # each one signed
        assert docs[1]["id"] == docs[2]["id"] != docs[0]["id"]  # the same webhook-id
        assert again["headers"]["webhook-id"] == dropped["headers"]["webhook-id"]
        assert self.store.failed() == []

    @defer.inlineCallbacks
    def test_answers_that_come_together_are_recorded_in_one_transaction(self):
        # 40 events, 10 requests at a time: the answers that come while one transaction
        # is written go in the next one, not one transaction each.
        self.store.close()
        self.store = CountingStore(self.store.path)
        self.addCleanup(self.store.close)
        endpoint = self.event("/ok")
        self.emit(39)
        commits = self.store.commits[:]
        self.sender(poll_interval=3600)
        yield self.settle(lambda: not self.store.pending_count())
        assert len(self.verified(endpoint)) == 40
        assert len(self.store.commits) - len(commits) < 40

    @defer.inlineCallbacks
    def test_500_then_200_sent_once_after_a_retry(self):
        endpoint = self.event("/flaky")
        self.sender()
        yield self.settle(lambda: not self.store.pending_count() and
                          len(self.receiver.requests) == 2)
        docs = self.verified(endpoint)
        assert [d["id"] for d in docs] == [docs[0]["id"]] * 2  # the same webhook-id
        assert self.receiver.requests[0]["headers"]["webhook-id"] == docs[0]["id"]
        assert self.store.failed() == []

    @defer.inlineCallbacks
    def test_410_disables_the_endpoint_and_tells_the_account(self):
        endpoint = self.event("/gone")
        self.sender()
        yield self.settle(lambda: self.gone)
        assert self.gone == [("acme", endpoint.id)]
        assert not self.store.endpoint(endpoint.id).enabled
        (failed,) = self.store.failed("acme")
        assert failed.last_status == 410

    @defer.inlineCallbacks
    def test_other_4xx_fails_at_once(self):
        self.event("/bad")
        self.sender()
        yield self.settle(lambda: self.store.failed())
        assert len(self.receiver.requests) == 1
        assert self.store.failed()[0].last_error.startswith("HTTP 400")

    @defer.inlineCallbacks
    def test_slow_answer_times_out_and_is_retried(self):
        self.event("/slow")
        self.sender(timeout=0.5)
        yield self.settle(lambda: len(self.receiver.requests) == 2 and self.store.failed())
        assert "timed out" in self.store.failed()[0].last_error

    @defer.inlineCallbacks
    def test_loopback_refused_unless_allowed(self):
        self.event("/flaky")
        self.sender(allowed=())
        yield self.settle(lambda: self.store.failed())
        assert self.receiver.requests == []
        assert "private or local address" in self.store.failed()[0].last_error

    @defer.inlineCallbacks
    def test_a_name_that_resolves_to_loopback_is_refused_when_connecting(self):
        self.event("/flaky", host="localhost")  # a name: taken when added, checked later
        self.sender(allowed=())
        yield self.settle(lambda: self.store.failed())
        assert self.receiver.requests == []
        assert "localhost is 127.0.0.1" in self.store.failed()[0].last_error


def test_two_processes_append_to_one_outbox(store, tmp_path):
    """The relay and its delivery process each write events to the same file."""
    store.add_endpoint("acme", "https://a.example/", [], [], 1.0)
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys\n"
        "from mailrelay.webhooks.store import Event, WebhookStore\n"
        "store = WebhookStore(sys.argv[1])\n"
        "for n in range(50):\n"
        "    store.append([Event(f'evt_child{n}_{i}', 'acme', 'u', 'message.delivered',"
        " b'{}', 1.0) for i in range(4)])\n")
    child = subprocess.Popen([sys.executable, str(script), store.path], env=env())
    for n in range(50):
        store.append([Event(f"evt_parent{n}_{i}", "acme", "u", "message.delivered", b"{}", 1.0)
                      for i in range(4)])
    assert child.wait(timeout=60) == 0
    ids = {d.event_id for d, _ in store.due(1e12, 1000)}
    assert len(ids) == 400


def test_delivery_process_sends_even_when_its_user_file_is_broken(tmp_path):
    """The delivery process runs the sender; a user file broken since the relay started
    (the relay keeps its last good copy) must not stop a restarted delivery process: the
    sender runs, its 410 notices only are not mailed."""
    from twisted.application.service import MultiService

    from mailrelay.config import load_config
    from mailrelay.metrics import NO_METRICS
    from mailrelay.service import notice_directory, webhook_sender
    from mailrelay.spool.spool import Spool
    from mailrelay.webhooks.notice import GoneNotices
    from mailrelay.webhooks.store import Endpoint

    (tmp_path / "users").write_text("{ not json")
    path = tmp_path / "mailrelay.ini"
    path.write_text(f"[server]\ndata_dir = {tmp_path / 'data'}\n"
                    f"[directory]\nfile = {tmp_path / 'users'}\n")
    config = load_config(str(path))
    parent = MultiService()
    directory = notice_directory(config, reactor, parent)
    assert directory is None
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, owner=False)
    events = WebhookSink(WebhookStore(str(tmp_path / "webhooks.sqlite")), reactor)
    webhook_sender(config, events, directory, spool, reactor, parent, NO_METRICS)
    assert isinstance(parent.getServiceNamed("webhooks"), WebhookSender)
    submitted = []
    gone = GoneNotices(None, lambda *a: submitted.append(a), "postmaster@x.test", "x.test",
                       reactor)
    endpoint = Endpoint(1, "acme", "https://hooks.x.test/", (), (), (), True, "", 0.0)
    assert defer.ensureDeferred(gone("acme", endpoint)).called and submitted == []
