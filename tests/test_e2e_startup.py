"""Starting twistd: embedded defaults, bad configuration and busy ports give one clear line."""

from __future__ import annotations

import socket

from harness import Relay, run_twistd


def test_bad_setting_stops_startup_with_one_line(tmp_path):
    result = run_twistd(tmp_path, "[limits]\nmax_recipients = many\n")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines == [f"mailrelay: {tmp_path / 'mailrelay.ini'}: [limits] max_recipients: "
                     "'many' is not a whole number"]


def test_unknown_section_and_key_are_named(tmp_path):
    result = run_twistd(tmp_path, "[limitz]\nx = 1\n")
    assert result.returncode != 0 and "[limitz]" in result.stderr and "unknown section" in (
        result.stderr)
    result = run_twistd(tmp_path, "[limits]\nmax_recipient = 5\n")
    assert "[limits] max_recipient: unknown setting" in result.stderr


def test_missing_config_file(tmp_path):
    result = run_twistd(tmp_path, config_path=tmp_path / "nope.ini")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"mailrelay: {tmp_path / 'nope.ini'}: cannot read: No such file or directory"]


def test_busy_port_stops_startup_with_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = run_twistd(
            tmp_path,
            f"[server]\ndata_dir = {tmp_path}/data\n[delivery]\nenabled = no\n"
            f"[listener:smtp]\nendpoint = tcp:{port}:interface=127.0.0.1\n",
        )
    finally:
        busy.close()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mailrelay: [listener:smtp] endpoint tcp:{port}:interface=127.0.0.1: cannot listen: "
        "Address already in use"]


def test_self_signed_certificate_made_on_first_start_and_kept(tmp_path):
    relay = Relay(tmp_path, config="[delivery]\nenabled = no\n")
    relay.start()
    cert = relay.data / "tls" / "cert.pem"
    key = relay.data / "tls" / "key.pem"
    first = cert.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    with relay.smtp() as client:  # STARTTLS verified against that certificate
        assert client.has_extn("auth")
    relay.stop()
    relay.start()
    assert cert.read_bytes() == first
    relay.stop()


def test_configured_certificate_from_a_ca(tmp_path):
    from certs import TestCA

    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("relay.test")
    relay = Relay(tmp_path / "relay",
                  config=f"[tls]\ncertificate = {cert}\nkey = {key}\n[delivery]\nenabled = no\n")
    relay.start()
    try:
        import smtplib
        import ssl

        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        with smtplib.SMTP_SSL("127.0.0.1", relay.smtps_port, context=ctx, timeout=30) as c:
            assert c.ehlo()[0] == 250
        assert not (relay.data / "tls" / "cert.pem").exists()
    finally:
        relay.stop()
