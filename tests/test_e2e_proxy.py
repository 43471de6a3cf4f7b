"""End to end through the real twistd process behind Debian's HAProxy in TCP mode
(``send-proxy-v2`` and ``send-proxy``): the client's address, not the balancer's, is what
the Received header, the log, the spool and IP authentication see, with STARTTLS and with
implicit TLS; a PROXY header sent straight from outside proxy_from gets nothing; a
listener without proxy_protocol reads a PROXY line as an unknown command."""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import socket

import pytest
from balancer import Balancer
from harness import Relay, free_port, message, wait_for

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    edge, edges = free_port(), free_port()
    behind = "proxy_protocol = yes\nproxy_from = 127.0.0.1/32, ::1\n"
    relay = Relay(tmp / "relay", config=(
        "[delivery]\nenabled = no\n\n[policy]\nip_auth = 127.0.0.5 = doe.test\n\n"
        f"[listener:edge]\nendpoint = tcp:{edge}:interface=127.0.0.1\ntls = starttls\n{behind}\n"
        f"[listener:edges]\nendpoint = tcp:{edges}:interface=127.0.0.1\ntls = implicit\n"
        f"{behind}"))
    relay.domain_login("doe.test", PASSWORD)
    relay.start()
    fronts = {free_port(): ([edge], "send-proxy-v2 check inter 200ms"),
              free_port(): ([edge], "send-proxy"), free_port(): ([edges], "send-proxy-v2")}
    balancer = Balancer(tmp / "haproxy", fronts)
    try:
        balancer.start()
        v2, v1, tls = fronts
        yield relay, {"edge": edge, "v2": v2, "v1": v1, "tls": tls}
    finally:
        balancer.stop()
        relay.stop()


def send(relay: Relay, client: smtplib.SMTP, login: bool = True) -> tuple[dict, bytes]:
    """Send one message; the envelope and the message as the spool keeps them."""
    with client:
        client.ehlo_or_helo_if_needed()
        if login:
            client.login("doe.test", PASSWORD)
        client.mail("a@doe.test")
        client.rcpt("b@example.net")
        code, text = client.data(message("a@doe.test", "b@example.net"))
        assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[-1]
    envelope, _, body = (relay.data / "spool" / "queue" / queue_id).read_bytes().partition(b"\n")
    return json.loads(envelope), body


def received(body: bytes) -> str:
    return str(email.message_from_bytes(body, policy=email.policy.default)["Received"])


def test_through_haproxy_the_client_is_the_client(setup):
    relay, ports = setup

    client = smtplib.SMTP("127.0.0.1", ports["v2"], local_hostname="client.test", timeout=30,
                          source_address=("127.0.0.2", 0))
    client.starttls(context=relay.tls_context())
    envelope, body = send(relay, client)
    assert envelope["client_ip"] == "127.0.0.2"
    assert "([127.0.0.2])" in received(body) and "127.0.0.1" not in received(body)
    assert "with ESMTPSA" in received(body)

    client = smtplib.SMTP_SSL("127.0.0.1", ports["tls"], local_hostname="client.test",
                              context=relay.tls_context(), timeout=30,
                              source_address=("127.0.0.3", 0))
    envelope, body = send(relay, client)
    assert envelope["client_ip"] == "127.0.0.3" and "([127.0.0.3])" in received(body)

    client = smtplib.SMTP("127.0.0.1", ports["v1"], local_hostname="client.test", timeout=30,
                          source_address=("127.0.0.4", 0))
    client.starttls(context=relay.tls_context())
    envelope, body = send(relay, client)
    assert envelope["client_ip"] == "127.0.0.4" and "([127.0.0.4])" in received(body)

    # IP authentication maps the client's address, never the balancer's.
    client = smtplib.SMTP("127.0.0.1", ports["v2"], local_hostname="client.test", timeout=30,
                          source_address=("127.0.0.5", 0))
    envelope, body = send(relay, client, login=False)
    assert envelope["client_ip"] == "127.0.0.5" and envelope["user"] == "doe.test"

    def logged() -> str:
        log = relay.log()
        return all(f"client_ip={ip} " in log for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4",
                                                      "127.0.0.5")) and log

    log = wait_for(logged, what="the accepted lines")
    assert "connection from 127.0.0.2 tls=False" in log
    assert "connection from 127.0.0.3 tls=True" in log
    assert "auth=ip client_ip=127.0.0.5 " in log
    assert "127.0.0.2 disconnected after 1 messages" in log
    for line in log.splitlines():
        if "accepted " in line:
            assert "client_ip=127.0.0.1 " not in line, line

    # HAProxy's health checks (every 200 ms on the first backend) send a LOCAL header:
    # short sessions from the balancer's own address (one more than the harness's probe).
    wait_for(lambda: relay.log().count("connection from 127.0.0.1 tls=False") >= 3,
             what="health checks")
    assert " closed: " not in relay.log()


def test_a_spoofed_header_from_outside_proxy_from_gets_nothing(setup):
    relay, ports = setup
    queued = len(relay.spool_files())
    with socket.socket() as sock:
        sock.settimeout(30)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", ports["edge"]))
        sock.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1234 25\r\nEHLO x\r\n"
                     b"MAIL FROM:<a@doe.test>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                     b"From: <a@doe.test>\r\n\r\nspoofed\r\n.\r\nQUIT\r\n")
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    assert got == b""
    wait_for(lambda: "[listener:edge] connection from 127.0.0.2 closed: not in proxy_from"
             in relay.log(), what="the refusal's line")
    assert "6.6.6.6" not in relay.log()
    assert len(relay.spool_files()) == queued


def test_without_proxy_protocol_a_proxy_line_is_an_unknown_command(setup):
    relay, _ = setup
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=30) as sock:
        lines = sock.makefile("rb")
        assert lines.readline().startswith(b"220 relay.test")
        sock.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1234 25\r\n")
        assert lines.readline() == b"500 5.5.1 Command unrecognized\r\n"
        sock.sendall(b"HELO client.test\r\n")
        assert lines.readline().startswith(b"250 ")
    assert "6.6.6.6" not in relay.log()
