"""End to end through twistd: SIGHUP (``systemctl reload``) reads the configuration again.
Limits, policy, routes and the TLS certificate change without dropping a session; a
listener is named as needing a restart; a bad file changes nothing and says why."""

from __future__ import annotations

import signal
import socket
import ssl

from certs import TestCA
from harness import Relay, Sink, message, wait_for
from rawsmtp import Raw, plain

PASSWORD = "correct horse battery"


def relay_with_certificate(tmp_path, config: str = ""):
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("relay.test")
    relay = Relay(tmp_path / "relay", config=(
        f"[tls]\ncertificate = {cert}\nkey = {key}\n[limits]\nmax_recipients = 3\n{config}"))
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.add_user("doe.test", PASSWORD, "--status", "sandboxed")
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    return ca, relay, context


def hangup(relay: Relay, count: int) -> None:
    """SIGHUP, and wait for the relay's answer: its ``count``-th reload line."""
    relay.process.send_signal(signal.SIGHUP)
    wait_for(lambda: relay.log().count("[mailrelay.reload#") >= count, what="the reload line")
    assert relay.process.poll() is None, relay.stderr()


def recipients_accepted(client: Raw, count: int) -> list[int]:
    assert client.cmd(b"MAIL FROM:<a@doe.test>")[0] == 250
    codes = [client.cmd(b"RCPT TO:<r%d@example.net>" % i)[0] for i in range(count)]
    assert client.cmd(b"RSET")[0] == 250
    return codes


def peer_certificate(client: Raw) -> bytes:
    return client.sock.getpeercert(binary_form=True)


def test_a_new_limit_and_a_renewed_certificate_without_dropping_a_session(tmp_path):
    ca, relay, context = relay_with_certificate(tmp_path)
    relay.start()
    try:
        with Raw(relay.smtps_port, context) as open_session:
            assert open_session.cmd(b"EHLO client.test")[0] == 250
            assert open_session.cmd(plain("doe.test", PASSWORD))[0] == 235
            first_cert = peer_certificate(open_session)
            assert recipients_accepted(open_session, 3) == [250, 250, 250]

            ca.issue("relay.test")  # renewed: a new key and certificate at the same paths
            relay.config_path.write_text(
                relay.config_path.read_text().replace("max_recipients = 3",
                                                      "max_recipients = 2"))
            hangup(relay, 1)

            # The session open across the reload keeps working, under the new limit.
            assert open_session.cmd(b"NOOP")[0] == 250
            assert recipients_accepted(open_session, 3) == [250, 250, 452]
            assert open_session.cmd(b"MAIL FROM:<a@doe.test>")[0] == 250
            assert open_session.cmd(b"RCPT TO:<bob@example.net>")[0] == 250
            assert open_session.cmd(b"DATA")[0] == 354
            open_session.send(message("a@doe.test", "bob@example.net") + b".\r\n")
            assert open_session.reply()[0] == 250
            assert peer_certificate(open_session) == first_cert

            # A new handshake, implicit TLS or STARTTLS, presents the renewed certificate.
            with Raw(relay.smtps_port, context) as new_session:
                renewed = peer_certificate(new_session)
                assert renewed != first_cert
                assert renewed == ssl.PEM_cert_to_DER_cert(
                    (tmp_path / "ca" / "relay.test.pem").read_text())
            with relay.smtp(starttls=False) as client:
                client.starttls(context=context)
                assert client.sock.getpeercert(binary_form=True) == renewed
    finally:
        relay.stop()
    log = relay.log()
    assert "reloaded " + str(relay.config_path) + ": [limits] max_recipients; TLS certificate " \
        "CN=relay.test, valid until " in log
    assert "Traceback" not in log


def test_a_bad_file_changes_nothing_and_says_why(tmp_path):
    ca, relay, context = relay_with_certificate(tmp_path)
    relay.start()
    good = relay.config_path.read_text()
    try:
        with Raw(relay.smtps_port, context) as session:
            assert session.cmd(b"EHLO client.test")[0] == 250
            assert session.cmd(plain("doe.test", PASSWORD))[0] == 235
            cert = peer_certificate(session)

            relay.config_path.write_text(good.replace("max_recipients = 3",
                                                      "max_recipients = 1\nrate_per_hour = lots"))
            hangup(relay, 1)
            assert recipients_accepted(session, 4) == [250, 250, 250, 452]  # still 3

            # A certificate that does not match its key: the old one stays in use.
            other = TestCA(tmp_path / "other").issue("relay.test")[1]
            relay.config_path.write_text(good.replace("max_recipients = 3",
                                                      "max_recipients = 1").replace(
                f"key = {tmp_path / 'ca' / 'relay.test.key'}", f"key = {other}"))
            hangup(relay, 2)
            assert recipients_accepted(session, 2) == [250, 250]
            with Raw(relay.smtps_port, context) as new_session:
                assert peer_certificate(new_session) == cert
    finally:
        relay.stop()
    lines = [line for line in relay.log().splitlines() if "[mailrelay.reload#" in line]
    assert len(lines) == 2, lines
    assert lines[0].endswith(f"[mailrelay.reload#error] reload: {relay.config_path}: [limits] "
                             "rate_per_hour: 'lots' is not a whole number; nothing changed")
    assert "[mailrelay.reload#error] reload: " in lines[1]
    assert lines[1].endswith(f"the key does not match the certificate "
                             f"{tmp_path / 'ca' / 'relay.test.pem'}; nothing changed")


def test_a_listener_changed_needs_a_restart_and_the_rest_is_applied(tmp_path):
    ca, relay, context = relay_with_certificate(tmp_path)
    relay.start()
    try:
        with Raw(relay.smtps_port, context) as session:
            assert session.cmd(b"EHLO client.test")[0] == 250
            assert session.cmd(b"MAIL FROM:<a@doe.test>")[0] == 530
        relay.config_path.write_text(
            relay.config_path.read_text()
            .replace("max_recipients = 3", "max_recipients = 1\n[policy]\n"
                     "ip_auth = 127.0.0.1 = doe.test")
            .replace("tls = implicit", "tls = implicit\nplaintext_auth = yes")
            .replace("[admin]\nenabled = no", "[admin]\nenabled = no\nsession_lifetime = 1h"))
        hangup(relay, 3)
        with Raw(relay.smtps_port, context) as session:
            assert session.cmd(b"EHLO client.test")[0] == 250
            assert recipients_accepted(session, 2) == [250, 452]  # logged in by its address
    finally:
        relay.stop()
    lines = [line for line in relay.log().splitlines() if "[mailrelay.reload#" in line]
    assert [line.split("] ", 1)[1] for line in lines[:2]] == [
        "reload: [listener:smtps] changed: takes effect after a restart",
        "reload: [admin] session_lifetime changed: takes effect after a restart",
    ]
    assert ": [limits] max_recipients, [policy] ip_auth; TLS certificate " in lines[2]


def test_routes_change_for_the_delivery_process(tmp_path):
    first, second = Sink(tmp_path / "first"), Sink(tmp_path / "second")
    relay = Relay(tmp_path / "relay", config=(
        f"[delivery]\nallow_local_mx = yes\nmx_tls = none\n"
        f"[routes]\nexample.test = 127.0.0.1:{first.port}\n"))
    relay.admin("account", "set", "default", "--domains", "doe.test")
    relay.add_user("doe.test", PASSWORD)
    relay.start()
    try:
        with relay.smtp(login=("doe.test", PASSWORD)) as client:
            client.sendmail("a@doe.test", ["bob@example.test"],
                            message("a@doe.test", "bob@example.test"))
        first.wait(1)
        relay.config_path.write_text(relay.config_path.read_text().replace(
            f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"))
        hangup(relay, 1)
        wait_for(lambda: "delivery: routes reloaded" in relay.log(),
                 what="the delivery process's reload")
        with relay.smtp(login=("doe.test", PASSWORD)) as client:
            client.sendmail("a@doe.test", ["carol@example.test"],
                            message("a@doe.test", "carol@example.test"))
        assert second.wait(1)[0][0]["recipients"] == ["carol@example.test"]
        assert len(first.messages()) == 1
    finally:
        relay.stop()
        first.stop()
        second.stop()
    assert ": [routes]; TLS certificate " in relay.log()


def test_systemd_is_told_ready_reloading_and_stopping(tmp_path, monkeypatch):
    """Type=notify: the datagrams systemd reads on $NOTIFY_SOCKET (sd_notify(3))."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        relay = Relay(tmp_path / "relay", config="[delivery]\nenabled = no\n")
        relay.start(wait=False)
        try:
            assert systemd.recv(4096) == b"READY=1"
            with relay.smtp(starttls=False) as client:  # ready means serving
                assert client.noop()[0] == 250
            relay.process.send_signal(signal.SIGHUP)
            assert [systemd.recv(4096) for _ in range(2)] == [b"RELOADING=1", b"READY=1"]
            wait_for(lambda: "[mailrelay.reload#info] reloaded " in relay.log(),
                     what="the reload line")
            relay.process.send_signal(signal.SIGTERM)
            assert systemd.recv(4096) == b"STOPPING=1"
        finally:
            relay.stop()
