"""End to end through the real twistd process: ``mailrelay-admin explain`` says what a real
session answers. Each case of the catalogue runs both ways, explain and an smtplib
session, and the reply lines (code, enhanced status and text) must be the same."""

from __future__ import annotations

import base64
import json
import re
import smtplib

import pytest
from harness import Relay

PASSWORD = "correct horse battery"
DOMAINS = "doe.test;app.test;blocked.test;sandbox.test;limited.test"
MAX_SIZE = 100000
MAX_RECIPIENTS = 3


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Relay(tmp_path_factory.mktemp("explain"), config=(
        "[delivery]\nenabled = no\n\n"
        "[policy]\nlogin_delay_after = 2\nlogin_block_after = 2\n\n"
        f"[limits]\nmax_message_size = {MAX_SIZE}\nmax_recipients = {MAX_RECIPIENTS}\n"))
    r.admin("account", "set", "default", "--domains", DOMAINS)
    r.add_user("doe.test", PASSWORD)
    r.add_user("alice@doe.test", PASSWORD)
    r.add_user("crm", PASSWORD, "--domains", "app.test", "--addresses", "news@doe.test")
    r.add_user("blocked.test", PASSWORD, "--status", "blocked")
    r.add_user("sandbox.test", PASSWORD, "--status", "sandboxed")
    r.add_user("limited.test", PASSWORD, "--rate-limit", "1")
    yield r
    r.stop()


def explain(relay, user, sender, *options):
    result = relay.admin("explain", user, "--sender", sender, "--json", *options, check=False)
    assert result.returncode in (0, 3), result.stderr
    doc = json.loads(result.stdout)
    assert result.returncode == (0 if doc["accepted"] else 3)
    return doc


def connect(relay, ip: str = "127.0.0.1"):
    client = smtplib.SMTP("127.0.0.1", relay.smtp_port, local_hostname="client.test",
                          timeout=30, source_address=(ip, 0))
    client.ehlo()
    client.starttls(context=relay.tls_context())
    client.ehlo()
    return client


def session(relay, user, sender, from_header=None, recipients=1, size=None,
            ip="127.0.0.1") -> list[str]:
    """The reply lines of one submission from ``ip``, up to the first refusal."""
    client = connect(relay, ip)
    lines = []

    def step(code, text):
        lines.append(f"{code} {text.decode()}")
        return code < 400

    try:
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        if not step(*client.docmd("AUTH", "PLAIN " + token)):
            return lines
        mail = f"FROM:<{sender}>" + (f" SIZE={size}" if size is not None else "")
        if not step(*client.docmd("MAIL", mail)):
            return lines
        for n in range(recipients):
            if not step(*client.docmd("RCPT", f"TO:<r{n}@example.net>")):
                return lines
        if not step(*client.docmd("DATA")):
            return lines
        client.send(f"From: {from_header or sender}\r\nSubject: explain\r\n\r\nhi\r\n.\r\n"
                    .encode())
        step(*client.getreply())
        return lines
    finally:
        client.close()


def _same(line: str) -> str:
    """What may differ between two asks: the queue id, the seconds left of a limit."""
    line = re.sub(r"queued as (<queue id>|\S+)", "queued as <queue id>", line)
    return re.sub(r"try again in \d+ seconds", "try again in N seconds", line)


CATALOGUE = [
    ("domain login, its domain", "doe.test", "a@doe.test", {}),
    ("domain login, another domain", "doe.test", "a@other.test", {}),
    ("domain login, an authorized domain not its own", "doe.test", "a@app.test", {}),
    ("address login, its address", "alice@doe.test", "alice@doe.test", {}),
    ("address login, another address", "alice@doe.test", "bob@doe.test", {}),
    ("named login, listed address", "crm", "news@doe.test", {}),
    ("named login, listed domain", "crm", "x@app.test", {}),
    ("named login, unlisted", "crm", "y@doe.test", {}),
    ("blocked user", "blocked.test", "a@blocked.test", {}),
    ("sandboxed user", "sandbox.test", "a@sandbox.test", {}),
    ("From: header mismatch", "doe.test", "a@doe.test", {"from_header": "x@other.test"}),
    ("From: header of another allowed address", "crm", "news@doe.test",
     {"from_header": "z@app.test"}),
    ("SIZE over the limit", "doe.test", "a@doe.test", {"size": MAX_SIZE + 1}),
    ("SIZE within the limit", "doe.test", "a@doe.test", {"size": MAX_SIZE}),
    ("too many recipients", "doe.test", "a@doe.test", {"recipients": MAX_RECIPIENTS + 1}),
    ("as many recipients as allowed", "doe.test", "a@doe.test",
     {"recipients": MAX_RECIPIENTS}),
]


def _options(case: dict) -> list[str]:
    out = []
    if "from_header" in case:
        out += ["--from-header", case["from_header"]]
    if "size" in case:
        out += ["--size", str(case["size"])]
    if "recipients" in case:
        out += ["--recipients", str(case["recipients"])]
    return out


def test_explain_without_relay_says_limit_state_unknown(relay):
    assert relay.process is None
    doc = explain(relay, "doe.test", "a@doe.test")
    assert doc["limits"] == "relay not running: limit state unknown"
    assert doc["accepted"]
    text = relay.admin("explain", "doe.test", "--sender", "a@doe.test").stdout
    assert "relay not running: limit state unknown" in text
    assert "scope entry *@doe.test of user doe.test" in text


def test_explain_unknown_user_is_a_mistake(relay):
    result = relay.admin("explain", "nobody.test", "--sender", "a@nobody.test", check=False)
    assert result.returncode == 1
    assert "unknown user 'nobody.test'" in result.stderr


def running(relay) -> None:
    """The relay started (the first tests ask explain while it is not)."""
    if relay.process is None:
        relay.start()


def test_explain_agrees_with_a_real_session(relay):
    running(relay)
    disagree = []
    for name, user, sender, case in CATALOGUE:
        doc = explain(relay, user, sender, *_options(case))
        assert isinstance(doc["limits"], dict), name  # the running relay answered
        said = [_same(s["reply"]) for s in doc["steps"]]
        seen = [_same(line) for line in session(relay, user, sender, **case)]
        if said != seen:
            disagree.append((name, said, seen))
    assert not disagree, "\n".join(map(str, disagree))


def test_explain_reports_the_rate_limit_of_the_running_relay(relay):
    running(relay)
    assert session(relay, "limited.test", "a@limited.test")[-1].startswith("250 2.0.0")
    doc = explain(relay, "limited.test", "a@limited.test")
    assert doc["limits"]["used_hour"] == 1
    assert not doc["accepted"]
    assert "rate limit of user limited.test (1 per hour)" in doc["steps"][-1]["rule"]
    said = [_same(s["reply"]) for s in doc["steps"]]
    assert said == [_same(line) for line in session(relay, "limited.test", "a@limited.test")]
    assert said[-1].startswith("451 4.7.1")
    # Asking counted nothing: the relay still holds one message against the limit.
    assert explain(relay, "limited.test", "a@limited.test")["limits"]["used_hour"] == 1


def test_explain_reports_an_address_blocked_after_failed_logins(relay):
    running(relay)
    blocked = "127.0.0.3"
    for _ in range(2):  # login_block_after = 2
        client = connect(relay, blocked)
        token = base64.b64encode(b"\0doe.test\0wrong password").decode()
        assert client.docmd("AUTH", "PLAIN " + token)[0] == 535
        client.close()
    doc = explain(relay, "doe.test", "a@doe.test", "--ip", blocked)
    assert not doc["accepted"]
    assert doc["steps"][-1]["rule"] == f"client address {blocked} blocked after failed logins"
    said = [s["reply"] for s in doc["steps"]]
    assert said == session(relay, "doe.test", "a@doe.test", ip=blocked)
    assert said == ["421 4.7.0 too many failed logins from your address, try again later"]
    # Another address of the same user is not blocked.
    assert explain(relay, "doe.test", "a@doe.test", "--ip", "127.0.0.4")["accepted"]
