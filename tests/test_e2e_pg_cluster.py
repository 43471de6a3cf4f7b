"""Three twistd nodes sharing one PostgreSQL (tests/pg_server.py) behind HAProxy with
send-proxy-v2, delivering to a recording SMTP server: a suppression added through node A's
API stops delivery from node B within a second; a bounce of node B's mail that reaches
node C's bounce listener is applied; mail sent round-robin through the balancer
is counted once, and the statistics summed over the nodes equal what was sent, also after
a node (relay and delivery process) is killed with kill -9 with its counts unwritten."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import time
import urllib.request

import pg_server
import pytest
from balancer import Balancer
from bounce_samples import postfix_dsn
from harness import Relay, Sink, free_port, message, wait_for

PASSWORD = "correct horse battery"
CLIENT = "127.0.0.5"  # IP-authenticated as doe.test: the nodes see it through the PROXY header


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    assert pg_server.installed(), pg_server.NOT_INSTALLED
    tmp = tmp_path_factory.mktemp("pgcluster")
    dsn = pg_server.shared_server().create_database()
    sink = Sink(tmp / "sink")
    users, api_port = tmp / "users.json", free_port()
    nodes = []
    balancer = None
    try:
        for i in (1, 2, 3):
            port = free_port()
            panel = (f"[admin]\nendpoint = tcp:{api_port}:interface=127.0.0.1\n"
                     if i == 1 else "")
            # Node 3 writes its statistics only when it stops: killed, it has them all pending.
            flush = "3600s" if i == 3 else "1s"
            bounces = free_port()
            nodes.append(Relay(tmp / f"node{i}", listeners=(
                f"[listener:smtp]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                "tls = starttls\nproxy_protocol = yes\nproxy_from = 127.0.0.1/32\n"), config=(
                f"[directory]\nfile = {users}\n\n[policy]\nip_auth = {CLIENT} = doe.test\n\n"
                "[delivery]\nretry_first = 1s\nretry_max = 2s\nmx_tls = none\n\n"
                f"[routes]\nx.test = 127.0.0.1:{sink.port}\n\n"
                f"[features]\nstats_flush_interval = {flush}\n\n"
                f"[bounces]\nendpoint = tcp:{bounces}:interface=127.0.0.1\n\n"
                f"[cluster]\npostgres = {dsn}\nnode_id = node{i}\n\n{panel}")))
            nodes[-1].smtp_port, nodes[-1].bounce_port = port, bounces
        first = nodes[0]
        first.domain_login("doe.test", PASSWORD)
        first.admin("account", "set", "default", "--bounce-domain", "bounces.doe.test")
        first.api_key = first.admin("apikey", "add", "e2e", "--read-write").stdout.splitlines()[1]
        first.api_url = f"http://127.0.0.1:{api_port}/api/v1"
        for node in nodes:
            node.start()
        ports = [node.smtp_port for node in nodes]
        # One front balances round-robin over the three, one reaches node B only.
        fronts = {free_port(): (ports, "send-proxy-v2"), free_port(): (ports[1:2],
                                                                      "send-proxy-v2")}
        balancer = Balancer(tmp / "haproxy", fronts)
        balancer.start()
        wait_for(lambda: _answers(api_port), what="node A's API")
        everywhere, node_b = fronts
        yield nodes, sink, {"all": everywhere, "b": node_b}
    finally:
        if balancer is not None:
            balancer.stop()
        for node in nodes:
            node.stop()
        sink.stop()


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def send(port: int, recipients: list[str], subject: str) -> str:
    """One message through the balancer's ``port``, on a connection of its own (the
    balancer picks the next node); the queue id."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30,
                      source_address=(CLIENT, 0)) as client:
        client.ehlo()
        client.mail("news@doe.test")
        for rcpt in recipients:
            client.rcpt(rcpt)
        code, text = client.data(message("news@doe.test", recipients[0], subject))
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def subjects(sink: Sink, recipient: str | None = None) -> list[str]:
    return [body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for envelope, body in sink.messages()
            if recipient is None or recipient in envelope["recipients"]]


def api(node: Relay, method: str, path: str, doc: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        node.api_url + path, method=method,
        data=json.dumps(doc).encode() if doc is not None else None,
        headers={"authorization": f"Bearer {node.api_key}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read() or b"null")


def stats(node: Relay) -> dict[str, int]:
    """``mailrelay-admin stats`` of node ``node``: the sums over every node."""
    return json.loads(node.admin("stats", "--json").stdout)["totals"]


def test_a_suppression_added_through_node_as_api_stops_delivery_on_node_b_within_a_second(
        cluster):
    nodes, sink, fronts = cluster
    # Node B's delivery process answers from its copy of the lists in memory.
    wait_for(lambda: "suppression lists loaded" in nodes[1].log(), what="node B's copy")
    send(fronts["b"], ["target@x.test"], "before")
    wait_for(lambda: "before" in subjects(sink, "target@x.test"), what="delivery via node B")
    assert api(nodes[0], "POST", "/suppressions", {"address": "Target@x.test",
                                                    "user": "doe.test"})[0] == 201
    time.sleep(1.0)
    queue_id = send(fronts["b"], ["target@x.test", "control@x.test"], "after")
    wait_for(lambda: "after" in subjects(sink, "control@x.test"), what="the control copy")
    assert "after" not in subjects(sink, "target@x.test")
    wait_for(lambda: f"{queue_id}: target@x.test is suppressed for doe.test" in nodes[1].log(),
             what="node B's log line")


def delivery_process(node: Relay) -> int:
    """The pid of ``node``'s delivery process (the relay's child)."""
    pid = node.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    assert len(children) == 1, children
    return int(children[0])


def test_round_robin_mail_is_counted_once_and_summed_over_nodes_across_a_kill(cluster):
    nodes, sink, fronts = cluster
    delivered_before = len(sink.messages())
    # What the nodes counted so far, once written: the same in two reads a flush apart
    # (nodes 1 and 2 write every second; node 3 has sent nothing yet).
    reads: list[dict] = []
    before = wait_for(lambda: reads.append(stats(nodes[0])) or len(reads) > 1
                      and reads[-1] == reads[-2] and reads[-1], interval=1.5,
                      what="the earlier counts written")
    ids = [send(fronts["all"], ["someone@x.test"], f"rr{n}") for n in range(30)]
    logs = [node.log() for node in nodes]
    assert all(any(i in log for i in ids) for log in logs)  # every node took part
    wait_for(lambda: len(sink.messages()) == delivered_before + 30, what="30 deliveries")
    # Node 3's counts of its 10 are unwritten: kill -9 its delivery process, then itself.
    third = nodes[2]
    os.kill(delivery_process(third), signal.SIGKILL)
    third.kill9()
    assert [n for n in os.listdir(third.data / "stats-journal" / "relay")]  # pending there
    third.start()
    wanted = {"accepted": before["accepted"] + 30, "delivered": before["delivered"] + 30}

    seen = []

    def counted():
        now = stats(nodes[1])  # any node's view
        seen[:] = [{k: now[k] for k in wanted}]
        return seen[0] == wanted

    try:
        wait_for(counted, timeout=30, interval=0.5, what=f"statistics of {wanted}")
    except TimeoutError:
        raise AssertionError(f"counted {seen[0]}, sent {wanted}")
    assert "batch(es) from the journal to write" in third.log()
    for node in nodes:  # every count written: nothing more appears
        node.stop()
        node.start()
    totals = stats(nodes[0])
    assert {k: totals[k] for k in wanted} == wanted
    _, read = api(nodes[0], "GET", "/stats?period=day")  # the API and the panel's charts
    assert {k: read["totals"][k] for k in wanted} == wanted
    assert sum(p["accepted"] for p in read["periods"]) == wanted["accepted"]
    assert len(subjects(sink)) == delivered_before + 30


def test_a_bounce_of_one_nodes_mail_reaching_anothers_listener_is_applied(cluster):
    nodes, sink, fronts = cluster
    send(fronts["b"], ["gone@x.test"], "to bounce")  # sent by node B...
    verp = wait_for(lambda: [e["sender"] for e, _ in sink.messages()
                             if "gone@x.test" in e["recipients"]], what="the VERP copy")[0]
    assert verp.startswith("b+") and verp.endswith("@bounces.doe.test")
    with smtplib.SMTP("127.0.0.1", nodes[2].bounce_port, timeout=30) as client:  # ...to C
        client.ehlo("mx.example.net")
        assert client.mail("")[0] == 250 and client.rcpt(verp)[0] == 250
        code, text = client.data(postfix_dsn(verp, "gone@x.test"))
        assert code == 250, text
    wait_for(lambda: "bounced by" in nodes[2].log(), what="node C applying the bounce")
    listed = json.loads(nodes[0].admin("suppression", "list", "--user", "doe.test",
                                       "--json").stdout)
    assert {e["address"]: e["reason"] for e in listed}.get("gone@x.test") == "hard-bounce"


def test_a_user_deleted_on_one_node_takes_its_shared_list_along_and_keeps_its_counts(cluster):
    nodes, _, _ = cluster
    a, b = nodes[0], nodes[1]
    a.add_user("leaving@doe.test", PASSWORD)
    a.admin("suppression", "add", "x@x.test", "--user", "leaving@doe.test")
    listed = b.admin("suppression", "list", "--user", "leaving@doe.test", "--json").stdout
    assert [e["address"] for e in json.loads(listed)] == ["x@x.test"]  # node B sees it
    out = b.admin("user", "del", "leaving@doe.test").stdout  # deleted through node B
    assert "1 suppressed address(es) removed" in out
    remaining = a.admin("suppression", "list", "--account", "default", "--json").stdout
    assert "x@x.test" not in remaining
