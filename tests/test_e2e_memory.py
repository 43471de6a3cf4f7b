"""Through twistd: thousands of refused sessions leave no memory behind in the relay.

A refusal used to be one module-level exception raised again by every session: its
traceback grew and kept each refused session (and its TLS objects) alive, about 13 KB a
session; a blocked address's AUTH attempts, which need no login, kept 14 KB each. Here
the relay's resident memory after a warm-up is compared with it after thousands more
refused sessions of each kind; a leak of that size would add tens of megabytes.
"""

from __future__ import annotations

import base64
import socket

from harness import Relay

PASSWORD = "correct horse battery"
SESSIONS = 2000  # of each kind, after the warm-up
WARM_UP = 300
ALLOWED_GROWTH = 6 * 2**20  # bytes: allocator noise; the leak was 25-28 MB here


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def session(port: int, source: str, script: bytes, last_reply: bytes) -> bytes:
    """One pipelined session from ``source`` (a loopback address); what the relay
    answered until ``last_reply`` or it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(script)
        answer = b""
        while last_reply not in answer:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_refused_sessions_leave_no_memory_behind(tmp_path):
    relay = Relay(tmp_path, config=(
        "[delivery]\nenabled = no\n"
        # 127.0.0.2 logs in and sends refused data; 127.0.0.3 fails to log in twice and
        # is blocked from then on.
        "[policy]\nlogin_delay_after = 2\nlogin_block_after = 2\n"))
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "tls = starttls\n", "tls = starttls\nplaintext_auth = yes\n", 1))
    relay.domain_login("doe.test", PASSWORD)
    relay.start()
    try:
        good = base64.b64encode(f"\0doe.test\0{PASSWORD}".encode()).decode()
        bare_lf = (f"EHLO c.test\r\nAUTH PLAIN {good}\r\nMAIL FROM:<a@doe.test>\r\n"
                   "RCPT TO:<r@example.net>\r\nDATA\r\n").encode() + (
                   b"From: a@doe.test\r\n\r\nbare\nLF\r\n.\r\nQUIT\r\n")
        bad = base64.b64encode(b"\0doe.test\0wrong").decode()
        blocked = f"EHLO c.test\r\nAUTH PLAIN {bad}\r\nQUIT\r\n".encode()

        for _ in range(2):  # two wrong passwords: 127.0.0.3 is blocked from then on
            assert b"535 5.7.8" in session(relay.smtp_port, "127.0.0.3", blocked, b"221 ")

        def refuse(count: int) -> None:
            for _ in range(count):
                answer = session(relay.smtp_port, "127.0.0.2", bare_lf, b"221 ")
                assert b"550 5.6.0" in answer, answer
                answer = session(relay.smtp_port, "127.0.0.3", blocked, b"221 ")
                assert b"421 4.7.0 too many failed logins" in answer, answer


        refuse(WARM_UP)
        before = rss(relay.process.pid)
        refuse(SESSIONS)
        grown = rss(relay.process.pid) - before
        assert grown < ALLOWED_GROWTH, f"{grown / 2**20:.1f} MB more after {SESSIONS} x 2"
    finally:
        relay.stop()
