"""Two twistd nodes sharing one PostgreSQL (tests/pg_server.py) for their admin logins, API
keys and DKIM keys (and their users): what mailrelay-admin makes on node A is in force on
node B within a second. An API key made on A opens B's API, and closes it once deleted on
A; an admin made on A logs in to B's panel; a DKIM key added on A, then a rotation
activated on A, sign the mail B delivers, checked by dkimpy against the records served by
tests/dns_server.py (the DNS node A looks the new record up on before activating it)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import dns.exception
import dns.resolver
import pg_server
import pytest
from harness import Relay, Sink, free_port
from test_e2e_dkim import Zone, mail, signatures, submit
from test_e2e_features import arrived
from test_e2e_panel import PanelClient

PASSWORD = "correct horse battery"
SOON = 1.0  # seconds: a change on one node is in force on the others by then


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    assert pg_server.installed(), pg_server.NOT_INSTALLED
    tmp = tmp_path_factory.mktemp("pg-access")
    dsn = pg_server.shared_server().create_database()
    (tmp / "dns").mkdir()
    zone = Zone(tmp / "dns")
    sink = None
    relays = []
    try:
        sink = Sink(tmp / "sink")
        for name in ("a", "b"):
            port = free_port()
            relay = Relay(tmp / name, config=(
                f"[delivery]\nport = {sink.port}\nallow_local_mx = yes\nretry_first = 1s\n"
                f"retry_max = 2s\nmx_tls = none\ndns_servers = 127.0.0.1:{zone.port}\n\n"
                f"[routes]\nexample.test = 127.0.0.1:{sink.port}\n\n"
                "[dkim]\ncheck_interval = 0\n\n"  # activated by hand, on node A
                f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                f"public_url = http://127.0.0.1:{port}\n\n"
                f"[cluster]\npostgres = {dsn}\n"))  # fmt: skip
            relay.panel_url = f"http://127.0.0.1:{port}"
            relays.append(relay)
        a, b = relays
        a.admin("account", "set", "default", "--domains", "doe.test")
        a.add_user("mail@doe.test", PASSWORD)
        for relay in relays:
            relay.start()
        yield a, b, sink, zone
    finally:
        for relay in relays:
            relay.stop()
        if sink is not None:
            sink.stop()
        zone.stop()


def api(relay: Relay, key: str, path: str = "/users") -> int:
    request = urllib.request.Request(relay.panel_url + "/api/v1" + path,
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def after_a_second(changed: float) -> None:
    """Wait until SOON after ``changed`` (a monotonic time): the change must be in force."""
    time.sleep(max(0.0, changed + SOON - time.monotonic()))


def test_an_api_key_made_on_one_node_opens_and_closes_the_others_api(nodes):
    a, b, _, _ = nodes
    key = a.admin("apikey", "add", "deploy", "--read-only").stdout.splitlines()[1]
    made = time.monotonic()
    assert api(b, key + "x") == 401
    after_a_second(made)
    assert api(b, key) == 200
    assert api(a, key) == 200
    assert "deploy" in b.admin("apikey", "list").stdout

    a.admin("apikey", "del", "deploy")
    after_a_second(time.monotonic())
    assert api(b, key) == 401


def test_an_admin_made_on_one_node_logs_in_to_the_others_panel(nodes):
    a, b, _, _ = nodes
    a.admin("admin", "add", "alice", "--password-stdin", input="alice-password-1\n")
    after_a_second(time.monotonic())
    PanelClient(b.panel_url).login("alice", "alice-password-1")


def txt_lookup(port: int):
    """dkimpy's dnsfunc, asking tests/dns_server.py on loopback."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


def publish(relay: Relay, zone: Zone, domain: str) -> None:
    """Serve the records ``dkim show`` prints (asked on node B: the keys are shared)."""
    shown = json.loads(relay.admin("dkim", "show", domain, "--json", "--no-dns").stdout)
    zone.publish({k["dns_name"]: "".join(k["dns_strings"]) for k in shown})


def delivered_by(b: Relay, sink: Sink, zone: Zone) -> tuple[list[str], list[bool]]:
    """A message sent through node B: its signatures, each checked by dkimpy."""
    import dkim

    to = f"rcpt-{uuid.uuid4().hex[:8]}@example.test"
    submit(b, "mail@doe.test", "mail@doe.test", to, mail("mail@doe.test", to))
    ((_, data),) = arrived(sink, to)
    d = dkim.DKIM(data)
    sigs = signatures(data)
    return sigs, [d.verify(idx=i, dnsfunc=txt_lookup(zone.port)) for i in range(len(sigs))]


def test_dkim_keys_added_and_activated_on_one_node_sign_the_others_mail(nodes):
    a, b, sink, zone = nodes
    assert delivered_by(b, sink, zone)[0] == []  # no key yet: B's signer has read that

    a.admin("dkim", "add", "doe.test", "--selector", "s1")
    made = time.monotonic()
    publish(b, zone, "doe.test")
    after_a_second(made)
    sigs, verified = delivered_by(b, sink, zone)
    assert len(sigs) == 1 and "s=s1;" in sigs[0] and "d=doe.test" in sigs[0], sigs
    assert verified == [True]

    a.admin("dkim", "rotate", "doe.test", "--selector", "s2")
    publish(b, zone, "doe.test")
    assert "signed with selector 's2'" in a.admin("dkim", "activate", "doe.test").stdout
    after_a_second(time.monotonic())
    sigs, verified = delivered_by(b, sink, zone)
    assert len(sigs) == 1 and "s=s2;" in sigs[0], sigs
    assert verified == [True]
    states = {k["selector"]: k["state"] for k in
              json.loads(b.admin("dkim", "list", "--json", "--no-dns").stdout)}  # fmt: skip
    assert states == {"s1": "retiring", "s2": "active"}
    assert not (b.data / "dkim").exists() and not (a.data / "dkim").exists()

