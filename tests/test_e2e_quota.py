"""End to end through the real twistd process: a daily quota with smtplib. The warnings
are queued to the account's notification address at exactly the 8th, 9th and 10th message
of 10, the 11th gets 451 4.7.1, ``mailrelay-admin explain`` shows the count and the same
refusal, and a restart keeps the count. Period rollover is tested with a Clock in
tests/test_policy_quota.py (the real one would take a day)."""

from __future__ import annotations

import email
import json
import time

import pytest
from harness import Relay, message, wait_for

PASSWORD = "correct horse battery"
NOTIFY = "it@acme.test"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Relay(tmp_path_factory.mktemp("quota"), config="[delivery]\nenabled = no\n")
    r.admin("account", "add", "acme", "--domains", "acme.test", "--notify", NOTIFY)
    r.add_user("acme.test", PASSWORD, "--account", "acme", "--quota-day", "10")
    r.start()
    yield r
    r.stop()


def queued_warnings(relay, to: str = NOTIFY) -> list[str]:
    """The Subject of every message queued to ``to``, oldest first."""
    found = []
    for path in relay.spool_files("queue"):
        try:
            head, _, body = path.read_bytes().partition(b"\n")
        except OSError:
            continue
        if json.loads(head)["recipients"] == [to]:
            found.append((path.name, email.message_from_bytes(body)["Subject"]))
    return [subject for _, subject in sorted(found)]  # queue ids sort by time



def send(client, n: int) -> tuple[int, bytes]:
    code, text = client.docmd("MAIL", "FROM:<app@acme.test>")
    if code != 250:
        client.rset()
        return code, text
    for i in range(3):  # recipients do not multiply a message
        assert client.docmd("RCPT", f"TO:<r{i}@example.net>")[0] == 250
    return client.data(message("app@acme.test", "r0@example.net", f"message {n}"))


def test_warnings_at_80_90_100_percent_then_451_and_the_count_survives_a_restart(relay):
    client = relay.smtp(login=("acme.test", PASSWORD))
    seen = {}
    for n in range(1, 11):
        code, text = send(client, n)
        assert code == 250, text
        if n in (8, 9, 10):  # queued once the notification is durable, shortly after
            wait_for(lambda n=n: len(queued_warnings(relay)) >= n - 7, timeout=10,
                     what=f"the warning of message {n}")
        seen[n] = len(queued_warnings(relay))
    assert seen == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0, 8: 1, 9: 2, 10: 3}
    assert queued_warnings(relay) == ["Daily quota of 10 messages of user acme.test at 80%",
                               "Daily quota of 10 messages of user acme.test at 90%",
                               "Daily quota of 10 messages of user acme.test reached"]
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    refusal = (451, "4.7.1 daily quota of 10 messages of user acme.test reached, it resets "
                    f"at {tomorrow} 00:00 UTC".encode())
    assert send(client, 11) == refusal
    client.quit()

    explained = relay.admin("explain", "acme.test", "--sender", "app@acme.test", "--json",
                            check=False)
    doc = json.loads(explained.stdout)
    assert explained.returncode == 3 and not doc["accepted"]
    assert doc["steps"][-1]["reply"] == f"{refusal[0]} {refusal[1].decode()}"
    assert doc["steps"][-1]["rule"] == ("daily quota of user acme.test: 10 of 10, resets at "
                                        f"{tomorrow} 00:00 UTC")
    assert doc["limits"]["quota"][0] | {"resets": ""} == {
        "subject": "user", "name": "acme.test", "period": "day", "limit": 10, "used": 10,
        "held": 0, "resets": ""}
    text = relay.admin("explain", "acme.test", "--sender", "app@acme.test", check=False).stdout
    assert "daily quota of user acme.test: 10 of 10" in text

    relay.stop()
    relay.start()
    client = relay.smtp(login=("acme.test", PASSWORD))
    assert send(client, 11) == refusal
    client.quit()
    assert len(queued_warnings(relay)) == 3  # nothing reported twice
