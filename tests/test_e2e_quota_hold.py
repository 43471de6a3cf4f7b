"""End to end through the real twistd process and its delivery process: a user whose mail
over quota is held (``--quota-action hold``). The message past the daily quota gets a 250
saying it is held and until when, waits in hold/ while the others reach the next hop,
``queue list`` says why it is held, and ``mailrelay-admin queue release`` hands it to
delivery: the next hop gets it exactly once. The release at the UTC midnight is tested
with a Clock in tests/test_quota_hold.py (the real one would take a day)."""

from __future__ import annotations

import json
import time

import pytest
from harness import Relay, Sink, message, wait_for

PASSWORD = "correct horse battery"


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path / "sink")
    yield s
    s.stop()


@pytest.fixture
def relay(tmp_path, sink):
    r = Relay(tmp_path / "relay", config=(
        f"[delivery]\nmode = smarthost\nsmarthost = 127.0.0.1:{sink.port}\n"
        "smarthost_tls = none\nretry_first = 1s\nretry_max = 1s\n"))
    r.admin("account", "set", "default", "--domains", "doe.test")
    r.add_user("doe.test", PASSWORD, "--quota-day", "2", "--quota-action", "hold")
    r.start()
    yield r
    r.stop()


def send(client, n: int) -> tuple[int, str]:
    code, text = client.mail("a@doe.test")
    assert code == 250, text
    assert client.rcpt("bob@example.test")[0] == 250
    code, text = client.data(message("a@doe.test", "bob@example.test", f"message {n}"))
    return code, text.decode()


def subjects(sink: Sink) -> list[str]:
    return [line.split(b": ", 1)[1].decode() for _, data in sink.messages()
            for line in data.split(b"\r\n") if line.startswith(b"Subject: ")]


def test_a_message_over_quota_is_held_and_an_admin_release_delivers_it_once(relay, sink):
    with relay.smtp(login=("doe.test", PASSWORD)) as client:
        replies = [send(client, n) for n in (1, 2, 3)]
    assert [code for code, _ in replies] == [250, 250, 250]
    held = [p.name for p in relay.spool_files("hold")]
    assert len(held) == 1
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert replies[2][1] == (f"2.0.0 Ok: queued as {held[0]}, held: daily quota of 2 "
                             "messages of user doe.test reached, released at "
                             f"{tomorrow} 00:00 UTC")
    sink.wait(2)
    wait_for(lambda: not relay.spool_files("queue"), what="the first two delivered")
    assert sorted(subjects(sink)) == ["message 1", "message 2"]

    listed = relay.admin("queue", "list").stdout
    assert f"held: quota until {tomorrow} 00:00 UTC" in listed
    entry, = json.loads(relay.admin("queue", "list", "--json").stdout)
    assert (entry["id"], entry["held"]) == (held[0], "quota")
    assert "held for:    daily quota of 2 messages of user doe.test reached" in relay.admin(
        "queue", "show", held[0]).stdout

    released = relay.admin("queue", "release", held[0])
    assert released.stdout == f"{held[0]}: released to the queue\n"
    sink.wait(3)
    wait_for(lambda: not relay.spool_files("queue") and not relay.spool_files("hold"),
             what="the released message delivered")
    again = relay.admin("queue", "release", held[0], check=False)
    assert again.returncode == 1 and "no message" in again.stderr
    assert sorted(subjects(sink)) == ["message 1", "message 2", "message 3"]  # once
    assert "quota: released " + held[0] in relay.log()

    # The release counted message 3 in today's quota: what follows is held too, and
    # --all-quota sends every message held over a quota.
    with relay.smtp(login=("doe.test", PASSWORD)) as client:
        assert all(", held: daily quota" in send(client, n)[1] for n in (4, 5))
    assert len(relay.spool_files("hold")) == 2
    released = relay.admin("queue", "release", "--all-quota")
    assert released.stdout.endswith("2 held messages released\n")
    sink.wait(5)
    wait_for(lambda: not relay.spool_files("queue") and not relay.spool_files("hold"),
             what="the released messages delivered")
    assert sorted(subjects(sink)) == [f"message {n}" for n in range(1, 6)]
