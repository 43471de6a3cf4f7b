"""What docs/cluster.md promises an operator who adds and removes nodes, with real parts:
three twistd nodes behind HAProxy (round robin, send-proxy-v2, a health check, a runtime
API socket) sharing one redis-server and one PostgreSQL, reached through a libpq
multi-host string with ``target_session_attrs=read-write`` whose first host is down and
second a hot standby of the third (as after a failover). A user made with mailrelay-admin
logs in through the balancer; a node taken out with ``disable server`` lets the session
in progress finish its message while new connections go to the others; on SIGTERM a
session that ends its message within ``[server] shutdown_grace`` gets its 250 (the message
stays in the node's queue) and then ``421 4.3.2``, and one that does not gets the 421 at
the grace's end with nothing kept (its client sends it again through the balancer, to
another node); a fourth node with the same configuration, enabled in HAProxy, takes
connections and counts in the same Redis rate limit."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import threading
import time

import pg_server
import pytest
from balancer import Balancer
from harness import Relay, free_port, message, wait_for

from tests.redis_server import NOT_INSTALLED, RedisServer, installed

PASSWORD = "correct horse battery"
RATE = 6  # the fourth node's test user: messages an hour over all the nodes
GRACE = 2  # [server] shutdown_grace of the nodes, in seconds
GOODBYE = b"4.3.2 "  # and the 421's enhanced status code


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    assert installed(), NOT_INSTALLED
    assert pg_server.installed(), pg_server.NOT_INSTALLED
    tmp = tmp_path_factory.mktemp("nodes")
    primary = pg_server.shared_server()
    dsn = primary.create_database()
    standby = standby_of(primary)
    # Tried in order: a port nothing listens on, a standby (read-only), the primary.
    user_host, _, rest = dsn.removeprefix("postgresql://").partition("/")
    user, _, host = user_host.partition("@")
    multi = (f"postgresql://{user}@127.0.0.1:{free_port()},127.0.0.1:{standby.port},"
             f"{host}/{rest}?target_session_attrs=read-write")
    redis = RedisServer(tmp / "redis")
    redis.start()
    behind = [free_port() for _ in range(4)]
    balancer = Balancer.round_robin(tmp / "haproxy", behind,
                                    "send-proxy-v2 check inter 200ms fall 2 rise 1",
                                    admin=True, disabled=frozenset(behind[3:]))
    nodes: list[Relay] = []
    try:
        for i in range(4):
            nodes.append(Relay(tmp / f"node{i}", config=(
                f"[listener:lb]\nendpoint = tcp:{behind[i]}:interface=127.0.0.1\n"
                "tls = starttls\nproxy_protocol = yes\nproxy_from = 127.0.0.1/32\n\n"
                "[delivery]\nenabled = no\n\n"
                "[policy]\nlogin_delay_after = 1000\nlogin_block_after = 1000\n\n"
                f"[cluster]\nredis = {redis.url}\npostgres = {multi}\n"
                f"node_id = node{i}\nnodes = 4\n")))
            config = nodes[-1].config_path
            config.write_text(config.read_text().replace(
                "[server]\n", f"[server]\nshutdown_grace = {GRACE}s\n"))
        first = nodes[0]
        first.admin("account", "set", "default", "--domains", "doe.test")
        first.add_user("ann@doe.test", PASSWORD)
        first.start()
        for node in nodes[1:3]:  # one certificate for the service, as behind a balancer
            shutil.copytree(first.data / "tls", node.data / "tls")
            node.start()
        shutil.copytree(first.data / "tls", nodes[3].data / "tls")
        balancer.start()
        yield balancer, nodes
    finally:
        balancer.stop()
        for node in nodes:
            node.stop()
        redis.stop()
        standby.stop()


def standby_of(primary: pg_server.PostgresServer) -> pg_server.PostgresServer:
    """A hot standby streaming from ``primary`` (pg_basebackup -R), running."""
    standby = pg_server.PostgresServer()
    as_user = standby._as_user()  # root runs the server as another user
    os.chown(standby.dir, as_user.get("user", os.geteuid()), as_user.get("group", os.getegid()))
    subprocess.run([f"{pg_server.bindir()}/pg_basebackup", "-D", str(standby.data), "-R",
                    "-h", "127.0.0.1", "-p", str(primary.port), "-U", "mailrelay",
                    "--checkpoint=fast", "--no-sync"], check=True, capture_output=True, timeout=120,
                   **standby._as_user())
    standby.start_again()
    return standby


def session(balancer: Balancer, node: Relay, user: str = "ann@doe.test") -> smtplib.SMTP:
    """A logged-in session through the balancer (on whichever node it picks)."""
    client = smtplib.SMTP("127.0.0.1", balancer.port, local_hostname="client.test",
                          timeout=30)
    client.ehlo()
    client.starttls(context=node.tls_context())
    client.ehlo()
    client.login(user, PASSWORD)
    return client


def send(client: smtplib.SMTP, subject: str, user: str = "ann@doe.test") -> tuple[int, str]:
    """The reply to the message (MAIL's if refused there, else DATA's) and, when queued,
    the node id its queue id ends with."""
    code, reply = client.mail(user)
    if code == 250:
        assert client.rcpt("bob@example.net")[0] == 250
        code, reply = client.data(message(user, "bob@example.net", subject))
    client.rset()
    text = reply.decode()
    return code, text.rsplit(" ", 1)[-1][-4:] if code == 250 else ""


def node_of(node: Relay) -> str:
    return (node.data / "node_id").read_text().strip()


def queued(nodes: list[Relay], subject: str) -> list[int]:
    """Which nodes hold a message with ``subject`` in their queue."""
    return [i for i, node in enumerate(nodes) for path in node.spool_files("queue")
            if subject.encode() in path.read_bytes()]


def test_a_multi_host_postgres_string_skips_a_host_down_and_a_standby(cluster):
    """Every node (and mailrelay-admin) reached the primary, the third host of
    ``[cluster] postgres`` (without ``target_session_attrs`` they stop at the standby:
    "cannot execute CREATE TABLE in a read-only transaction"); a user made now logs in
    through the balancer on each node."""
    balancer, nodes = cluster
    nodes[1].add_user("new@doe.test", PASSWORD)
    seen = set()
    for attempt in range(6):
        with session(balancer, nodes[0], "new@doe.test") as client:
            code, node = send(client, f"new {attempt}", "new@doe.test")
            assert code == 250
            seen.add(node)
    assert seen == {node_of(n) for n in nodes[:3]}


def test_b_taking_a_node_out(cluster):
    balancer, nodes = cluster
    backend = f"b{balancer.port}"
    # A session on some node, known by the queue id of its first message, and a second
    # one on the same node.
    client = session(balancer, nodes[0])
    code, out_id = send(client, "before disable")
    assert code == 250
    out = next(i for i, n in enumerate(nodes) if node_of(n) == out_id)
    assert queued(nodes, "before disable") == [out]
    stalled = None
    for attempt in range(3):  # round robin over three nodes
        other = session(balancer, nodes[0])
        code, node = send(other, f"second session {attempt}")
        assert code == 250
        if node == out_id:
            stalled = other
            break
        other.close()
    assert stalled is not None

    # Drained in HAProxy: new connections go to the other nodes, the open session goes on.
    assert balancer.runtime(f"disable server {backend}/relay{out}").strip() == ""
    for attempt in range(4):
        with session(balancer, nodes[0]) as other:
            code, node = send(other, f"elsewhere {attempt}")
            assert code == 250 and node != out_id
    assert send(client, "after disable") == (250, out_id)

    # SIGTERM with both sessions in the middle of a message.
    for c, subject in ((client, "ended in the grace"), (stalled, "cut off")):
        assert c.mail("ann@doe.test")[0] == 250
        assert c.rcpt("bob@example.net")[0] == 250
        assert c.docmd("DATA")[0] == 354
        c.send(message("ann@doe.test", "bob@example.net", subject))
    # twistd re-raises SIGTERM once it has shut down: stop() waits for that.
    stopping = threading.Thread(target=nodes[out].stop)
    stopping.start()
    wait_for(lambda: "2 open sessions" in nodes[out].log(), what="the node stopping")
    # One ends its message within the grace: 250, kept, then the 421.
    client.send(b".\r\n")
    code, text = client.getreply()
    assert code == 250 and text.decode().endswith(out_id), text
    code, text = client.getreply()
    assert code == 421 and text.startswith(GOODBYE), text
    client.close()
    # The other does not: the 421 at the grace's end, and its message is in no spool.
    code, text = stalled.getreply()
    assert code == 421 and text.startswith(GOODBYE), text
    stalled.close()
    stopping.join(timeout=30)
    assert not stopping.is_alive()
    assert "Server Shut Down." in nodes[out].log()
    assert queued(nodes, "cut off") == []
    # What it acknowledged stays in its queue (for `queue import`, or its restart).
    assert queued(nodes, "before disable") == [out]
    assert queued(nodes, "after disable") == [out]
    assert queued(nodes, "ended in the grace") == [out]
    # The client sends it again, through the balancer, to another node.
    with session(balancer, nodes[0]) as again:
        code, node = send(again, "cut off")
    assert code == 250 and node != out_id
    assert len(queued(nodes, "cut off")) == 1

    # Enabled again while stopped: HAProxy's check keeps new connections off it.
    balancer.runtime(f"enable server {backend}/relay{out}")
    time.sleep(0.5)  # two failed checks, 200 ms apart, mark it down
    for attempt in range(4):
        with session(balancer, nodes[0]) as other:
            code, node = send(other, f"while down {attempt}")
            assert code == 250 and node != out_id
    nodes[out].start()  # back for the next test
    wait_for(lambda: "UP" in _status(balancer, out), what="the node's server up again")


def _status(balancer: Balancer, index: int) -> str:
    for line in balancer.runtime("show servers state").splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[3] == f"relay{index}":
            return {"0": "STOPPED", "1": "STARTING", "2": "UP", "3": "STOPPING"}.get(
                fields[5], fields[5])
    return ""


def test_c_adding_a_node(cluster):
    """A fourth node, started with the same configuration and enabled in HAProxy, takes
    connections and counts in the same Redis rate limit: RATE messages an hour over all
    the nodes, not per node."""
    balancer, nodes = cluster
    nodes[0].add_user("four@doe.test", PASSWORD, "--rate-limit", str(RATE))
    nodes[3].start()
    balancer.runtime(f"enable server b{balancer.port}/relay3")
    wait_for(lambda: _status(balancer, 3) == "UP", what="the fourth node's server up")
    accepted, refused = [], []
    for attempt in range(RATE + 4):
        with session(balancer, nodes[0], "four@doe.test") as client:
            code, node = send(client, f"four {attempt}", "four@doe.test")
            (accepted if code == 250 else refused).append((code, node))
    assert len(accepted) == RATE
    assert {code for code, _ in refused} == {451}
    assert node_of(nodes[3]) in {node for _, node in accepted}
