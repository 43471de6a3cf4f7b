"""Webhook endpoints shared by the nodes in a real PostgreSQL (tests/pg_server.py): two
nodes, each with its own outbox file, its own pool and its own listener, as two relays
sharing one database have. What one node changes is in force on the other within a
second: a new endpoint gets the other node's events, a 410 that disabled an endpoint
stops its sending there, a new secret signs there, a deleted endpoint's events go."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pg_server
import pytest
from twisted.internet import reactor

from mailrelay.events import EventKind
from mailrelay.postgres.db import Database
from mailrelay.service import open_webhooks
from mailrelay.webhooks.pgstore import PgEndpoints, SharedWebhookStore
from mailrelay.webhooks.sink import WebhookSink
from mailrelay.webhooks.store import FAILED, PENDING

URL = "https://hooks.example.com/{}"
IN_FORCE = 1.0  # seconds: what the nodes promise


class Node:
    """One relay's part: its pool, its copy of the endpoints told of changes, its outbox."""

    def __init__(self, dsn: str, directory) -> None:
        self.db = Database(dsn)
        self.db.open()
        self.endpoints = PgEndpoints(self.db)
        self.store = SharedWebhookStore(str(directory / "webhooks.sqlite"), self.endpoints)
        self.listener = self.store.listener(reactor)
        self.listener.startService()

    def emit(self, user: str = "u@acme.test") -> None:
        sink = WebhookSink(self.store, reactor)
        sink.emit(EventKind.DELIVERED, "acme", user, {"queue_id": "q"})
        sink._write(sink._take())

    def close(self) -> None:
        self.listener._stop.set()
        self.store.close()
        self.db.close()


@pytest.fixture
def nodes(tmp_path):
    dsn = pg_server.shared_server().create_database()
    made = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        made.append(Node(dsn, tmp_path / name))
    for node in made:
        until(node.listener.listening.is_set, 10.0, "listening")
    yield made
    for node in made:
        node.close()


def until(predicate, timeout: float, what: str):
    """``predicate()`` once true, the reactor's calls from the listeners' threads run
    meanwhile; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        reactor.runUntilCurrent()
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def test_an_endpoint_added_on_one_node_gets_the_events_of_the_other(nodes):
    a, b = nodes
    b.emit()  # b has read the endpoints: none yet
    assert b.store.pending_count() == 0
    endpoint = a.store.add_endpoint("acme", URL.format("a"), [], [], time.time())

    def queued_on_b():
        b.emit()
        return b.store.due(time.time() + 1, 10)

    ((delivery, seen),) = until(queued_on_b, IN_FORCE, "b queues for a's endpoint")
    assert (delivery.endpoint, seen.url, seen.secrets) == (endpoint.id, endpoint.url,
                                                           endpoint.secrets)
    assert a.store.pending_count() == 0  # each node queues its own events only
    assert [e.id for e in b.store.endpoints("acme")] == [endpoint.id]


def test_a_410_on_one_node_stops_the_endpoint_on_the_other(nodes):
    a, b = nodes
    endpoint = a.store.add_endpoint("acme", URL.format("gone"), [], [], time.time())
    until(lambda: b.emit() or b.store.pending_count(), IN_FORCE, "b queues")
    # a's sender got a 410: it disables the endpoint as WebhookSender._record does.
    assert a.store.set_enabled(endpoint.id, None, False, "answered 410 Gone")
    until(lambda: not b.store.due(time.time() + 1, 10), IN_FORCE, "b stops sending")
    (failed,) = b.store.failed("acme")
    assert failed.state == FAILED and "410" in failed.last_error
    assert b.store.retry(failed.id, None, time.time()) == "disabled"
    b.emit()
    assert b.store.pending_count() == 0  # nothing more queued for it
    assert a.store.set_enabled(endpoint.id, None, True)
    assert b.store.retry(failed.id, "acme", time.time()) == "retried"
    ((delivery, seen),) = until(lambda: b.store.due(time.time() + 1, 10), IN_FORCE,
                                "b sends again")
    assert (delivery.id, delivery.state, seen.enabled) == (failed.id, PENDING, True)


def test_a_secret_rotated_on_one_node_signs_on_the_other(nodes):
    a, b = nodes
    endpoint = a.store.add_endpoint("acme", URL.format("rotated"), [], [], time.time())
    until(lambda: b.emit() or b.store.pending_count(), IN_FORCE, "b queues")
    old = endpoint.active_secrets(time.time())
    rotated = a.store.rotate_secret(endpoint.id, "acme", time.time(), 0)
    new = rotated.active_secrets(time.time())
    assert new != old and len(new) == 1

    def signs_with_the_new_one():
        due = b.store.due(time.time() + 1, 10)
        return due and due[0][1].active_secrets(time.time()) == new

    until(signs_with_the_new_one, IN_FORCE, "b signs with the new secret")


def test_an_endpoint_deleted_on_one_node_leaves_the_other(nodes):
    a, b = nodes
    endpoint = a.store.add_endpoint("acme", URL.format("deleted"), [], [], time.time())
    until(lambda: b.emit() or b.store.pending_count(), IN_FORCE, "b queues")
    assert not a.store.remove_endpoint(endpoint.id, "other")  # another account's: no
    assert a.store.remove_endpoint(endpoint.id, "acme")
    until(lambda: not b.store.due(time.time() + 1, 10), IN_FORCE, "b drops its events")
    assert b.store.pending_count() == 0 and b.store.failed() == []
    assert b.store.endpoint(endpoint.id) is None


def test_the_relay_opens_the_shared_store_with_cluster_postgres(tmp_path):
    dsn = pg_server.shared_server().create_database()
    config = SimpleNamespace(
        cluster=SimpleNamespace(postgres=dsn, postgres_password="", postgres_connections=2),
        webhooks=SimpleNamespace(db=str(tmp_path / "webhooks.sqlite")))
    store = open_webhooks(config)
    try:
        assert isinstance(store, SharedWebhookStore)
        endpoint = store.add_endpoint("acme", URL.format("x"), [], [], time.time())
        db = Database(dsn)
        db.open()
        assert [e.id for e in PgEndpoints(db).endpoints()] == [endpoint.id]
        db.close()
    finally:
        store.close()
    config.cluster.postgres = ""
    local = open_webhooks(config)
    assert not isinstance(local, SharedWebhookStore) and local.endpoints() == []
    local.close()
