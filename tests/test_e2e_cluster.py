"""Three twistd nodes sharing one redis-server (tests/redis_server.py) and one user file,
each with its own data_dir, behind HAProxy (round robin, send-proxy-v2, to a listener of
each node with proxy_protocol): a rate limit holds exactly for mail sent round-robin
through the balancer; password guessing spread over the nodes through it is blocked at
the global threshold, per client address as the PROXY header names it; a user's
connections are counted over all of them and a killed node's stop counting once their
leases lapse; with Redis killed, the nodes set to refuse answer 451 4.3.0 (421 4.3.0
instead of a greeting) and the node set to local counts its share, and all are back to
shared counting when Redis returns."""

from __future__ import annotations

import base64
import shutil
import smtplib

import pytest
from balancer import Balancer
from harness import Relay, free_port, message, wait_for
from test_e2e_quota import queued_warnings

from tests.redis_server import NOT_INSTALLED, RedisServer, installed

PASSWORD = "correct horse battery"
LEASE = 3  # [cluster] lease_time, seconds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    assert installed(), NOT_INSTALLED
    tmp = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(tmp / "redis")
    redis.start()
    users = tmp / "users.json"
    nodes, behind = [], [free_port() for _ in range(3)]
    balancer = Balancer.round_robin(tmp / "haproxy", behind)
    try:
        for i, down in enumerate(("refuse", "refuse", "local"), 1):
            nodes.append(Relay(tmp / f"node{i}", config=(
                f"[listener:lb]\nendpoint = tcp:{behind[i - 1]}:interface=127.0.0.1\n"
                "tls = starttls\nproxy_protocol = yes\nproxy_from = 127.0.0.1/32\n\n"
                "[delivery]\nenabled = no\n\n"
                f"[directory]\nfile = {users}\n\n"
                "[policy]\nlogin_delay_after = 6\nlogin_block_after = 6\n\n"
                f"[cluster]\nredis = {redis.url}\nnode_id = node{i}\nnodes = 3\n"
                f"lease_time = {LEASE}s\nredis_down = {down}\nredis_timeout = 0.5s\n")))
        first = nodes[0]
        first.admin("account", "set", "default", "--domains", "doe.test")
        first.add_user("rate@doe.test", PASSWORD, "--rate-limit", "100")
        first.add_user("conn@doe.test", PASSWORD, "--max-connections", "2")
        first.add_user("local@doe.test", PASSWORD, "--rate-limit", "6")
        first.admin("account", "add", "acme", "--domains", "acme.test", "--notify",
                    "it@acme.test")
        first.add_user("quota@acme.test", PASSWORD, "--account", "acme", "--quota-day", "10")
        nodes[0].start()
        for node in nodes[1:]:  # one certificate for the service, as behind a balancer
            shutil.copytree(nodes[0].data / "tls", node.data / "tls")
            node.start()
        balancer.start()
        for node in nodes:
            node.balancer = balancer.port
        yield redis, nodes
    finally:
        balancer.stop()
        for node in nodes:
            node.stop()
        redis.stop()


def login(node: Relay, user: str, source: str = "127.0.0.1",
          port: int | None = None) -> smtplib.SMTP:  # fmt: skip
    """A logged-in session on ``node``, or through the balancer on ``port``."""
    client = smtplib.SMTP("127.0.0.1", port or node.smtp_port, local_hostname="client.test",
                          timeout=30, source_address=(source, 0))
    client.ehlo()
    client.starttls(context=node.tls_context())
    client.ehlo()
    client.login(user, PASSWORD)
    return client


def auth_plain(node: Relay, user: str, password: str, source: str, port: int) -> int:
    """One AUTH PLAIN on a new connection to ``port``; its reply code."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                          timeout=30, source_address=(source, 0))
    client.starttls(context=node.tls_context())
    client.ehlo()
    code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(
        f"\0{user}\0{password}".encode()).decode())
    client.close()
    return code


def send(client: smtplib.SMTP, sender: str) -> int:
    """One message; the reply code of its MAIL (250 when the message was accepted)."""
    try:
        client.sendmail(sender, ["someone@example.test"], message(sender, "someone@example.test"))
        return 250
    except smtplib.SMTPSenderRefused as e:
        return e.smtp_code


def round_robin(nodes: list[Relay], user: str, count: int) -> list[int]:
    """``count`` messages of ``user`` over three connections through the balancer (one to
    each node, in turn); their MAIL reply codes."""
    clients = [login(nodes[0], user, port=nodes[0].balancer) for _ in nodes]
    codes = [send(clients[i % len(nodes)], user) for i in range(count)]
    for client in clients:
        client.quit()
    return codes


def test_a_rate_limit_holds_exactly_for_mail_sent_round_robin_through_the_nodes(cluster):
    _, nodes = cluster
    codes = round_robin(nodes, "rate@doe.test", 300)
    assert codes.count(250) == 100
    assert set(codes) == {250, 451}
    assert sum(len(node.spool_files()) for node in nodes) == 100
    assert all(node.spool_files() for node in nodes)  # every node took part


def test_a_quota_holds_across_the_nodes_and_each_warning_is_sent_once(cluster):
    _, nodes = cluster
    assert round_robin(nodes, "quota@acme.test", 15) == [250] * 10 + [451] * 5

    def warnings():
        return sorted(w for node in nodes for w in queued_warnings(node, "it@acme.test"))

    wait_for(lambda: len(warnings()) >= 3, timeout=10, what="three quota warnings")
    assert warnings() == ["Daily quota of 10 messages of user quota@acme.test at 80%",
                          "Daily quota of 10 messages of user quota@acme.test at 90%",
                          "Daily quota of 10 messages of user quota@acme.test reached"]


def test_guessing_spread_over_the_nodes_is_blocked_at_the_global_threshold(cluster):
    _, nodes = cluster
    for _ in range(6):  # one attempt per connection (three failures close one), each
        # through the balancer to the next node, which knows the client from the header
        assert auth_plain(nodes[0], "rate@doe.test", "wrong", "127.0.0.7",
                          nodes[0].balancer) == 535
    # Every node saw some of the attempts, each from the client's own address.
    assert all("authentication failed for rate@doe.test from 127.0.0.7" in node.log()
               for node in nodes)
    for node in nodes:  # blocked everywhere, whatever the password
        with pytest.raises((smtplib.SMTPAuthenticationError,
                            smtplib.SMTPServerDisconnected)) as refused:
            login(node, "rate@doe.test", source="127.0.0.7")
        assert getattr(refused.value, "smtp_code", 421) == 421
    assert "blocked ip=127.0.0.7" in "".join(node.log() for node in nodes)
    login(nodes[0], "rate@doe.test", source="127.0.0.8").quit()  # another address is not


def test_connections_per_user_hold_across_nodes_and_a_killed_nodes_lapse(cluster):
    _, nodes = cluster
    held = [login(nodes[0], "conn@doe.test"), login(nodes[1], "conn@doe.test")]
    with pytest.raises((smtplib.SMTPAuthenticationError,
                        smtplib.SMTPServerDisconnected)) as refused:
        login(nodes[2], "conn@doe.test")
    assert getattr(refused.value, "smtp_code", 421) == 421
    nodes[0].kill9()  # its lease is never dropped, nor renewed
    try:
        third = wait_for(lambda: _try_login(nodes[2], "conn@doe.test"), timeout=LEASE * 4,
                         interval=0.5, what="the killed node's lease to lapse")
        third.quit()
    finally:
        held[1].quit()
        nodes[0].start()


def _try_login(node: Relay, user: str):
    try:
        return login(node, user)
    except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected):
        return None


def test_redis_killed_refuses_or_counts_the_share_and_recovers(cluster):
    redis, nodes = cluster
    open_client = login(nodes[0], "local@doe.test")
    local_client = login(nodes[2], "local@doe.test")
    redis.process.kill()
    redis.process.wait(timeout=10)
    try:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            open_client.sendmail("local@doe.test", ["someone@example.test"], b"Subject: x\r\n")
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.3.0")
        with pytest.raises(smtplib.SMTPConnectError) as greeting:
            smtplib.SMTP("127.0.0.1", nodes[1].smtp_port, timeout=30)
        assert greeting.value.smtp_code == 421 and b"4.3.0" in greeting.value.smtp_error
        # The local node counts on its own: 6 an hour over 3 nodes is 2 here.
        assert [send(local_client, "local@doe.test") for _ in range(3)] == [250, 250, 451]
    finally:
        redis.start()
    recovered = wait_for(lambda: send(open_client, "local@doe.test") == 250, timeout=15,
                         interval=0.2, what="shared counting again")
    assert recovered
    assert "Redis unreachable" in nodes[1].log()  # refused a greeting
    assert "refusing with 451 4.3.0 until it answers" in nodes[0].log()
    assert "Redis answers again" in nodes[0].log()
    assert "each limit counted on this node alone, at 1/3 of it" in nodes[2].log()
    open_client.quit()
    local_client.quit()


def test_a_node_reaches_redis_over_tls_and_refuses_one_it_cannot_verify(tmp_path):
    """``rediss://`` with AUTH inside TLS: the limit is counted in that Redis; a node
    whose CA file does not vouch for Redis's certificate refuses (421 4.3.0 instead of
    the greeting) and says why."""
    from harness import free_port

    from tests.certs import TestCA

    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", name="another CA")
    cert, key = ca.issue("redis.test")
    redis = RedisServer(tmp_path / "redis", password="tls:pw", tls_port=free_port(),
                        tls=(cert, key, ca.cert_path))
    redis.start()
    users = tmp_path / "users.json"
    nodes = [Relay(tmp_path / f"node{i}", config=(
        "[delivery]\nenabled = no\n\n"
        f"[directory]\nfile = {users}\n\n"
        f"[cluster]\nredis = rediss://127.0.0.1:{redis.tls_port}/0\n"
        f"redis_password = tls:pw\nredis_ca_file = {ca_file}\nredis_timeout = 0.5s\n"))
        for i, ca_file in enumerate((ca.cert_path, other.cert_path))]
    try:
        nodes[0].admin("account", "set", "default", "--domains", "doe.test")
        nodes[0].add_user("tls@doe.test", PASSWORD, "--rate-limit", "1")
        for node in nodes:
            node.start()
        client = login(nodes[0], "tls@doe.test")
        assert [send(client, "tls@doe.test") for _ in range(2)] == [250, 451]
        client.quit()
        assert redis.command("HGET", "mailrelay:rate:tls@doe.test:hour", "t") == "1"
        with pytest.raises(smtplib.SMTPConnectError) as greeting:
            smtplib.SMTP("127.0.0.1", nodes[1].smtp_port, timeout=30)
        assert greeting.value.smtp_code == 421 and b"4.3.0" in greeting.value.smtp_error
        assert "TLS: certificate verify failed" in nodes[1].log()
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
