"""A twistd node whose limits are shared through Redis Sentinel (``[cluster] redis =
sentinel://...``, tests/redis_server.py: a primary, its replica, a sentinel, on
loopback): the primary is killed, the sentinel promotes the replica, and the node, set
to refuse while Redis is down, answers 4.3.0 meanwhile and then accepts mail again on
the new primary within a bounded wait, the rate limit still holding exactly."""

from __future__ import annotations

import smtplib
import time

from harness import Relay, message

from tests.redis_server import NOT_INSTALLED, failover_set, installed, stop_all

PASSWORD = "correct horse battery"
USER = "doe@doe.test"


def attempt(node: Relay) -> tuple[int, bytes]:
    """One message on a new session: (250, b"") or the refusal's code and status."""
    try:
        client = smtplib.SMTP("127.0.0.1", node.smtp_port, local_hostname="client.test",
                              timeout=30)
    except smtplib.SMTPConnectError as e:  # 421 instead of the greeting
        return e.smtp_code, e.smtp_error[:5]
    try:
        client.starttls(context=node.tls_context())
        client.ehlo()
        client.login(USER, PASSWORD)
        client.sendmail(USER, ["someone@example.test"], message(USER, "someone@example.test"))
        return 250, b""
    except (smtplib.SMTPAuthenticationError, smtplib.SMTPSenderRefused) as e:
        return e.smtp_code, e.smtp_error[:5]
    finally:
        client.close()


def test_a_node_keeps_accepting_mail_when_sentinel_promotes_the_replica(tmp_path):
    assert installed(), NOT_INSTALLED
    primary, replica, sentinel = failover_set(tmp_path / "redis", "relay", "redis-pw",
                                              "sentinel-pw")
    node = Relay(tmp_path / "node", config=(
        "[delivery]\nenabled = no\n\n"
        f"[directory]\nfile = {tmp_path / 'users.json'}\n\n"
        f"[cluster]\nredis = sentinel://:redis-pw@127.0.0.1:{sentinel.port}/relay\n"
        "redis_sentinel_password = sentinel-pw\nredis_timeout = 0.5s\nredis_down = refuse\n"))
    try:
        node.admin("account", "set", "default", "--domains", "doe.test")
        node.add_user(USER, PASSWORD, "--rate-limit", "5")
        node.start()
        assert [attempt(node) for _ in range(2)] == [(250, b"")] * 2
        key = f"mailrelay:rate:{USER}:hour"
        deadline = time.monotonic() + 10  # what is not replicated is lost with the primary
        while replica.command("HGETALL", key) != primary.command("HGETALL", key):
            assert time.monotonic() < deadline, "not replicated"
            time.sleep(0.1)
        primary.kill()
        answers = []
        deadline = time.monotonic() + 60
        while not answers or answers[-1] != (250, b""):
            assert time.monotonic() < deadline, f"no mail accepted after the failover: {answers}"
            answers.append(attempt(node))
            time.sleep(0.1)
        assert sentinel.primary_port() == replica.port
        # Meanwhile only "try again later, Redis is down": never a wrong "allowed".
        assert {status for _, status in answers[:-1]} <= {b"4.3.0"}
        # 3 counted so far, on the new primary too: 2 more, then the limit.
        assert [attempt(node)[0] for _ in range(3)] == [250, 250, 451]
        assert len(node.spool_files()) == 5
        log = node.log()
        assert "refusing with 451 4.3.0 until it answers" in log
        assert "Redis answers again" in log
    finally:
        node.stop()
        stop_all((sentinel, replica, primary))
