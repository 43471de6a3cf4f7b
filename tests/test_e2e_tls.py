"""End to end through the real twistd process: ``openssl s_client`` offering ALPN on both
SMTP listener kinds and the panel's HTTPS listener, and the TLS 1.2 cipher list."""

from __future__ import annotations

import socket
import subprocess

from harness import Relay, free_port, wait_for


def s_client(relay: Relay, port: int, *args: str, send: str = "") -> str:
    """Handshake with ``openssl s_client``, send ``send`` (lines end in CRLF) and read until
    the server closes; everything it printed."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile",
           str(relay.data / "tls" / "cert.pem"), "-verify_return_error",
           "-crlf", "-ign_eof", "-nocommands", *args]
    done = subprocess.run(cmd, input=send.encode(), capture_output=True, timeout=30)
    return (done.stdout + done.stderr).decode(errors="replace")


def test_alpn_offers_and_aead_ciphers_against_twistd(tmp_path):
    panel = free_port()
    relay = Relay(tmp_path, config=(
        f"[admin]\nendpoint = tcp:{panel}:interface=127.0.0.1\ntls = yes\n\n"
        "[delivery]\nenabled = no\n"))  # fmt: skip
    relay.start()
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", panel), timeout=1).close()
                 or True, what="the panel")
        smtp = "EHLO client.test\nQUIT\n"
        for alpn in ("smtp", "h2,http/1.1"):
            for port, args in ((relay.smtp_port, ("-starttls", "smtp")),
                               (relay.smtps_port, ())):
                out = s_client(relay, port, *args, "-alpn", alpn, send=smtp)
                assert "No ALPN negotiated" in out, out
                assert "250 AUTH PLAIN LOGIN" in out and "221 2.0.0" in out, out

        page = "GET /login HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n\n"
        out = s_client(relay, panel, "-alpn", "h2,http/1.1", send=page)
        assert "ALPN protocol: http/1.1" in out and "HTTP/1.1 200 OK" in out, out
        out = s_client(relay, panel, "-alpn", "h2", send=page)
        assert "No ALPN negotiated" in out and "HTTP/1.1 200 OK" in out, out

        # TLS 1.2: AEAD suites only (the self-signed certificate is ECDSA); TLS 1.3 as ever.
        out = s_client(relay, relay.smtps_port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA",
                       send=smtp)
        assert "alert handshake failure" in out and "221 2.0.0" not in out, out
        out = s_client(relay, relay.smtps_port, "-tls1_2", "-cipher",
                       "ECDHE-ECDSA-AES128-GCM-SHA256", send=smtp)
        assert "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in out and "221 2.0.0" in out, out
        out = s_client(relay, relay.smtps_port, "-tls1_3", send=smtp)
        assert "New, TLSv1.3" in out and "221 2.0.0" in out, out

        wait_for(lambda: "TLS handshake with 127.0.0.1 failed: no shared cipher" in relay.log(),
                 what="the failed handshake's log line")
    finally:
        relay.stop()
