"""End to end through the real twistd process: a user's expiry, its allow-list of source
networks, its last login as `user show --json` reports it, and a dormant user disabled."""

from __future__ import annotations

import json
import smtplib

import pytest
from harness import Relay, wait_for

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    # Every user here goes dormant after 8 s without a login: a blocked user still logs in
    # (its mail is refused), which is all the other tests look at.
    r = Relay(tmp_path_factory.mktemp("relay"),
              config="[delivery]\nenabled = no\n[directory]\nlogin_cache_ttl = 0\n"
                     "[policy]\ndormant_after = 8s\n")
    r.admin("account", "set", "default", "--domains", "doe.test;old.test")
    r.admin("account", "add", "quiet", "--domains", "quiet.test", "--notify", "ops@quiet.test")
    r.add_user("quiet.test", PASSWORD, "--account", "quiet")
    r.add_user("doe.test", PASSWORD, "--allow-from", "127.0.0.2")
    r.add_user("old.test", PASSWORD, "--expires", "2020-01-31")
    r.start()
    yield r
    r.stop()


def login_from(relay, source: str, username: str):
    """AUTH from the loopback address ``source``: (code, text) of the reply."""
    client = smtplib.SMTP("127.0.0.1", relay.smtp_port, local_hostname="client.test",
                          timeout=30, source_address=(source, 0))
    try:
        client.ehlo()
        client.starttls(context=relay.tls_context())
        client.ehlo()
        try:
            return client.login(username, PASSWORD)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error
    finally:
        client.close()


def show(relay, username: str) -> dict:
    return json.loads(relay.admin("user", "show", username, "--json").stdout)


def test_allow_from_admits_its_network_and_refuses_others_like_a_wrong_password(relay):
    code, _ = login_from(relay, "127.0.0.2", "doe.test")
    assert code == 235
    code, text = login_from(relay, "127.0.0.3", "doe.test")
    assert code == 535 and b"5.7.8" in text
    wait_for(lambda: "authentication failed for doe.test from 127.0.0.3 (not from an allowed "
             "network)" in relay.log(), what="the refusal in the log")
    # A failure of that address for the password-guessing defence, not of the user's own.
    assert "login failed: ip=127.0.0.3 user=doe.test failures=1" in relay.log()
    assert "ip=127.0.0.2 user=doe.test failures" not in relay.log()
    assert show(relay, "doe.test")["allow_from"] == "127.0.0.2/32"


def test_expired_user_refused_like_a_wrong_password(relay):
    code, text = login_from(relay, "127.0.0.2", "old.test")
    assert code == 535 and b"5.7.8" in text
    wait_for(lambda: "authentication failed for old.test from 127.0.0.2 (expired)"
             in relay.log(), what="the refusal in the log")
    assert show(relay, "old.test")["expires"] == "2020-02-01T00:00:00Z"
    relay.admin("user", "set", "old.test", "--no-expires")
    assert login_from(relay, "127.0.0.3", "old.test")[0] == 235


def test_last_login_shown(relay):
    assert login_from(relay, "127.0.0.2", "doe.test")[0] == 235
    wait_for(lambda: show(relay, "doe.test")["last_login_ip"] == "127.0.0.2",
             timeout=30, interval=0.5, what="the last login recorded")
    assert show(relay, "doe.test")["last_login"] > 0
    listed = relay.admin("user", "list").stdout
    assert "from 127.0.0.2" in listed


def test_dormant_user_disabled_once_with_a_notice(relay):
    wait_for(lambda: show(relay, "quiet.test")["status"] == "blocked", timeout=60,
             interval=0.5, what="quiet.test disabled")
    wait_for(lambda: "user quiet.test disabled (status blocked): no login for" in relay.log(),
             what="the log line")
    notices = [p.read_bytes() for p in relay.spool_files()
               if json.loads(p.read_bytes().partition(b"\n")[0])["recipients"]
               == ["ops@quiet.test"]]
    assert len(notices) == 1
    assert b"Subject: SMTP login quiet.test disabled" in notices[0]
    assert b"last login: never" in notices[0]
    # Set back to allowed, it has a new dormant_after to log in; meanwhile no second notice.
    relay.admin("user", "set", "quiet.test", "--status", "allowed")
    assert login_from(relay, "127.0.0.2", "quiet.test")[0] == 235
    assert relay.log().count("user quiet.test disabled") == 1
